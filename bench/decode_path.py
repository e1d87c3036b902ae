"""Where the time of one generated token goes: speculation off, one user, the decode path timed layer by layer in
one run, on the same model and the same prompts.

Layers, each one the layer before plus what it names:
 1. engine     LlamaEngine.forward_flat on one row of one token, back to back, results never read (on CUDA: one
               synchronize after the run, CUDA events around it): the device floor of our engine as Python drives it
               (forward_flat's own host work, packing inputs and copying them in, included).
 2. loop       + the greedy pick (argmax on the device) and its host copy every token: a decode loop in one
               process, the engine's own, no scheduler.
 3. scheduler  the verifier's Scheduler in this process, through VerifierService.Decode's own code (open, then one
               empty block per token; protobuf in and out) with no gRPC under it.
 4. grpc       the verifier as its own `specdec serve verifier` process, VerifierService.Decode over loopback gRPC.
 5. stack      router + verifier processes (started as `specdec bench` starts them), Generate through the SDK
               (specdec.client.AsyncClient) with speculation off.

Per token means the decode steps after the first token (which the prefill makes): (time the last token arrived -
time the first arrived) / (tokens - 1). Layer 1 runs the same number of steps at the same positions with the
tokens layer 2 produced. For each layer: ms/token is the median over prompts (of every `--repeats` pass),
tokens/s is 1000 / that median, and "adds" is its ms/token minus the layer before's: what that layer costs per
token; "paired" is the median over prompts of that difference taken prompt by prompt (steadier on a noisy
machine), and min-max how far apart the prompts were (so which differences are noise). Layers run
interleaved, prompt by prompt (2, 1, 3, 4, 5), so a machine that changes speed mid-run moves them alike;
`--warmup` untimed passes over every prompt and layer come first (they capture the CUDA graphs of every
KV-length bucket, and compile).
All torch work of this process runs on specdec.compute's one torch thread, as in the servers. Greedy; every layer
must produce layer 2's tokens (checked and reported). Beside the layers (`--chunk-steps N`, default 8): the same
steps through engine.decode_greedy, N steps a call, as the verifier's greedy decode chunks run them: the engine
without the host between steps.

CPU (the figures in docs/benchmarks.md):
    .venv/bin/python bench/decode_path.py --max-new-tokens 32 --prompt-count 3 --repeats 3 \\
        --out bench/results/decode-path-cpu
GPU (default target staged as a GGUF file):
    python bench/decode_path.py --device cuda:0 --compile yes --target /root/m/smollm2.gguf --max-new-tokens 128 \\
        --prompt-count 8 --out $OUT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("SPECDEC_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".cache"))

import torch  # noqa: E402

from specdec import compute  # noqa: E402
from specdec.bench import DEFAULT_PROMPTS, load_prompts, start_router_process, start_verifier_process  # noqa: E402
from specdec.engine import Row  # noqa: E402
from specdec.models import DEFAULT_TARGET  # noqa: E402

LAYERS = {
    "engine": "engine step alone (forward_flat, back to back)",
    "loop": "+ greedy pick and host copy per token (one process)",
    "scheduler": "verifier Scheduler in-process (Decode path, no gRPC)",
    "grpc": "verifier process, VerifierService.Decode over gRPC",
    "stack": "router + verifier processes, SDK Generate",
}


@dataclass
class Run:
    """One prompt through one layer."""

    tokens: list[int]  # generated, the prefill's first token included, EOS not
    first_token_s: float | None  # request start -> first token (None for layer 1: its prefill is untimed)
    decode_s: float  # first token -> last token
    decode_tokens: int  # tokens in decode_s (normally len(tokens) - 1)
    device_s: float | None = None  # layer 1 on CUDA: the same span measured with CUDA events

    @property
    def ms_per_token(self) -> float | None:
        return 1000 * self.decode_s / self.decode_tokens if self.decode_tokens else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- layers 1 and 2: the engine, on the torch thread ---------------------------------------------------------------
def engine_loop(engine, cache, prompt_ids: list[int], max_new_tokens: int, eos_ids: frozenset[int]) -> Run:
    """Layer 2: prefill, then one forward_flat per token, each pick read back to choose the next input."""
    slot = cache.allocate()
    try:
        with torch.inference_mode():
            start = time.perf_counter()
            token = int(engine.forward(cache, [Row(slot, 0, list(prompt_ids))])[0][-1].argmax())
            first = last = time.perf_counter()
            tokens = [] if token in eos_ids else [token]
            while tokens and token not in eos_ids and len(tokens) < max_new_tokens:
                # The row the scheduler builds for a plain decode step: the last token at its position, all logits.
                row = Row(slot, len(prompt_ids) + len(tokens) - 1, [token], True)
                logits, _ = engine.forward_flat(cache, [row])
                token = int(logits[-1].argmax())  # the host copy: waits for the pass
                if token not in eos_ids:
                    tokens.append(token)
                    last = time.perf_counter()
        return Run(tokens, first - start, last - first, max(len(tokens) - 1, 0))
    finally:
        cache.release(slot)


def engine_steps(engine, cache, prompt_ids: list[int], tokens: list[int]) -> Run:
    """Layer 1: after an untimed prefill, the decode passes of `tokens` at their positions, none of them read."""
    slot = cache.allocate()
    try:
        engine.forward(cache, [Row(slot, 0, list(prompt_ids))])
        rows = [[Row(slot, len(prompt_ids) + i, [t], True)] for i, t in enumerate(tokens[:-1])]
        cuda = engine.device.type == "cuda"
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else None
        _sync(engine.device)
        start = time.perf_counter()
        if events:
            events[0].record()
        for row in rows:
            engine.forward_flat(cache, row)
        if events:
            events[1].record()
        _sync(engine.device)
        wall = time.perf_counter() - start
        device_s = events[0].elapsed_time(events[1]) / 1000 if events else None
        return Run(list(tokens), None, wall, len(rows), device_s)
    finally:
        cache.release(slot)


def engine_chunks(engine, cache, prompt_ids: list[int], tokens: list[int], chunk: int) -> Run:
    """Beside the layers: after an untimed prefill, the same decode steps as layer 1 through engine.decode_greedy,
    `chunk` steps a call (what the scheduler's greedy decode chunks run), each call's tokens read back: the
    engine's per-token time without the host between steps."""
    slot = cache.allocate()
    try:
        engine.forward(cache, [Row(slot, 0, list(prompt_ids))])
        out, steps = [tokens[0]], len(tokens) - 1
        _sync(engine.device)
        start = time.perf_counter()
        while len(out) <= steps:
            n = min(chunk, steps + 1 - len(out))
            out += engine.decode_greedy(cache, [Row(slot, len(prompt_ids) + len(out) - 1, [out[-1]])], n)[0]
        return Run(out, None, time.perf_counter() - start, steps)
    finally:
        cache.release(slot)


# -- layers 3 to 5: streams of committed tokens ----------------------------------------------------------------------
async def timed_stream(open_stream, ids_of) -> Run:
    """Times a stream of messages carrying committed tokens. open_stream() starts the call (timed from there);
    ids_of(message) reads a message's token ids."""
    start = time.perf_counter()
    first = last = None
    tokens: list[int] = []
    first_tokens = 0
    async for message in open_stream():
        ids = list(ids_of(message))
        if not ids:
            continue
        now = time.perf_counter()
        if first is None:
            first, first_tokens = now, len(ids)
        last = now
        tokens.extend(ids)
    if first is None:
        return Run([], time.perf_counter() - start, 0.0, 0)
    return Run(tokens, first - start, last - first, len(tokens) - first_tokens)


class _InProcessContext:
    """What VerifierServicer.Decode reads of its grpc.aio context, so it can run with no gRPC under it."""

    def invocation_metadata(self):
        return ()

    async def abort(self, code, details):
        raise RuntimeError(f"Decode failed: {code.name}: {details}")


def decode_request(session_id: str, prompt_ids: list[int], max_new_tokens: int):
    from specdec.proto import session_pb2, verifier_pb2

    spec = session_pb2.SessionSpec(session_id=session_id, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
                                   temperature=0.0)
    return verifier_pb2.DecodeRequest(session=spec)


# -- the run ---------------------------------------------------------------------------------------------------------
class DecodePath:
    """Everything the five layers need, started once: the in-process scheduler (whose engine and KV cache layers 1
    and 2 use too), the verifier and router processes, and their clients."""

    def __init__(self, args, out: Path):
        self.args = args
        self.out = out
        self.started: list = []
        self.counter = 0

    async def start(self) -> None:
        import grpc

        from specdec.client import AsyncClient
        from specdec.proto import verifier_pb2_grpc
        from specdec.server import CHANNEL_OPTIONS
        from verifier_service.app import build_scheduler
        from verifier_service.service import VerifierServicer

        a = self.args
        print(f"loading {a.target} on {a.device} in this process...", flush=True)
        # The same builder as `specdec serve verifier`; 2 slots: one for the scheduler's session, one for layers 1-2.
        self.scheduler = await compute.run(build_scheduler, a.target, a.device, 2, a.max_sequence_length, 16, 0, None,
                                           a.decode_chunk_ms, a.decode_ahead_steps)
        self.scheduler.start()
        self.servicer = VerifierServicer(self.scheduler, a.target)
        print("starting verifier and router processes...", flush=True)
        verifier = start_verifier_process(a.target, a.device, 2, a.max_sequence_length, 0, self.out / "verifier.log")
        self.started.append(verifier)
        self.started.append(start_router_process(verifier.address, [], a.target, self.out / "router.log"))
        self.channel = grpc.aio.insecure_channel(verifier.address, options=CHANNEL_OPTIONS)
        self.verifier = verifier_pb2_grpc.VerifierServiceStub(self.channel)
        self.client = AsyncClient(self.started[-1].address)

    async def stop(self) -> None:
        for closer in (getattr(self, "client", None), getattr(self, "channel", None)):
            if closer is not None:
                await closer.close()
        if getattr(self, "scheduler", None) is not None:
            await self.scheduler.stop()
        for proc in reversed(self.started):
            proc.stop()

    def _session_id(self) -> str:
        self.counter += 1
        return f"decode-path-{self.counter}"

    async def one_prompt(self, messages: list[dict], prompt_ids: list[int]) -> dict[str, Run]:
        """Every layer on one prompt, in the order 2, 1, 3, 4, 5 (layer 1 replays layer 2's tokens)."""
        n = self.args.max_new_tokens
        engine, cache = self.scheduler.engine, self.scheduler.cache
        runs = {"loop": await compute.run(engine_loop, engine, cache, prompt_ids, n, self.scheduler.eos_ids)}
        runs["engine"] = await compute.run(engine_steps, engine, cache, prompt_ids, runs["loop"].tokens)
        if self.args.chunk_steps:
            runs["chunks"] = await compute.run(engine_chunks, engine, cache, prompt_ids, runs["loop"].tokens,
                                               self.args.chunk_steps)
        request = decode_request(self._session_id(), prompt_ids, n)
        runs["scheduler"] = await timed_stream(lambda: self.servicer.Decode(request, _InProcessContext()),
                                               lambda m: m.update.token_ids)
        request = decode_request(self._session_id(), prompt_ids, n)
        runs["grpc"] = await timed_stream(lambda: self.verifier.Decode(request), lambda m: m.update.token_ids)
        runs["stack"] = await timed_stream(
            lambda: self.client.generate(chat=messages, max_new_tokens=n, temperature=0.0, max_draft_tokens=0),
            lambda m: m.token_ids)
        return runs


async def measure(args, out: Path, prompts: list[list[dict]], prompt_ids: list[list[int]]) -> list[dict[str, Run]]:
    path = DecodePath(args, out)
    try:
        await path.start()
        for w in range(args.warmup):
            print(f"warm-up pass {w + 1}/{args.warmup} over {len(prompts)} prompts...", flush=True)
            for messages, ids in zip(prompts, prompt_ids):
                await path.one_prompt(messages, ids)
        results = []
        for repeat in range(args.repeats):
            for i, (messages, ids) in enumerate(zip(prompts, prompt_ids)):
                runs = await path.one_prompt(messages, ids)
                results.append(runs)
                print(f"prompt {i}" + (f" (round {repeat + 1})" if args.repeats > 1 else "") + ": "
                      + "  ".join(f"{name} {_fmt(r.ms_per_token)} ms" for name, r in runs.items()), flush=True)
        return results
    finally:
        await path.stop()


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summarize(results: list[dict[str, Run]]) -> list[dict]:
    rows, previous, before = [], None, None
    for number, (name, description) in enumerate(LAYERS.items(), start=1):
        per_prompt = [r[name].ms_per_token for r in results if r[name].ms_per_token is not None]
        ms = statistics.median(per_prompt) if per_prompt else None
        device = [1000 * r[name].device_s / r[name].decode_tokens for r in results
                  if r[name].device_s is not None and r[name].decode_tokens]
        first = [r[name].first_token_s for r in results if r[name].first_token_s is not None]
        # The same prompt of the same pass ran through both layers one after the other: the median of those
        # differences cancels what drifts between prompts and passes.
        paired = [] if before is None else [
            r[name].ms_per_token - r[before].ms_per_token for r in results
            if r[name].ms_per_token is not None and r[before].ms_per_token is not None]
        rows.append({
            "layer": number, "name": name, "description": description,
            "ms_per_token": ms and round(ms, 3),
            "tokens_per_s": ms and round(1000 / ms, 1),
            "adds_ms_per_token": None if ms is None or previous is None else round(ms - previous, 3),
            "adds_ms_per_token_paired": round(statistics.median(paired), 3) if paired else None,
            "ms_per_token_range": [round(min(per_prompt), 3), round(max(per_prompt), 3)] if per_prompt else None,
            "first_token_ms_median": round(1000 * statistics.median(first), 2) if first else None,
            "device_ms_per_token": round(statistics.median(device), 3) if device else None,
            "per_prompt_ms_per_token": [p and round(p, 3) for p in (r[name].ms_per_token for r in results)],
            "tokens_equal_to_loop": all(r[name].tokens == r["loop"].tokens for r in results),
        })
        previous, before = ms, name
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'layer':<58} {'ms/token':>9} {'tokens/s':>9} {'adds ms':>8} {'paired':>7} {'min-max ms':>15}  "
          "same tokens")
    for row in rows:
        label = f"{row['layer']}. {row['description']}"
        spread = "-" if row["ms_per_token_range"] is None else "{:.2f}-{:.2f}".format(*row["ms_per_token_range"])
        print(f"{label:<58} {_fmt(row['ms_per_token']):>9} {_fmt(row['tokens_per_s'], 1):>9} "
              f"{_fmt(row['adds_ms_per_token']):>8} {_fmt(row['adds_ms_per_token_paired']):>7} {spread:>15}  "
              f"{'yes' if row['tokens_equal_to_loop'] else 'NO'}")
    device = rows[0]["device_ms_per_token"]
    if device is not None:
        print(f"(layer 1 by CUDA events: {device:.3f} ms/token)")



def summarize_chunks(results: list[dict[str, Run]], chunk: int) -> dict | None:
    per_prompt = [r["chunks"].ms_per_token for r in results if "chunks" in r and r["chunks"].ms_per_token]
    if not per_prompt:
        return None
    ms = statistics.median(per_prompt)
    row = {"chunk_steps": chunk, "ms_per_token": round(ms, 3), "tokens_per_s": round(1000 / ms, 1),
           "ms_per_token_range": [round(min(per_prompt), 3), round(max(per_prompt), 3)],
           "tokens_equal_to_loop": all(r["chunks"].tokens == r["loop"].tokens for r in results)}
    print(f"(beside the layers: engine.decode_greedy, {chunk} steps a call: {ms:.3f} ms/token, "
          f"{1000 / ms:.1f} tokens/s, same tokens as layer 2: {'yes' if row['tokens_equal_to_loop'] else 'NO'})")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="JSONL prompt set ({messages: [...]} a line)")
    parser.add_argument("--prompt-count", type=int, default=3, help="the first N prompts of the set")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="torch device of the engine and the verifier, e.g. cuda:0")
    parser.add_argument("--compile", choices=("yes", "no"), default="no",
                        help="torch.compile the graphed pass (CUDA), here and in the verifier process")
    parser.add_argument("--target", default=DEFAULT_TARGET, help="target model SPEC")
    parser.add_argument("--max-sequence-length", type=int, default=2048, help="verifier context per session")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes over every prompt and layer first")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed passes over the prompts (medians are over every prompt of every pass)")
    parser.add_argument("--out", default=None, help="output directory (default out/decode-path-TIMESTAMP)")
    parser.add_argument("--chunk-steps", type=int, default=8,
                        help="also time engine.decode_greedy this many steps a call, beside the layers (0 = skip)")
    parser.add_argument("--decode-chunk-ms", type=float, default=10.0,
                        help="the verifier's --decode-chunk-ms for layers 3-5 (0 = one token per tick)")
    parser.add_argument("--decode-ahead-steps", type=int, default=-1,
                        help="the verifier's --decode-ahead-steps for layers 3-5 (-1: its default for the device)")
    args = parser.parse_args()

    # One switch for every engine of the run: this process's reads it, the servers inherit it (their --compile).
    os.environ["SPECDEC_COMPILE"] = args.compile
    os.environ["SPECDEC_DECODE_CHUNK_MS"] = str(args.decode_chunk_ms)  # the verifier process reads its flag here
    os.environ["SPECDEC_DECODE_AHEAD_STEPS"] = str(args.decode_ahead_steps)
    out = Path(args.out or f"out/decode-path-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    compute.set_threads()  # as the servers size theirs: the CPU limit

    from router.service import chat_ids
    from specdec import models

    prompts = load_prompts(Path(args.prompts))[: args.prompt_count]
    tokenizer = models.load_tokenizer(args.target)
    prompt_ids = [chat_ids(tokenizer, messages) for messages in prompts]
    results = asyncio.run(measure(args, out, prompts, prompt_ids))
    rows = summarize(results)
    print_table(rows)
    chunks = summarize_chunks(results, args.chunk_steps)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": compute.call(torch.get_num_threads),
                    "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"},
        "settings": vars(args),
        "prompt_tokens": [len(ids) for ids in prompt_ids],
        "layers": rows,
        "engine_chunks": chunks,
        "runs": [{name: asdict(run) for name, run in runs.items()} for runs in results],
    }
    (out / "decode_path.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'decode_path.json'}")
    return 0 if all(row["tokens_equal_to_loop"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
