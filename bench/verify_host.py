"""Host time of one verifier verify tick, with the model's compute made negligible: a 1-layer, 64-wide Llama with
a 1,024-token vocabulary, on CPU. What is left is the scheduler's and the engine's per-row Python and tensor
bookkeeping, the same code that runs between GPU passes. Prints milliseconds per tick at each batch size, and
how much of it packing the pass's inputs (specdec.engine._pack) takes.

    .venv/bin/python bench/verify_host.py --batches 1,64,256 --k 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from specdec.engine import LlamaEngine, Row, _pack  # noqa: E402
from specdec.sampling import SamplingConfig  # noqa: E402
from verifier_service.scheduler import Scheduler, _Work  # noqa: E402
from verifier_service.session import Session, SessionSettings  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--ticks", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    engine = LlamaEngine(transformers.LlamaForCausalLM(config).eval())

    async def run(batch: int) -> float:
        scheduler = Scheduler(engine, frozenset({1023}), max_sessions=batch, max_sequence_length=512)
        greedy = SamplingConfig(temperature=0.0)
        works = []
        for b in range(batch):
            settings = SessionSettings(f"s{b}", list(range(2, 34)), 400, greedy)
            session = Session(settings, scheduler.cache.allocate(), 400, scheduler.eos_ids)
            scheduler.sessions[session.id] = session
            works.append(session)
        scheduler._tick([_Work(s, None) for s in works])  # prefill
        times = []
        for _ in range(args.ticks):
            batch_work = [_Work(s, None, [5] * args.k) for s in works]  # rejected at once: sessions stay short
            started = time.perf_counter()
            scheduler._tick(batch_work)
            times.append((time.perf_counter() - started) * 1e3)
            for s in works:  # roll back to the prompt + first token so every tick is alike
                del s.tokens[33:]
        return statistics.median(times)

    for batch in (int(b) for b in args.batches.split(",")):
        print(f"batch {batch:4d}, {args.k} draft tokens per row: {asyncio.run(run(batch)):.2f} ms per verify tick, "
              f"{time_pack(batch, args.k + 1):.3f} ms of it packing the pass's inputs")
    return 0


def time_pack(batch: int, width: int, runs: int = 50) -> float:
    """Median milliseconds of specdec.engine._pack for `batch` rows of `width` tokens."""
    rows = [Row(b, 300 + b, list(range(100, 100 + width))) for b in range(batch)]
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        _pack(rows, batch, width, batch)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


if __name__ == "__main__":
    sys.exit(main())
