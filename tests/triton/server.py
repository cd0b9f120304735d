"""A real tritonserver for the integration tests: the env scripts/tritonserver_env.sh makes, loopback only.

Started once per test session (tests/triton/conftest.py); its Python has only nvidia-pytriton and the
repositories' requirements.txt (no torch, transformers or vlexport: the repositories carry their own serving
runtime), and no PYTHONPATH from the caller. Stopped by its PID after the clients are closed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV_DIR = Path(
    os.environ.get("VLEXPORT_TRITON_ENV", Path.home() / ".cache" / "vlexport" / "tritonserver-env")
)
BINARY = ENV_DIR / "bin" / "tritonserver"
HOST = "127.0.0.1"


def env_python_lacks(module: str) -> bool:
    """True when the server environment's Python cannot import ``module`` (its venv, no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(ENV_DIR / "bin" / "python"), "-c", f"import {module}"],
        check=False,
        env=env,
        capture_output=True,
        cwd="/",
    )
    return done.returncode != 0


def missing_reason() -> str | None:
    if not BINARY.is_file():
        return (
            f"no tritonserver environment at {ENV_DIR}: run scripts/tritonserver_env.sh (CI's .ci/run does) "
            "to make it"
        )
    return None


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Server:
    """tritonserver over ``repository`` with ``models`` loaded (explicit model control)."""

    def __init__(self, repository: Path, models: list[str], log: Path):
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.log_path = log
        # nothing of this checkout on the path
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        args = [
            str(BINARY),
            f"--model-repository={repository}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in models),
            f"--http-address={HOST}",
            f"--grpc-address={HOST}",
            f"--metrics-address={HOST}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--exit-timeout-secs=5",
            "--log-verbose=0",
        ]
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.models = models
        self.started = time.monotonic()

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def wait_ready(self, timeout: float = 300.0) -> float:
        from tritonclient import http

        client = http.InferenceServerClient(self.http_url)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(Exception):  # not listening yet
                    if client.is_server_ready() and all(client.is_model_ready(m) for m in self.models):
                        return time.monotonic() - self.started
                time.sleep(0.5)
            raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM to its PID: tritonserver drains (--exit-timeout-secs) and exits
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                # its own process group: the server and its python stubs
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
