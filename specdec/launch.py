"""Starting specdec servers as separate OS processes and waiting until they serve (tests, demo, bench)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec import settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_timeout() -> float:
    """Seconds a started server may take to serve: SPECDEC_START_TIMEOUT, else 300, or 1800 with SPECDEC_COMPILE on
    (a compiled verifier captures each CUDA graph in ~13 s on an H200: 287 s for the 21 graphs of 2 sessions)."""
    if value := os.environ.get("SPECDEC_START_TIMEOUT"):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"SPECDEC_START_TIMEOUT={value!r}: give the seconds a server may take to start, "
                             "e.g. 900") from None
    return 1800.0 if settings.compiling() else 300.0


def wait_serving(address: str, proc: subprocess.Popen | None = None, timeout: float = 300.0,
                 waiting=None, every: float = 60.0) -> None:
    """Polls grpc.health.v1 until SERVING; fails fast if the process exits. waiting(seconds) is called every
    `every` seconds while it waits (progress for a slow start)."""
    began = time.monotonic()
    deadline, told = began + timeout, began
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the server for {address} exited with {proc.returncode}")
            if waiting is not None and time.monotonic() - told >= every:
                told = time.monotonic()
                waiting(told - began)
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                status = None  # not listening yet: keep polling until the deadline
            time.sleep(0.2)
    raise TimeoutError(f"{address} did not become SERVING within {timeout:.0f} s (SPECDEC_START_TIMEOUT sets the "
                       "limit)")


def _tail(path: Path, size: int = 4096) -> str:
    """The last `size` bytes of a file, as text (a server's log can grow long while it starts)."""
    with path.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - size))
        return f.read().decode(errors="replace")


class ServerProcess:
    """`specdec serve [ROLE] ...` in its own process, on a free loopback port unless given one."""

    def __init__(self, role: str | None, *args: str, port: int | None = None, log: Path | None = None,
                 env: dict | None = None, grace: float = 5.0):
        self.role = role or "all-in-one"
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        if "--metrics-port" not in args:
            args = ("--metrics-port", "0", *args)  # many servers share this machine; 9464 would clash
        cmd = [sys.executable, "-m", "specdec.cli", "serve", *([role] if role else []), "--host", "127.0.0.1",
               "--port", str(self.port), "--grace", str(grace), *args]
        self._log = open(log, "w") if log else None
        self.proc = subprocess.Popen(cmd, stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        try:
            wait_serving(self.address, self.proc, start_timeout(), lambda s: self._waiting(s, log))
        except BaseException:
            self.stop()
            raise

    def _waiting(self, seconds: float, log: Path | None) -> None:
        last = ""
        if log is not None:
            lines = [line for line in _tail(log).splitlines() if line.strip()]
            last = f"; its log ({log}) last said: {lines[-1][-160:]}" if lines else f"; its log: {log}"
        print(f"still waiting for the {self.role} at {self.address} to serve ({seconds:.0f} s{last})",
              file=sys.stderr, flush=True)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
