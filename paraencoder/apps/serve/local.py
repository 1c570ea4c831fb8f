"""Run the server in this process on a free loopback port (tests, benches, notebooks)."""

from __future__ import annotations

import socket
import threading
import time


class LocalServer:
    """``with LocalServer(app) as server: OpenAI(base_url=server.base_url, ...)``; binds 127.0.0.1 only."""

    def __init__(self, app, *, startup_timeout_s: float = 120.0):
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True, name="paraencoder-local-server")
        self.startup_timeout_s = startup_timeout_s

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "LocalServer":
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the local server did not start within {self.startup_timeout_s:g} s")
            time.sleep(0.02)
        return self

    def close(self) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._sock.close()

    def __exit__(self, *exc) -> None:
        self.close()
