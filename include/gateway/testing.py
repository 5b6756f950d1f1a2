"""Start the real gateway as a subprocess on a free loopback port, for tests, benchmarks and demos.

    with run_gateway(model_dir, "sqlite:///tmp/log.db", token="t") as gw:
        requests.post(f"{gw.url}/v1/models/fraud/predict", json={...})

On exit the gateway gets SIGTERM and is waited for (graceful: every accepted row is flushed). `stop()` does the
same earlier, `kill()` sends SIGKILL for fault tests.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests

_REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GatewayStartError(RuntimeError):
    """The gateway process exited or did not answer /healthz in time."""


@dataclass
class GatewayProcess:
    """A running gateway subprocess.

    :param url: base URL, e.g. `http://127.0.0.1:54321`.
    :param token: the admin token it was started with.
    :param process: the `subprocess.Popen` handle.
    :param log_path: file holding the gateway's stdout and stderr.
    """

    url: str
    token: str
    process: subprocess.Popen
    log_path: Path
    _session: requests.Session = field(default_factory=requests.Session, repr=False)

    @property
    def admin_headers(self) -> dict[str, str]:
        """`Authorization: Bearer <token>` for admin calls."""
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def running(self) -> bool:
        """True while the process has not exited."""
        return self.process.poll() is None

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the graceful shutdown (log flushed); returns the exit code."""
        self._session.close()
        if self.running:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise GatewayStartError(f"gateway did not stop within {timeout}s after SIGTERM; killed") from None

    def kill(self) -> int:
        """SIGKILL now (no flush): for fault tests."""
        self._session.close()
        if self.running:
            self.process.kill()
        return self.process.wait(10)

    def log_text(self) -> str:
        """Everything the gateway printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def route(self, model: str) -> dict:
        """`GET /v1/models/{model}/route`."""
        response = self._session.get(f"{self.url}/v1/models/{model}/route", timeout=10)
        response.raise_for_status()
        return response.json()

    def set_route(self, model: str, **body: object) -> requests.Response:
        """`PUT /v1/models/{model}/route` with the admin token; returns the response unchecked."""
        return self._session.put(
            f"{self.url}/v1/models/{model}/route", json=body, headers=self.admin_headers, timeout=10
        )


def start_gateway(
    model_dir: str | os.PathLike,
    db_url: str,
    token: str | None = None,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 60.0,
    log_dir: str | os.PathLike | None = None,
) -> GatewayProcess:
    """Start `python -m gateway` on 127.0.0.1 and wait until /healthz answers."""
    token = token or secrets.token_urlsafe(24)
    port = port or free_port()
    log_path = Path(tempfile.mkstemp(prefix="gateway-", suffix=".log", dir=log_dir)[1])
    env = dict(os.environ)
    env["CANARY_GATEWAY_TOKEN"] = token
    paths = [str(_REPO / "include"), str(_REPO / "plugins"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    cmd = [
        sys.executable,
        "-m",
        "gateway",
        "--model-dir",
        str(model_dir),
        "--db-url",
        db_url,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra_args,
    ]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    gw = GatewayProcess(f"http://127.0.0.1:{port}", token, process, log_path)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise GatewayStartError(
                f"gateway exited with code {process.returncode}:\n{gw.log_text()[-3000:]}"
            )
        try:
            if requests.get(f"{gw.url}/healthz", timeout=1).status_code == 200:
                return gw
        except requests.RequestException:
            pass
        time.sleep(0.1)
    gw.kill()
    raise GatewayStartError(
        f"gateway did not answer /healthz within {startup_timeout}s:\n{gw.log_text()[-3000:]}"
    )


@contextlib.contextmanager
def run_gateway(
    model_dir: str | os.PathLike,
    db_url: str,
    token: str | None = None,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 60.0,
) -> Iterator[GatewayProcess]:
    """Context manager around `start_gateway`: yields the process, stops it gracefully on exit."""
    gw = start_gateway(
        model_dir, db_url, token=token, port=port, extra_args=extra_args, startup_timeout=startup_timeout
    )
    try:
        yield gw
    finally:
        if gw.running:
            gw.stop()
