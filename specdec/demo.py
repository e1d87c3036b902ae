"""`make demo`: start the all-in-one server, stream one chat generation, print its speed, stop the server.

Runs the same prompt with speculation on (default drafter) and off, so the two speeds sit side by side.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.client import Client

PROMPT = "Explain in a few sentences how a hash table works and why lookups are fast."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(address: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}; see its log above")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.3)
    raise SystemExit(f"the server did not start within {timeout} s")


def _run(client: Client, label: str, max_draft_tokens: int | None) -> None:
    print(f"\n--- {label} ---", flush=True)
    start = time.perf_counter()
    first = None
    tokens = 0
    for chunk in client.generate(chat=[{"role": "user", "content": PROMPT}], max_new_tokens=128,
                                 max_draft_tokens=max_draft_tokens):
        first = first or time.perf_counter()
        tokens += len(chunk.token_ids)
        print(chunk.text, end="", flush=True)
        usage = chunk.usage
    elapsed = time.perf_counter() - start
    tau = (usage.accepted_draft_tokens + usage.verify_steps) / max(usage.verify_steps, 1)
    print(f"\n[{label}] {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:.1f} tokens/s; "
          f"first token {1000 * (first - start):.0f} ms; mean accepted length tau {tau:.2f} "
          f"({usage.accepted_draft_tokens}/{usage.draft_tokens} draft tokens accepted)", flush=True)


def main() -> int:
    port = _free_port()
    address = f"127.0.0.1:{port}"
    print(f"starting `specdec serve --port {port}` (router + drafter + verifier, default models)...", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "specdec.cli", "serve", "--port", str(port)])
    try:
        _wait_serving(address, server)
        with Client(address) as client:
            print(f"prompt: {PROMPT}")
            _run(client, "speculation on", None)
            _run(client, "speculation off", 0)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
