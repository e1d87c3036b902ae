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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, proc: subprocess.Popen | None = None, timeout: float = 300.0) -> None:
    """Polls grpc.health.v1 until SERVING; fails fast if the process exits."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the server for {address} exited with {proc.returncode}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                status = None  # not listening yet: keep polling until the deadline
            time.sleep(0.2)
    raise TimeoutError(f"{address} did not become SERVING within {timeout:.0f} s")


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
            wait_serving(self.address, self.proc)
        except BaseException:
            self.stop()
            raise

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
