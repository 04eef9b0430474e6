"""Engine registry against a real redis-server (the `redis_url` fixture in conftest.py)."""
import asyncio
import shutil
import subprocess
import time
import uuid

import pytest
import redis

from nanoforge.errors import NanoForgeError
from nanoforge.serving.sockets import free_tcp_port
from nanoforge.serving.registry import (EngineRecord, RegistryPublisher, RegistryWatcher, check_scope,
                                        parse_redis_url)


@pytest.fixture
def prefix():
    return f"t{uuid.uuid4().hex[:8]}"  # every test its own key space in the shared server


def rec(role="both", **kw):
    fields = dict(instance=uuid.uuid4().hex, addr="tcp://127.0.0.1:5557", role=role, model_name="tiny",
                  pid=1234, host="node0")
    fields.update(kw)
    return EngineRecord(**fields)


def wait_for(cond, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_record_json_round_trip_and_rejects_malformed():
    r = rec(role="prefill")
    assert EngineRecord.from_json(r.to_json()) == r
    assert EngineRecord.from_json(r.to_json().encode()) == r
    assert EngineRecord.from_hello({"instance": "ab", "model_name": "m", "role": "decode", "pid": 7,
                                    "max_model_len": 4096}, "tcp://h:1") == \
        EngineRecord("ab", "tcp://h:1", "decode", "m", 7, "")
    for bad, msg in [("{nope", "not valid JSON"), ("[1]", "JSON object"), ('{"instance": "x"}', "missing 'addr'"),
                     ('{"instance": "x", "addr": "a", "role": "both", "model_name": "m", "pid": "1"}', "'pid' must be int"),
                     ('{"instance": "x", "addr": "a", "role": "boss", "model_name": "m"}', "role 'boss'"),
                     (b"\xff\xfe", "not valid JSON")]:
        with pytest.raises(NanoForgeError, match=msg):
            EngineRecord.from_json(bad)


def test_parse_redis_url():
    assert parse_redis_url("redis://127.0.0.1:6380/2") == ("127.0.0.1", 6380, 2)
    assert parse_redis_url("redis://cache.local:7000") == ("cache.local", 7000, 0)
    assert parse_redis_url("redis://cache.local") == ("cache.local", 6379, 0)
    for bad in ["http://h:1", "redis://", "redis://h:port", "redis://h:1/x", "localhost:6379", "redis://h:1?x=1"]:
        with pytest.raises(NanoForgeError, match="bad Redis URL") as e:
            parse_redis_url(bad)
        assert bad in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(NanoForgeError, match="credentials") as e:
        parse_redis_url("redis://u:secret@h:1")
    assert "secret" not in str(e.value)


def test_publish_two_and_snapshot(redis_url, prefix):
    a, b = rec("prefill"), rec("decode", addr="tcp://127.0.0.1:6000", pid=99)
    pubs = [RegistryPublisher(redis_url, r, ttl=2.0, interval=0.5, prefix=prefix) for r in (a, b)]
    watcher = RegistryWatcher(redis_url, prefix=prefix)
    try:
        for p in pubs:
            p.start()  # first beat is synchronous
        snap = watcher.snapshot()
        assert snap == {a.instance: a, b.instance: b}
        assert snap[b.instance].addr == "tcp://127.0.0.1:6000" and snap[b.instance].pid == 99
        assert snap[a.instance].role == "prefill" and snap[a.instance].host == "node0"
        assert RegistryWatcher(redis_url, prefix="other" + prefix).snapshot() == {}
        pubs[0].stop()  # deletes at once, no waiting for the ttl
        assert watcher.snapshot() == {b.instance: b}
    finally:
        for p in pubs:
            p.stop()
        watcher.close()
    assert watcher.snapshot() == {}


def test_scopes_see_only_their_own_engines(redis_url, prefix):
    """Deployments sharing one Redis: a watcher lists the engines of its scope only, and the unscoped
    registry is a scope of its own (a scope named "engine" does not leak into it)."""
    scopes = [None, "a", "b", "engine", "a.b-c_1"]
    recs = {s: rec(addr=f"tcp://127.0.0.1:{7000 + i}") for i, s in enumerate(scopes)}
    pubs = [RegistryPublisher(redis_url, r, ttl=2.0, interval=0.5, prefix=prefix, scope=s) for s, r in recs.items()]
    watchers = {s: RegistryWatcher(redis_url, prefix=prefix, scope=s) for s in scopes + ["c"]}
    try:
        for p in pubs:
            p.start()
        for s, w in watchers.items():
            assert w.snapshot() == ({recs[s].instance: recs[s]} if s in recs else {}), s
    finally:
        for p in pubs:
            p.stop()
        for w in watchers.values():
            w.close()


@pytest.mark.parametrize("bad", ["", "a:b", "a*", "a?", "[ab]", "-a", ".a", "a b", "x" * 65, "é"])
def test_bad_scope_names_are_refused_naming_the_flag(bad):
    assert check_scope("ok-Scope_1.2") == "ok-Scope_1.2" and check_scope(None) is None
    with pytest.raises(NanoForgeError, match="--registry-scope .*: expected 1-64 letters") as e:
        check_scope(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(NanoForgeError, match="--registry-scope"):
        RegistryWatcher("redis://127.0.0.1:1", scope=bad)
    with pytest.raises(NanoForgeError, match="--registry-scope"):
        RegistryPublisher("redis://127.0.0.1:1", rec(), scope=bad)


def test_lapsed_heartbeat_is_removed_then_added_back(redis_url, prefix):
    a, b = rec(), rec()
    pa = RegistryPublisher(redis_url, a, ttl=1.0, interval=0.2, prefix=prefix)
    pb = RegistryPublisher(redis_url, b, ttl=1.0, interval=0.2, prefix=prefix)
    watcher = RegistryWatcher(redis_url, prefix=prefix)
    events = []

    async def scenario():
        task = asyncio.create_task(watcher.watch(lambda added, removed: events.append((added, removed)), every=0.1))
        try:
            await until(lambda: events)
            assert sorted(r.instance for r in events[0][0]) == sorted([a.instance, b.instance])
            assert events[0][1] == []
            t0 = time.monotonic()
            pa.pause()  # a hung engine: the key is left to lapse
            await until(lambda: len(events) >= 2)
            assert events[1] == ([], [a]) and time.monotonic() - t0 < 2.0
            assert set(watcher.snapshot()) == {b.instance}  # b kept beating through a's ttl
            pa.resume()
            await until(lambda: len(events) >= 3)
            assert events[2] == ([a], [])
        finally:
            task.cancel()

    async def until(cond, timeout=2.5):
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out; events so far: {events}"
            await asyncio.sleep(0.05)

    pa.start()
    pb.start()
    try:
        asyncio.run(scenario())
    finally:
        pa.stop()
        pb.stop()
        watcher.close()


def test_async_on_change_is_awaited(redis_url, prefix):
    a = rec()
    seen = []

    async def on_change(added, removed):
        await asyncio.sleep(0)
        seen.append([r.instance for r in added])

    async def scenario(watcher):
        task = asyncio.create_task(watcher.watch(on_change, every=0.05))
        for _ in range(60):
            if seen:
                break
            await asyncio.sleep(0.05)
        task.cancel()

    pub = RegistryPublisher(redis_url, a, ttl=2.0, interval=0.5, prefix=prefix)
    pub.start()
    try:
        asyncio.run(scenario(RegistryWatcher(redis_url, prefix=prefix)))
    finally:
        pub.stop()
    assert seen == [[a.instance]]


def test_malformed_values_are_skipped(redis_url, prefix, caplog):
    good = rec()
    host, port, db = parse_redis_url(redis_url)
    raw = redis.Redis(host=host, port=port, db=db)
    raw.set(f"{prefix}:engine:junk", b"\x80not json", px=5000)
    raw.set(f"{prefix}:engine:partial", '{"instance": "partial"}', px=5000)
    raw.set(f"{prefix}:engine:elsewhere", rec(instance="someone-else").to_json(), px=5000)
    raw.set(f"{prefix}:engine:{good.instance}", good.to_json(), px=5000)
    raw.close()
    watcher = RegistryWatcher(redis_url, prefix=prefix)
    with caplog.at_level("WARNING", logger="nanoforge.serving"):
        assert watcher.snapshot() == {good.instance: good}
        assert watcher.snapshot() == {good.instance: good}
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 3  # each bad key is logged once, not on every poll
    assert any(f"{prefix}:engine:junk" in m for m in skipped)
    assert any("does not match its key" in m for m in skipped)
    watcher.close()


def closed_port_url():
    return f"redis://127.0.0.1:{free_tcp_port()}/0"


def test_unreachable_redis_gives_clear_errors():
    url = closed_port_url()
    watcher = RegistryWatcher(url)
    with pytest.raises(NanoForgeError, match=f"cannot reach Redis at {url}: "):
        watcher.snapshot()
    with pytest.raises(NanoForgeError, match="cannot reach Redis at"):
        asyncio.run(watcher.watch(lambda a, r: None, every=0.05))
    with pytest.raises(NanoForgeError, match="below ttl"):
        RegistryPublisher(url, rec(), ttl=1.0, interval=1.0)
    with pytest.raises(NanoForgeError, match="bad Redis URL"):
        RegistryWatcher("redis:/nohost")


def test_publisher_retries_quietly_until_redis_is_back(redis_url, tmp_path, caplog):
    url = closed_port_url()  # redis_url only guarantees that redis-server is installed
    r = rec()
    pub = RegistryPublisher(url, r, ttl=1.0, interval=0.1)
    watcher = RegistryWatcher(url)
    server = None
    try:
        with caplog.at_level("WARNING", logger="nanoforge.serving"):
            pub.start()  # Redis down: no exception, the thread keeps trying
            time.sleep(0.4)
            port = parse_redis_url(url)[1]
            server = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                                      stdout=subprocess.DEVNULL)

            def visible():
                try:
                    return watcher.snapshot() == {r.instance: r}
                except NanoForgeError:
                    return False

            assert wait_for(visible)
        msgs = [m.getMessage() for m in caplog.records]
        assert sum("heartbeat to" in m and "failed" in m for m in msgs) == 1  # once per outage, not per beat
        assert sum("works again" in m for m in msgs) == 1
    finally:
        pub.stop()
        watcher.close()
        if server is not None:
            server.terminate()
            server.wait(timeout=5)
