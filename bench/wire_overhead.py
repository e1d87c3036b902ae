"""Wire overhead of one verify round trip: drafter -> verifier -> drafter over loopback gRPC, compute excluded.

A verifier stand-in in its own process answers every block on the real `VerifierService.Verify` bidi stream at
once (no model: the point is what the transport adds), with the servers' channel options. The client plays a
drafter: sends one 5-token block of one session, waits for its verdict, repeats. Reported: round-trip p50/p99/mean
in milliseconds, over `--rounds` after `--warmup`. The bar (issue #4) is p50 <= 1 ms.

    python bench/wire_overhead.py --rounds 5000 --json out/wire.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def serve(port: int, ready) -> None:
    import grpc

    from specdec.proto import session_pb2, verifier_pb2, verifier_pb2_grpc
    from specdec.server import SERVER_OPTIONS

    class Echo(verifier_pb2_grpc.VerifierServiceServicer):
        async def Verify(self, requests, context):
            async for request in requests:
                block = request.block
                update = session_pb2.SessionUpdate(
                    committed_length=block.committed_length + len(block.token_ids) + 1,
                    token_ids=list(block.token_ids) + [0])
                yield verifier_pb2.VerifyResponse(session_id=block.session_id, update=update,
                                                  accepted=len(block.token_ids))

    async def main():
        server = grpc.aio.server(options=SERVER_OPTIONS)
        verifier_pb2_grpc.add_VerifierServiceServicer_to_server(Echo(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


async def measure(port: int, rounds: int, warmup: int, k: int) -> list[float]:
    import grpc

    from specdec.proto import verifier_pb2, verifier_pb2_grpc
    from specdec.server import CHANNEL_OPTIONS

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        call = verifier_pb2_grpc.VerifierServiceStub(channel).Verify()
        times = []
        committed = 100
        for i in range(warmup + rounds):
            block = verifier_pb2.DraftBlock(session_id="s", committed_length=committed,
                                            token_ids=[1000 + j for j in range(k)])
            started = time.perf_counter()
            await call.write(verifier_pb2.VerifyRequest(block=block))
            reply = await call.read()
            elapsed = time.perf_counter() - started
            committed = reply.update.committed_length
            if i >= warmup:
                times.append(elapsed * 1e3)
        await call.done_writing()
        return times


def main() -> int:
    from specdec.launch import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--k", type=int, default=5, help="draft tokens per block")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    port = free_port()
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=serve, args=(port, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(60):
            raise SystemExit("the stand-in verifier did not start")
        times = asyncio.run(measure(port, args.rounds, args.warmup, args.k))
    finally:
        server.terminate()
    ordered = sorted(times)
    result = {
        "rounds": len(times), "k": args.k,
        "p50_ms": round(statistics.median(times), 3),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))], 3),
        "mean_ms": round(statistics.mean(times), 3),
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
