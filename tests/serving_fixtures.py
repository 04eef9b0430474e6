"""Serving helpers shared by the PD and EPD tests: an engine server's stats, the OpenAI app over a Router."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable

from nanoforge.serving.router import Router
from nanoforge.serving.zmq_client import ZmqEngineClient


def engine_stats(addr: str) -> dict:
    """One stats request to the engine server at addr."""
    async def main():
        c = await ZmqEngineClient.connect(addr, timeout=5)
        try:
            return await c.stats()
        finally:
            c.close()

    return asyncio.run(main())


@contextmanager
def serve(app):
    """uvicorn serving `app` on a free 127.0.0.1 port in a daemon thread; yields the base URL."""
    import uvicorn  # here: the GPU machines run some of these tests without the HTTP client stack

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def http_router(make_app: Callable[[Router], object], **router_kw):
    """uvicorn on a free port in a thread whose event loop also owns the Router's sockets; yields the
    base URL. `make_app(router)` builds the app (build_app with the test's own options)."""
    import uvicorn  # here: the GPU machines run the PD tests without the HTTP stack

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    box: dict = {}
    ready = threading.Event()

    async def main():
        router = await Router.connect(**router_kw)
        box["server"] = uvicorn.Server(uvicorn.Config(make_app(router), log_level="warning", lifespan="off"))
        ready.set()
        try:
            await box["server"].serve(sockets=[sock])
        finally:
            router.close()

    def serve():
        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            box["error"] = e
            ready.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(30)
    if "error" in box:
        raise box["error"]
    while not box["server"].started:
        assert thread.is_alive(), box.get("error")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        box["server"].should_exit = True
        thread.join(timeout=10)
