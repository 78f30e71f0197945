"""Prefect's API for one local `loraops run`: started the moment the command starts, stopped when it ends.

Without PREFECT_API_URL, Prefect itself starts a temporary server on first use (its ``SubprocessASGIServer``): it
imports Prefect's whole server package in the client process just to start that process, and only once the flow
asks for the API. Here the same uvicorn process over the same local database starts first thing, from a process
that imports nothing of Prefect's server, so it comes up while the client imports the flow, MLflow and DVC on the
other core. When it answers, PREFECT_API_URL points at it for this process and the stages it starts; the run stays
in local mode (``core.concurrency.local_mode``: crashed holders' slots are freed, no team-mode locks).

A server's first answers are slow (about 0.2 s each for the version check and the first query of each table: the
database session, SQLAlchemy's statement compilation). A thread of the run's process asks a few read-only questions
the moment the server answers, while the run is still importing, so the flow's first calls find it warm.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from loraops.core.concurrency import TEMPORARY_API
from loraops.core.errors import StageError

_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
"""What Prefect's own temporary server runs with: no UI, the ephemeral server's settings."""


_LAUNCH = """
import ctypes, os, signal, sys
ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: end with the run's process
if os.getppid() != int(sys.argv[1]):  # the run ended before this line
    sys.exit(0)
os.execv(sys.executable, [sys.executable, "-m", "uvicorn", *sys.argv[2:]])
"""
"""Linux: the server's process asks to be ended when the run's process ends, even by SIGKILL, so a killed run leaves
no server holding the database; it does so itself after starting (a ``preexec_fn`` is unsafe in a process with
threads), then becomes uvicorn."""


_WARM_UP = (("GET", "/admin/version", None), ("POST", "/flows/filter", {"limit": 1}),
            ("POST", "/flow_runs/filter", {"limit": 1}), ("POST", "/task_runs/filter", {"limit": 1}))
"""Read-only calls that take the first-call costs of what a run asks first (the client's version check, creating the
flow run, its task runs); nothing is written."""


def _answer(url: str, method: str = "GET", body: object = None) -> bool:
    """Whether ``url`` answered 200 within 2 s."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
        with urllib.request.urlopen(request, timeout=2) as answer:
            answer.read()
            return bool(answer.status == 200)
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TemporaryServer:
    """A uvicorn process serving Prefect's API app on a free loopback port (``start`` now, ``ready`` waits)."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.warmed = threading.Event()
        """Set once every warm-up call was answered (200)."""

    def start(self) -> "TemporaryServer":
        self.port = _free_port()
        arguments = ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port",
                     str(self.port), "--log-level", "error", "--lifespan", "on"]
        launch = ["-c", _LAUNCH, str(os.getpid())] if sys.platform == "linux" else ["-m", "uvicorn"]
        self.process = subprocess.Popen([sys.executable, *launch, *arguments], env={**os.environ, **_SERVER_ENV},
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        atexit.register(self.stop)
        threading.Thread(target=self._warm_up, args=(self.process, self.api_url), name="prefect-server-warm-up",
                         daemon=True).start()
        return self

    def _warm_up(self, process: "subprocess.Popen[bytes]", api_url: str) -> None:
        """Once the server answers, the read-only calls of ``_WARM_UP``; gives up when the server exits or does not
        come up within a minute (``ready`` reports why)."""
        deadline = time.monotonic() + 60
        while not _answer(f"{api_url}/health"):
            if process.poll() is not None or time.monotonic() > deadline:
                return
            time.sleep(0.05)
        if all([_answer(f"{api_url}{path}", method, body) for method, path, body in _WARM_UP]):
            self.warmed.set()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def ready(self, timeout: float) -> str:
        """Wait until the API answers, then point this process's Prefect settings at it; return its URL.

        Another process may take the port between choosing and binding it: the server is then started again on
        another one (three tries).

        Raises:
            StageError: the server exited or did not answer within ``timeout`` seconds (its last error lines).
        """
        deadline, tries = time.monotonic() + timeout, 1
        while True:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                error = (self.process.stderr.read() if self.process.stderr else b"").decode(errors="replace")
                if "address already in use" in error.lower() and tries < 3:
                    tries += 1
                    self.start()
                    continue
                raise StageError(f"Prefect's temporary server exited with code {code}: {error.strip()[-800:]}")
            if _answer(f"{self.api_url}/health"):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise StageError(f"Prefect's temporary server did not answer within {timeout:.0f}s "
                                 "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
            time.sleep(0.05)
        os.environ["PREFECT_API_URL"] = os.environ[TEMPORARY_API] = self.api_url
        if "prefect.context" in sys.modules:  # settings are read once at import: read them again
            from prefect.context import refresh_global_settings_context

            refresh_global_settings_context()
        return self.api_url

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
