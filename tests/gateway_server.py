"""Servers for gateway tests: an ASGI app, or the gateway itself, served by uvicorn in a thread on a free port."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any, Self

import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings
from sluice.triton_server import free_ports


class AppServer:
    """An ASGI app served by uvicorn in a thread, on a free loopback port."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        port = port or free_ports(1)[0]
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


class GatewayServer(AppServer):
    """The gateway app, served as AppServer serves."""

    def __init__(self, settings: GatewaySettings) -> None:
        (port,) = free_ports(1)
        self.settings = replace(settings, port=port)
        super().__init__(create_app(self.settings), port)
