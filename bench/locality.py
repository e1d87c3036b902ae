"""KV-cache locality benchmark: four verifier processes behind one router, routed locality-aware, round-robin and
random, on a workload of multi-turn conversations and of requests sharing long system prompts.

    .venv/bin/python bench/locality.py [--verifiers 4] [--conversations 8] [--turns 4] [--shared 3x8]
        [--workload own|common] [--out DIR]

Starts a redis-server and the verifiers once (each with its prefix cache, publishing to Redis), then for each
policy a router (`--routing POLICY`) and the same workload, salted per policy so no policy reuses another's
cache. Speculation is off (no drafter) so the numbers are about prefill and routing alone.

Per policy: prefix-cache hit rate (cached prompt tokens / prompt tokens, from `usage.cached_prompt_tokens`), the
ideal hit rate (every request sent where its longest already-computed prefix is: prompts of requests that had
their first token before it started, and the full text of those that had finished), time to first token p50/p99,
aggregate tokens/s, and requests per verifier (max / mean). Writes JSON and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specdec import models  # noqa: E402
from specdec.launch import ServerProcess, free_port  # noqa: E402

TOPICS = ["volcanoes", "bees", "tides", "glaciers", "comets", "coral reefs", "deserts", "rainforests", "owls",
          "bridges", "compilers", "trains", "bread", "chess", "batteries", "clouds"]
SYSTEM_PROMPTS = [
    "You are the support assistant of a company that sells garden tools. {pad} Policies: refunds within 30 days "
    "with a receipt; repairs free for two years; no shipping outside the country. Be brief and polite.",
    "You are a tutor for high-school physics. {pad} Always state the principle first, then one worked example, "
    "then a check question. Use SI units. Never give the final answer to homework directly.",
    "You are a travel planner for rail trips across Europe. {pad} Prefer night trains, list at most three "
    "options, give durations and one sentence on each. Mention reservations where they are compulsory.",
]
PAD = ("Read these instructions carefully and follow them in every answer, whatever the user asks, and keep the "
       "tone friendly, plain and precise. ") * 8


@dataclass
class Result:
    policy: str
    kind: str
    prompt: list[int]
    completion: list[int]
    cached: int
    verifier: str
    start: float
    first: float
    end: float


def start_redis() -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


async def one(stub, policy, kind, prompt, max_new, pb) -> Result:
    start = time.perf_counter()
    first, completion, usage = None, [], None
    call = stub.Generate(pb.GenerateRequest(tokens=pb.TokenIds(ids=prompt),
                                            sampling=pb.SamplingParams(max_new_tokens=max_new),
                                            speculation=pb.SpeculationParams(max_draft_tokens=0)), timeout=300)
    async for chunk in call:
        first = first or time.perf_counter()
        completion.extend(chunk.token_ids)
        if chunk.finish_reason:
            usage = chunk.usage
    trailers = dict(await call.trailing_metadata())
    return Result(policy, kind, prompt, completion, usage.cached_prompt_tokens, trailers["x-specdec-verifier"],
                  start, first, time.perf_counter())


async def run_policy(router: str, policy: str, tokenizer, args) -> tuple[list[Result], float]:
    import grpc

    from router.service import chat_ids
    from specdec.proto import generation_pb2 as pb
    from specdec.proto import generation_pb2_grpc

    salt = f"[{policy} run]"
    rng = random.Random(0)
    results: list[Result] = []
    async with grpc.aio.insecure_channel(router) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)

        async def conversation(i: int):
            topic = TOPICS[i % len(TOPICS)]
            if args.workload == "own":  # each conversation its own context: a student's notes
                notes = "".join(f"Note {d} of student {i}: {topic} came up again today. " for d in range(12))
                system = f"{salt} You are the tutor of student {i}. {notes}"
            else:  # every conversation behind one common system prompt
                system = f"{salt} You are a patient tutor. {PAD}"
            messages = [{"role": "system", "content": system}]
            for turn in range(args.turns):
                messages.append({"role": "user", "content": f"Tell me fact number {turn + 1} about {topic}."})
                r = await one(stub, policy, "conversation", chat_ids(tokenizer, messages), args.max_new_tokens, pb)
                results.append(r)
                messages.append({"role": "assistant", "content": tokenizer.decode(r.completion)})
                await asyncio.sleep(rng.uniform(0, 0.2))  # the user reads, then types

        async def shared(i: int, j: int):
            system = SYSTEM_PROMPTS[i % len(SYSTEM_PROMPTS)].format(pad=PAD)
            if args.workload == "own":  # one system prompt per desk, however many desks
                system = f"Desk {i}. {system}"
            messages = [{"role": "system", "content": f"{salt} {system}"},
                        {"role": "user", "content": f"Question {j} from customer {rng.randrange(10**6)}."}]
            results.append(await one(stub, policy, "shared", chat_ids(tokenizer, messages), args.max_new_tokens, pb))

        n_prompts, per_prompt = (int(x) for x in args.shared.split("x"))
        jobs = [conversation(i) for i in range(args.conversations)]
        jobs += [shared(i, j) for j in range(per_prompt) for i in range(n_prompts)]
        order = list(range(len(jobs)))
        rng.shuffle(order)
        semaphore = asyncio.Semaphore(args.concurrency)

        async def limited(job, delay):
            await asyncio.sleep(delay)
            async with semaphore:
                await job

        start = time.perf_counter()
        await asyncio.gather(*(limited(jobs[k], 0.05 * n) for n, k in enumerate(order)))
        wall = time.perf_counter() - start
    return results, wall


def common_blocks(a: list[int], b: list[int], block: int = 16) -> int:
    n = 0
    while n + block <= min(len(a), len(b)) and a[n:n + block] == b[n:n + block]:
        n += block
    return n


def ideal_cached(results: list[Result]) -> int:
    total = 0
    for r in results:
        sources = [o.prompt for o in results if o is not r and o.first <= r.start]
        sources += [o.prompt + o.completion for o in results if o is not r and o.end <= r.start]
        best = max((common_blocks(r.prompt, s) for s in sources), default=0)
        total += min(best, len(r.prompt) - 1)
    return total


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(policy: str, results: list[Result], wall: float, verifiers: list[str]) -> dict:
    prompt_tokens = sum(len(r.prompt) for r in results)
    cached = sum(r.cached for r in results)
    per_pod = [sum(1 for r in results if r.verifier == v) for v in verifiers]
    ttft = [r.first - r.start for r in results]
    return dict(
        policy=policy, requests=len(results), prompt_tokens=prompt_tokens,
        hit_rate=round(cached / prompt_tokens, 3), ideal_hit_rate=round(ideal_cached(results) / prompt_tokens, 3),
        ttft_p50_ms=round(1000 * pct(ttft, 0.5), 1), ttft_p99_ms=round(1000 * pct(ttft, 0.99), 1),
        aggregate_tps=round(sum(len(r.completion) for r in results) / wall, 2), wall_s=round(wall, 1),
        requests_per_pod=per_pod, load_max_over_mean=round(max(per_pod) / statistics.mean(per_pod), 2),
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--verifiers", type=int, default=4)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--shared", default="3x8", help="system prompts x requests each")
    p.add_argument("--workload", choices=("own", "common"), default="own",
                   help="own: each conversation has its own context and each shared system prompt is distinct; "
                   "common: all conversations share one system prompt and shared prompts repeat every 3 (the "
                   "first runs' workload, where most of every prompt is cached on every pod whatever the routing)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at most")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--policies", default="locality,round-robin,random")
    p.add_argument("--prefix-cache-blocks", type=int, default=256)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per verifier (default: CPU cores / verifiers, at least 1)")
    p.add_argument("--out", default=None, help="directory for the JSON (default bench/results/locality-TIME)")
    args = p.parse_args()
    # Each verifier is a process with its own OpenMP team. Teams that together outnumber the cores spin against
    # each other at every parallel region: with --threads 2 on this 2-core machine, TTFT p50 was 7.6x and
    # throughput 6.4x worse than with 1 (docs/locality.md), which buries the prefill work that routing saves.
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.verifiers)

    os.environ.setdefault("SPECDEC_CACHE_DIR", str(ROOT / ".cache"))
    tokenizer = models.load_tokenizer(models.DEFAULT_TARGET)
    out = Path(args.out or ROOT / "bench" / "results" / f"locality-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    redis_proc, redis_url = start_redis()
    servers, rows = [], []
    try:
        verifiers = [ServerProcess("verifier", "--redis-url", redis_url, "--max-sessions", "8",
                                   "--prefix-cache-blocks", str(args.prefix_cache_blocks),
                                   "--threads", str(args.threads),
                                   log=out / f"verifier-{i}.log") for i in range(args.verifiers)]
        servers += verifiers
        addresses = [v.address for v in verifiers]
        for policy in args.policies.split(","):
            router = ServerProcess("router", *[a for v in addresses for a in ("--verifier", v)],
                                   "--redis-url", redis_url, "--routing", policy, log=out / f"router-{policy}.log")
            try:
                results, wall = asyncio.run(run_policy(router.address, policy, tokenizer, args))
            finally:
                router.stop()
            row = summarize(policy, results, wall, addresses)
            rows.append(row)
            print(json.dumps(row), flush=True)
            (out / f"requests-{policy}.json").write_text(json.dumps([asdict(r) for r in results]))
    finally:
        for s in servers:
            s.stop()
        redis_proc.terminate()
        redis_proc.wait()
    meta = dict(command="python bench/locality.py " + " ".join(sys.argv[1:]), cpus=os.cpu_count(), args=vars(args))
    (out / "locality.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print("\n| routing | hit rate | ideal | TTFT p50 ms | TTFT p99 ms | aggregate tok/s | requests per pod | max/mean |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['hit_rate']:.1%} | {r['ideal_hit_rate']:.1%} | {r['ttft_p50_ms']:.0f} | "
              f"{r['ttft_p99_ms']:.0f} | {r['aggregate_tps']:.1f} | {r['requests_per_pod']} | "
              f"{r['load_max_over_mean']} |")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
