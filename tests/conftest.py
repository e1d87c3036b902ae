"""Shared fixtures: the real default target (loaded once), free ports, and real server processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SPECDEC_CACHE_DIR", str(ROOT / ".cache"))
PROMPTS = ROOT / "bench" / "prompts" / "chat.jsonl"  # a copy of ../shared/prompts/chat.jsonl (measurement only)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server for {address} exited with {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} did not become SERVING in {timeout} s")


class ServerProcess:
    """`specdec serve ROLE ...` as its own OS process."""

    def __init__(self, role: str, *args: str, port: int | None = None):
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "specdec.cli", "serve", role, "--host", "127.0.0.1", "--port", str(self.port),
               "--grace", "5", *args]
        self.log = open(ROOT / ".cache" / f"test-{role}-{self.port}.log", "w") if (ROOT / ".cache").is_dir() else None
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_serving(self.address, self.proc)

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log:
            self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def hf_target():
    from specdec import models

    return models.load_hf_model(models.DEFAULT_TARGET)


@pytest.fixture(scope="session")
def tokenizer():
    from specdec import models

    return models.load_tokenizer(models.DEFAULT_TARGET)


@pytest.fixture(scope="session")
def chat_prompts():
    import json

    return [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
