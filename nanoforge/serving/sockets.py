"""The ZMQ sockets every server loop here builds the same way: a ROUTER that never drops a reply,
an inproc PAIR that lets a worker thread wake the loop, and a bounded drain of the ROUTER."""
from __future__ import annotations

import itertools
import random
import socket
from pathlib import Path
from typing import Callable, Iterator

import zmq

from ..errors import NanoForgeError


def bind_router(ctx: zmq.Context, addr: str, what: str) -> zmq.Socket:
    """A ROUTER bound at `addr`: no high-water marks (a slow front end never loses a frame) and
    handover (a front end that reconnects keeps its identity and streams). On failure the context is
    destroyed and the error names `what` and the address."""
    sock = ctx.socket(zmq.ROUTER)
    for opt, v in ((zmq.SNDHWM, 0), (zmq.RCVHWM, 0), (zmq.LINGER, 500), (zmq.ROUTER_HANDOVER, 1)):
        sock.setsockopt(opt, v)
    try:
        sock.bind(addr)
    except zmq.ZMQError as e:
        ctx.destroy(linger=0)
        raise NanoForgeError(f"{what} cannot bind {addr}: {e}") from None
    return sock


def _ephemeral_low(default: int = 32768) -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default  # not Linux: most kernels hand out ports above this


def _candidates() -> Iterator[int]:
    low = max(_ephemeral_low(), 11024)
    span = low - 10000
    return (10000 + i % span for i in itertools.count(random.randrange(span)))


_PORTS = _candidates()  # one walk per process: two calls never hand out the same port


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port nothing on `host` listens on now, chosen below the kernel's ephemeral range, so no
    bind(0) (a TCPStore, gloo's pairs) or outgoing connection elsewhere can take it before the
    process it is meant for binds it."""
    for port in itertools.islice(_PORTS, 2000):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise NanoForgeError(f"no free TCP port on {host} below the ephemeral range")


def free_tcp_addr(host: str = "127.0.0.1") -> str:
    """A ZMQ address at a free_tcp_port."""
    return f"tcp://{host}:{free_tcp_port(host)}"


def listen_tcp(host: str, port: int, what: str) -> socket.socket:
    """A TCP socket listening at host:port, made before a server spends minutes loading or
    connecting: a taken port fails now, and clients that come early wait in the backlog."""
    sock = None
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart within TIME_WAIT
        sock.bind(addr)
        sock.listen(2048)
        return sock
    except OSError as e:
        if sock is not None:
            sock.close()
        raise NanoForgeError(f"{what}: cannot listen on {host}:{port}: {e.strerror or e}") from None


def wake_pair(ctx: zmq.Context, name: str) -> tuple[zmq.Socket, zmq.Socket]:
    """(rx the loop polls, tx another thread sends a frame on to wake it), over a fresh inproc address."""
    addr = f"inproc://nanoforge-{name}"
    rx = ctx.socket(zmq.PAIR)
    rx.bind(addr)
    tx = ctx.socket(zmq.PAIR)
    tx.connect(addr)
    return rx, tx


def drain_router(sock: zmq.Socket, handle: Callable[[bytes, list[bytes]], None], limit: int = 256) -> None:
    """Handle up to `limit` waiting messages (identity, body frames): bounded, so a flood of requests
    never starves what the loop does between polls."""
    for _ in range(limit):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        handle(frames[0], frames[1:])


def run_loop(sock: zmq.Socket, wake_rx: zmq.Socket, stopping: Callable[[], bool], flush: Callable[[], None],
             handle: Callable[[bytes, list[bytes]], None]) -> None:
    """A server's I/O loop until stopping(): wait (100 ms at most) for a request or a wake-up from its
    worker thread, send what the worker produced (flush), then handle the waiting requests (bounded,
    so replies keep flowing under a flood)."""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(wake_rx, zmq.POLLIN)
    while not stopping():
        events = dict(poller.poll(100))
        if wake_rx in events:
            while wake_rx.poll(0):
                wake_rx.recv()
        flush()
        if sock in events:
            drain_router(sock, handle)
