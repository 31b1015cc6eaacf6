"""Run the app with uvicorn in a background thread, and find a headless Chromium to look at it
(for the browser tests and scripts/screenshot_pages.py)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator

from fastapi import FastAPI

# Debian's Chromium, offline and without a sandbox (containers): no update or sync traffic.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium() -> str | None:
    """The system's Chromium (Playwright's own browser download cannot work offline)."""
    return shutil.which("/usr/bin/chromium") or shutil.which("chromium")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", start_timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` on a free port while the block runs; yields the base URL."""
    import uvicorn

    port = free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="featuredb-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
