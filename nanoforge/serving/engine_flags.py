"""The flags of an engine server (`nanoforge serve --addr`, `python -m nanoforge.serving.engine_server`):
its PD role and registry. Kept apart from engine_server.py so the CLI can offer them without
importing ZMQ."""
from __future__ import annotations

import argparse

KV_TRANSPORTS = ("auto", "tcp", "ipc")


def add_engine_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--role", choices=["both", "prefill", "decode"], default="both",
                   help="prefill: keep each PD request's KV after its first token for a decode engine to pull; "
                        "decode: pull it; both: whole requests")
    p.add_argument("--kv-park-timeout", type=float, default=30.0,
                   help="seconds a prefilled request's KV waits to be pulled before it is freed (default %(default)s)")
    p.add_argument("--kv-transport", choices=KV_TRANSPORTS, default="auto",
                   help="how a decode engine pulls KV: tcp (host-staged, ZMQ), ipc (same-host CUDA copy), auto")
    p.add_argument("--registry", help="redis://host:port[/db]: heartbeat this engine's record there for routers")
    p.add_argument("--advertise-addr", help="the address routers and decode engines use (default: --addr)")
