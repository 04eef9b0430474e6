"""Engine registry in Redis: engines heartbeat a JSON record under a TTL'd key, routers poll.

Liveness is the TTL: an engine that dies or hangs stops refreshing `{prefix}:engine:{instance}`
and Redis drops the key `ttl` seconds later, so a router never needs a separate failure detector.
Values are JSON (never pickle): a registry is shared by processes that need not trust each other.
A scope (`--registry-scope NAME`, NanoDeploy's --ctrl_scope) puts a deployment's keys under
`{prefix}@{NAME}:engine:*`, so deployments sharing one Redis never see each other's engines; the
unscoped `{prefix}:engine:*` is a scope of its own. Names exclude `:` and glob characters, so no
scope's key pattern matches another's keys.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import threading
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from nanoforge.errors import NanoForgeError

log = logging.getLogger("nanoforge.serving")

ROLES = ("both", "prefill", "decode", "encode")
_SCOPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_scope(scope: str | None) -> str | None:
    """The scope if its name is valid (None: the unscoped registry); else one line naming the flag."""
    if scope is not None and not _SCOPE.fullmatch(scope):
        raise NanoForgeError(f"--registry-scope {scope!r}: expected 1-64 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
    return scope


def scoped_prefix(prefix: str, scope: str | None) -> str:
    """The key prefix of a scope's engines: `prefix` unscoped, `prefix@scope` in a scope."""
    return prefix if check_scope(scope) is None else f"{prefix}@{scope}"


@dataclass
class EngineRecord:
    """What a router needs to reach and pick an engine."""

    instance: str  # uuid hex from the engine's hello; unique per engine process
    addr: str  # ZMQ address, e.g. tcp://10.0.0.5:5557
    role: str  # "both" | "prefill" | "decode" | "encode"
    model_name: str
    pid: int = 0
    host: str = ""

    @classmethod
    def from_hello(cls, hello: dict[str, Any], addr: str, host: str = "") -> "EngineRecord":
        """Build the record from the engine server's hello map (extra hello keys are ignored)."""
        return cls(instance=str(hello["instance"]), addr=addr, role=str(hello.get("role", "both")),
                   model_name=str(hello.get("model_name", "")), pid=int(hello.get("pid", 0)), host=host)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, data: str | bytes) -> "EngineRecord":
        """Parse and type-check a record; anything else is a NanoForgeError naming what is wrong."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise NanoForgeError(f"engine record is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise NanoForgeError(f"engine record must be a JSON object, got {type(obj).__name__}")
        fields: dict[str, Any] = {}
        for name, typ, required in (("instance", str, True), ("addr", str, True), ("role", str, True),
                                    ("model_name", str, True), ("pid", int, False), ("host", str, False)):
            if name not in obj:
                if required:
                    raise NanoForgeError(f"engine record is missing {name!r}")
                continue
            v = obj[name]
            if not isinstance(v, typ) or isinstance(v, bool):
                raise NanoForgeError(f"engine record field {name!r} must be {typ.__name__}, got {v!r}")
            fields[name] = v
        if not fields["instance"] or not fields["addr"]:
            raise NanoForgeError("engine record has an empty 'instance' or 'addr'")
        if fields["role"] not in ROLES:
            raise NanoForgeError(f"engine record role {fields['role']!r} is not one of {', '.join(ROLES)}")
        return cls(**fields)


def parse_redis_url(url: str) -> tuple[str, int, int]:
    """`redis://host[:port][/db]` -> (host, port, db); port defaults to 6379 and db to 0."""
    try:
        u = urlsplit(url)
        port = u.port or 6379
    except ValueError as e:
        raise NanoForgeError(f"bad Redis URL {url!r}: {e}") from None
    if u.username or u.password:
        raise NanoForgeError("bad Redis URL: credentials in the URL are not supported")
    if u.scheme != "redis" or not u.hostname or u.query or u.fragment:
        raise NanoForgeError(f"bad Redis URL {url!r}: expected redis://host:port[/db]")
    path = u.path.strip("/")
    if path and not path.isdigit():
        raise NanoForgeError(f"bad Redis URL {url!r}: database {path!r} is not a number")
    return u.hostname, port, int(path or 0)


def _client(url: str) -> redis.Redis:
    host, port, db = parse_redis_url(url)
    # Short timeouts and one quick retry (enough to reconnect after a Redis restart): the client's
    # default of several retries with seconds of backoff would delay a heartbeat past its ttl.
    return redis.Redis(host=host, port=port, db=db, socket_timeout=2.0, socket_connect_timeout=2.0,
                       retry=Retry(ExponentialBackoff(cap=0.1, base=0.05), 1))


class RegistryPublisher:
    """Keeps one engine's record alive in Redis from a daemon thread."""

    def __init__(self, url: str, record: EngineRecord, ttl: float = 3.0, interval: float = 1.0,
                 prefix: str = "nanoforge", scope: str | None = None):
        if not 0 < interval < ttl:
            raise NanoForgeError(f"registry heartbeat interval {interval}s must be positive and below ttl {ttl}s")
        self.url, self.record, self.ttl, self.interval = url, record, ttl, interval
        self.key = f"{scoped_prefix(prefix, scope)}:engine:{record.instance}"
        self._redis = _client(url)
        self._stop = threading.Event()
        self._wake = threading.Event()  # cuts the sleep short on resume()/stop()
        self._paused = False
        self._healthy = True  # warn once per outage, not once per beat
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Publish now (so the record is visible when start returns, if Redis is up) and keep beating."""
        if self._thread is not None:
            return
        self._beat()
        self._thread = threading.Thread(target=self._run, name=f"registry-{self.record.instance[:8]}",
                                        daemon=True)
        self._thread.start()

    def pause(self) -> None:
        """Stop heartbeating but keep the key: it lapses after ttl, like a hung engine's."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread and delete the key so routers drop the engine at once (best effort)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        try:
            self._redis.delete(self.key)
        except redis.RedisError as e:
            log.warning("registry: could not delete %s at %s (it lapses in %.1fs): %s", self.key, self.url, self.ttl, e)
        self._redis.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if not self._stop.is_set():
                self._beat()

    def _beat(self) -> None:
        if self._paused:
            return
        try:
            self._redis.set(self.key, self.record.to_json(), px=int(self.ttl * 1000))
        except redis.RedisError as e:
            if self._healthy:
                log.warning("registry: heartbeat to %s failed, retrying every %.1fs: %s", self.url, self.interval, e)
            self._healthy = False
        else:
            if not self._healthy:
                log.warning("registry: heartbeat to %s works again", self.url)
            self._healthy = True


OnChange = Callable[[list[EngineRecord], list[EngineRecord]], Awaitable[None] | None]


class RegistryWatcher:
    """Reads the set of live engines; `watch` turns successive snapshots into added/removed events."""

    def __init__(self, url: str, prefix: str = "nanoforge", scope: str | None = None):
        self.url = url
        self.pattern = f"{scoped_prefix(prefix, scope)}:engine:*"
        self._redis = _client(url)
        self._warned: set[bytes] = set()  # malformed keys already logged (polling would repeat them)

    def snapshot(self) -> dict[str, EngineRecord]:
        """Live engines by instance; malformed values are logged once and skipped."""
        try:
            keys = list(self._redis.scan_iter(match=self.pattern, count=1000))
            values = self._redis.mget(keys) if keys else []
        except redis.RedisError as e:
            raise NanoForgeError(f"cannot reach Redis at {self.url}: {e}") from None
        out: dict[str, EngineRecord] = {}
        for key, value in zip(keys, values):
            if value is None:  # expired between SCAN and MGET
                continue
            try:
                rec = EngineRecord.from_json(value)
                suffix = key.decode(errors="replace").rsplit(":", 1)[-1]
                if rec.instance != suffix:
                    raise NanoForgeError(f"record instance {rec.instance!r} does not match its key")
            except NanoForgeError as e:
                if key not in self._warned:
                    self._warned.add(key)
                    log.warning("registry: skipping %s: %s", key.decode(errors="replace"), e)
                continue
            out[rec.instance] = rec
        return out

    async def watch(self, on_change: OnChange, every: float = 0.5) -> None:
        """Poll forever (cancel the task to stop); call on_change(added, removed) on every change.

        The first snapshot reports every live engine as added, and a failure there raises. Later
        failures are logged and the last known set is kept: a Redis outage is not an engine outage.
        A record that changed under the same instance is reported as removed and added.
        """
        known: dict[str, EngineRecord] = {}
        first, healthy = True, True
        while True:
            try:
                current = await asyncio.to_thread(self.snapshot)
            except NanoForgeError as e:
                if first:
                    raise
                if healthy:
                    log.warning("registry: %s; keeping the last known %d engine(s)", e, len(known))
                healthy = False
                await asyncio.sleep(every)
                continue
            healthy = True
            added = [r for k, r in current.items() if known.get(k) != r]
            removed = [r for k, r in known.items() if current.get(k) != r]
            known = current
            if added or removed:
                res = on_change(added, removed)
                if inspect.isawaitable(res):
                    await res
            first = False
            await asyncio.sleep(every)

    def close(self) -> None:
        self._redis.close()
