"""`specdec bench`: the benchmark sweep. Starts router, drafter(s) and verifier as separate processes (or uses a
running router), sweeps concurrency and modes over a prompt set, and writes JSON and a PNG plot.

Modes: `off` (speculation off: the verifier decodes alone), `ngram` (prompt lookup drafter) and `model` (a drafter
model, `--drafter-model`; `model=SPEC` names one and drafts what the verifier advises (chains, or trees where it
measured that they pay), `model=SPEC@4x4` drafts trees of that shape with it, `model=SPEC@off` chains). In the
same run it times transformers' own `generate` and assisted generation on the same models (`--baselines`), so each
table has its peers.

Reported per (mode, concurrency): per-user tokens/s (mean over requests of completion tokens / request time),
aggregate tokens/s (all tokens / wall time), time to first token p50/p99, inter-token latency p50/p99 (gaps
between streamed messages, per token), tau (tokens committed per verify step, bonus included), acceptance rate
by draft position, and drafter<->verifier bytes per committed token.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from specdec import settings
from specdec.cli import dtype_flag, flag
from specdec.models import DEFAULT_TARGET

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "bench" / "prompts" / "chat.jsonl"


@dataclass
class RequestResult:
    tokens: int
    seconds: float
    ttft: float
    gaps: list[float]  # per-token inter-token latencies
    draft_tokens: int
    accepted: int
    steps: int
    drafted_by_position: list[int]
    accepted_by_position: list[int]
    wire_bytes: int
    prompt: int = 0  # index in the prompt set
    token_ids: list[int] = field(default_factory=list)  # what the request generated (greedy: compared across modes)


@dataclass
class Row:
    mode: str
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    per_user_tps: float
    aggregate_tps: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    tau: float
    acceptance_by_position: list[float] = field(default_factory=list)
    wire_bytes_per_token: float = 0.0
    # CPU time (user + system, every thread) each process spent per committed token during the level: the bench's
    # client and, when this run started them, the router, the drafter and the verifier (torch work included)
    cpu_ms_per_token: dict[str, float] = field(default_factory=dict)
    # Losslessness in the stack, on this hardware (the sweep is greedy): requests whose tokens equal speculation off's
    # first answer to the same prompt, of those compared; and for the others the index of the first token that
    # differs (a verify pass and a decode step run different kernels: in bf16 a near-tie may round either way)
    same_as_off: int | None = None
    compared_with_off: int = 0
    first_differences: list[int] = field(default_factory=list)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def load_prompts(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text().splitlines() if line.strip()]


async def _one(client, messages, max_new_tokens, k) -> RequestResult:
    start = time.perf_counter()
    last = start
    first = None
    gaps: list[float] = []
    tokens = 0
    usage = None
    token_ids: list[int] = []
    async for chunk in client.generate(chat=messages, max_new_tokens=max_new_tokens, max_draft_tokens=k):
        now = time.perf_counter()
        n = len(chunk.token_ids)
        if first is None:
            first = now
        elif n:
            gaps.extend([(now - last) / n] * n)
        if n:
            last = now
        tokens += n
        token_ids.extend(chunk.token_ids)
        if chunk.finish_reason:
            usage = chunk.usage
    end = time.perf_counter()
    return RequestResult(
        tokens, end - start, (first or end) - start, gaps, usage.draft_tokens, usage.accepted_draft_tokens,
        usage.verify_steps, list(usage.drafted_by_position), list(usage.accepted_by_position),
        usage.draft_wire_bytes, token_ids=token_ids,
    )


async def run_level(address: str, prompts, concurrency: int, requests: int, max_new_tokens: int, k: int):
    from specdec.client import AsyncClient

    queue: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i % len(prompts))
    results: list[RequestResult] = []
    async with AsyncClient(address) as client:

        async def worker():
            while not queue.empty():
                prompt = queue.get_nowait()
                result = await _one(client, prompts[prompt], max_new_tokens, k)
                result.prompt = prompt
                results.append(result)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return results, wall


def summarize(mode: str, concurrency: int, results: list[RequestResult], wall: float) -> Row:
    tokens = sum(r.tokens for r in results)
    steps = sum(r.steps for r in results)
    drafted = _sum_lists([r.drafted_by_position for r in results])
    accepted = _sum_lists([r.accepted_by_position for r in results])
    gaps = [g for r in results for g in r.gaps]
    return Row(
        mode=mode,
        concurrency=concurrency,
        requests=len(results),
        tokens=tokens,
        wall_s=round(wall, 3),
        per_user_tps=round(statistics.mean(r.tokens / r.seconds for r in results), 2),
        aggregate_tps=round(tokens / wall, 2),
        ttft_p50_ms=round(1000 * _pct([r.ttft for r in results], 0.5), 1),
        ttft_p99_ms=round(1000 * _pct([r.ttft for r in results], 0.99), 1),
        itl_p50_ms=round(1000 * _pct(gaps, 0.5), 2),
        itl_p99_ms=round(1000 * _pct(gaps, 0.99), 2),
        tau=round((sum(r.accepted for r in results) + steps) / max(steps, 1), 3),
        acceptance_by_position=[round(a / d, 3) if d else 0.0 for a, d in zip(accepted, drafted)],
        wire_bytes_per_token=round(sum(r.wire_bytes for r in results) / max(tokens, 1), 1),
    )


def compare_with_off(levels: list[tuple[Row, list[RequestResult]]]) -> None:
    """Fills each row's same_as_off, compared_with_off and first_differences: every request against speculation
    off's first answer to its prompt (the first level that ran off; requests whose prompt off did not answer are
    not compared, nor the answers that are the reference). Nothing without an `off` row."""
    reference: dict[int, RequestResult] = {}
    for row, results in levels:
        if row.mode == "off":
            for result in results:
                reference.setdefault(result.prompt, result)
            break
    if not reference:
        return
    for row, results in levels:
        row.same_as_off, row.compared_with_off, row.first_differences = 0, 0, []
        for result in results:
            want = reference.get(result.prompt)
            if want is None or want is result:
                continue
            row.compared_with_off += 1
            got = result.token_ids
            if got == want.token_ids:
                row.same_as_off += 1
            else:
                row.first_differences.append(
                    next((i for i, (a, b) in enumerate(zip(got, want.token_ids)) if a != b),
                         min(len(got), len(want.token_ids))))


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process so far, all its threads (this process when pid is None); Linux's
    /proc for another process (0.0 where it cannot be read)."""
    if pid is None:
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def cpu_ms_per_token(before: dict[str, float], pids: dict[str, int | None], tokens: int) -> dict[str, float]:
    """CPU milliseconds each process (by tier) spent per committed token since `before` (their cpu_seconds)."""
    return {tier: round(1000 * (cpu_seconds(pid) - before[tier]) / max(tokens, 1), 3) for tier, pid in pids.items()}


def _sum_lists(lists: list[list[int]]) -> list[int]:
    n = max((len(x) for x in lists), default=0)
    return [sum(x[i] for x in lists if i < len(x)) for i in range(n)]


def hf_baselines(target: str, drafter: str | None, prompts, n: int, max_new_tokens: int, k: int, device: str):
    """transformers' generate, prompt-lookup and (with a drafter model) assisted generation, one user, greedy."""
    from router.service import chat_ids
    from specdec import models

    tokenizer = models.load_tokenizer(target)
    model = models.load_hf_model(target, device=device)
    assistant = None
    if drafter and drafter != "ngram":
        assistant = _hf_drafter(drafter, target, device)
    variants = {"transformers generate": {}, "transformers prompt lookup": {"prompt_lookup_num_tokens": k}}
    if assistant is not None:
        variants["transformers assisted generation"] = {"assistant_model": assistant}
    out = {}
    for name, extra in variants.items():
        tokens, seconds = 0, 0.0
        for messages in prompts[:n]:
            ids = torch.tensor([chat_ids(tokenizer, messages)], device=device)
            start = time.perf_counter()
            generated = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, **extra)
            seconds += time.perf_counter() - start
            tokens += generated.shape[1] - ids.shape[1]
        out[name] = round(tokens / seconds, 2)
        print(f"  {name}: {out[name]} tokens/s ({n} prompts)", flush=True)
    return out


def _assistant_spec(args, modes: list[str]) -> str | None:
    """The drafter of the run that transformers can assist with: the first token-level one (a feature drafter
    reads the target's hidden states, which transformers' assisted generation does not hand out)."""
    from specdec import models
    from specdec.feature_drafter import is_feature_drafter

    specs = [mode_drafter(m, args.drafter_model) for m in modes if m.startswith("model")]
    return next((s for s in specs if s and not is_feature_drafter(models.resolve_drafter(s)[0])), None)


def _hf_drafter(spec: str, target: str, device: str):
    """The drafter as a transformers model, for assisted generation (a reduced draft head cannot be used there)."""
    from specdec import models
    from specdec.drafter_model import is_drafter_artifact, load_drafter

    path, _ = models.resolve_drafter(spec)
    if is_drafter_artifact(path):
        model = load_drafter(path, target, device=device).eval()
        if getattr(model, "draft_vocab", None) is not None:
            # transformers' assistant must score the full vocabulary: ids outside the draft head get -inf,
            # which leaves the drafter's greedy choices exactly as in specdec
            model.lm_head = _FullVocabularyHead(model.lm_head, model.draft_vocab.to(device), model.config.vocab_size)
        return model
    return models.load_hf_model(path, device=device)


class _FullVocabularyHead(torch.nn.Module):
    def __init__(self, head, draft_vocab, vocab_size: int):
        super().__init__()
        self.head, self.draft_vocab, self.vocab_size = head, draft_vocab, vocab_size

    def forward(self, hidden):  # [..., hidden] -> [..., vocab_size]
        reduced = self.head(hidden)
        full = reduced.new_full((*reduced.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.draft_vocab, reduced)


def plot(rows: list[Row], baselines: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in dict.fromkeys(r.mode for r in rows):
        mine = [r for r in rows if r.mode == mode]
        xs = [r.concurrency for r in mine]
        left.plot(xs, [r.per_user_tps for r in mine], marker="o", label=mode)
        right.plot(xs, [r.aggregate_tps for r in mine], marker="o", label=mode)
    for name, tps in baselines.items():
        left.axhline(tps, linestyle=":", linewidth=1, color="gray")
        left.annotate(name, (1, tps), fontsize=7, color="gray")
    for ax, title in ((left, "per-user tokens/s"), (right, "aggregate tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent users")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def start_verifier_process(target: str, device: str, max_sessions: int, max_sequence_length: int,
                           prefix_cache_blocks: int, log: Path, modes: list[str] = (),
                           default_drafter: str | None = None):
    """`specdec serve verifier` in its own process (compilation follows SPECDEC_COMPILE, which it inherits), its
    graphs for the hidden states the modes' drafters read captured before serving, as a deployment's would be."""
    from specdec.drafter_model import feature_layers
    from specdec.launch import ServerProcess

    layers = {tuple(found) for m in modes if (found := feature_layers(mode_drafter(m, default_drafter)))}
    warm = ["--graph-warmup-feature-layers", ";".join(",".join(map(str, t)) for t in sorted(layers))] if layers else []
    return ServerProcess("verifier", "--model", target, "--device", device, "--max-sessions", str(max_sessions),
                         "--max-sequence-length", str(max_sequence_length),
                         # 0 = off: a run sends the same prompts to this one verifier again and again (every mode,
                         # every warm-up), and with the cache on the later ones would prefill from cache.
                         "--prefix-cache-blocks", str(prefix_cache_blocks), *warm, log=log)


def mode_drafter(mode: str, default_drafter: str | None = None) -> str | None:
    """The drafter SPEC of a mode: None for `off`, `ngram`, or model[=SPEC] (SPEC defaults to default_drafter)
    without its @BRANCHxBEAM tree shape."""
    if mode == "off":
        return None
    spec = "ngram" if mode == "ngram" else mode.partition("=")[2] or default_drafter
    return spec and spec.partition("@")[0]


def start_router_process(verifier_address: str, drafter_flags: list[str], target: str, log: Path):
    """`specdec serve router` in its own process; drafter_flags: ["--drafter", ADDR, ...], or none (no speculation)."""
    from specdec.launch import ServerProcess

    return ServerProcess("router", "--verifier", verifier_address, *drafter_flags, "--model", target, log=log)


def start_drafter_process(mode: str, target: str, device: str, max_sessions: int, prefix_cache_blocks: int,
                          log: Path, default_drafter: str | None = None):
    """`specdec serve drafter` for a speculating mode, in its own process: `ngram`, or `model[=SPEC[@BRANCHxBEAM]]`
    (its own drafter, with draft trees of that shape; SPEC defaults to default_drafter)."""
    from specdec.launch import ServerProcess

    spec = mode_drafter(mode, default_drafter)
    tree = mode.partition("@")[2]
    return ServerProcess("drafter", "--model", spec, "--target", target, *(["--draft-tree", tree] if tree else []),
                         "--device", device, "--max-sessions", str(max_sessions),
                         *(["--prefix-cache-blocks", str(prefix_cache_blocks)] if spec != "ngram" else []), log=log)


def report_phases(logs: list[Path]) -> dict[str, dict]:
    """Prints and returns the phases each server logged when it stopped (specdec.phases): where its rounds went,
    over its whole life (a process serving several levels sums them)."""
    from specdec.phases import read_summaries

    found: dict[str, dict] = {}
    for log in logs:
        for tier, summary in (read_summaries(log.read_text()) if log.exists() else {}).items():
            kept = found.setdefault(log.stem, {})  # a process logs its tier's phases and its collections' (-gc)
            kept.update({phase: t for phase, t in summary.items() if phase != "counters"})
            kept.setdefault("counters", {}).update(summary.get("counters", {}))
            print(f"{log.stem} ({tier}) phases, ms mean / p50 / p90 / p99 (n):")
            for phase, t in summary.items():
                if phase != "counters":
                    print(f"  {phase:>17}: {t['mean_ms']:8.2f} {t['p50_ms']:8.2f} {t['p90_ms']:8.2f} "
                          f"{t['p99_ms']:8.2f}  ({t['n']})")
            if summary.get("counters"):
                print(f"  counters: {summary['counters']}")
    return found


def run(args) -> int:
    prompts = load_prompts(Path(args.prompts))
    levels = [int(c) for c in args.concurrency.split(",")]
    modes = args.modes.split(",")
    if "model" in modes and not args.drafter_model:
        raise SystemExit("mode `model` needs --drafter-model SPEC")
    out = Path(args.out or f"out/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    levels_run: list[tuple[Row, list[RequestResult]]] = []  # every row with its requests, for compare_with_off
    started: list = []
    pids: dict[str, dict[str, int]] = {m: {} for m in modes}  # per mode: the processes serving it, by tier
    try:
        routers: dict[str, str] = {}
        if args.address:
            routers = {m: args.address for m in modes}
        else:
            print("starting verifier...", flush=True)
            slots = max(*levels, min(args.warmup, 4))  # the warm-up's concurrency too
            verifier = start_verifier_process(args.target, args.verifier_device, slots,
                                              args.max_sequence_length, args.prefix_cache_blocks, out / "verifier.log",
                                              modes, args.drafter_model)
            started.append(verifier)
            for mode in modes:
                drafters = []
                if mode != "off":
                    # `model=SPEC` names its own drafter, so one run can compare several
                    print(f"starting {mode} drafter...", flush=True)
                    drafter = start_drafter_process(mode, args.target, args.drafter_device, slots,
                                                    args.prefix_cache_blocks,
                                                    out / f"drafter-{mode.replace('/', '_')}.log", args.drafter_model)
                    started.append(drafter)
                    drafters = ["--drafter", drafter.address]
                router = start_router_process(verifier.address, drafters, args.target,
                                              out / f"router-{mode.replace('/', '_')}.log")
                started.append(router)
                routers[mode] = router.address
                pids[mode] = {"router": router.proc.pid, "verifier": verifier.proc.pid}
                if drafters:
                    pids[mode]["drafter"] = drafter.proc.pid
        for mode in modes:  # first passes capture CUDA graphs (and compile): keep them out of the figures
            if args.warmup:
                print(f"warming up {mode}...", flush=True)
                asyncio.run(run_level(routers[mode], prompts, min(args.warmup, 4), args.warmup, 16,
                                      0 if mode == "off" else args.k))
        for concurrency in levels:
            for mode in modes:
                requests = max(args.requests or len(prompts), concurrency)
                k = 0 if mode == "off" else args.k
                tiers = {"client": None, **pids[mode]}
                cpu_before = {tier: cpu_seconds(pid) for tier, pid in tiers.items()}
                results, wall = asyncio.run(
                    run_level(routers[mode], prompts, concurrency, requests, args.max_new_tokens, k)
                )
                row = summarize(mode, concurrency, results, wall)
                row.cpu_ms_per_token = cpu_ms_per_token(cpu_before, tiers, row.tokens)
                rows.append(row)
                levels_run.append((row, results))
                print(f"{mode:>6} x{concurrency:<4} per-user {row.per_user_tps:8.1f} tok/s  aggregate "
                      f"{row.aggregate_tps:8.1f} tok/s  TTFT p50 {row.ttft_p50_ms:7.1f} ms  ITL p50 "
                      f"{row.itl_p50_ms:6.2f} ms p99 {row.itl_p99_ms:6.2f} ms  tau {row.tau:5.2f}  accept@pos "
                      f"{row.acceptance_by_position}  wire {row.wire_bytes_per_token} B/tok  CPU ms/tok "
                      + " ".join(f"{tier} {ms}" for tier, ms in row.cpu_ms_per_token.items()), flush=True)
    finally:
        for proc in reversed(started):
            proc.stop()
    compare_with_off(levels_run)
    report_agreement(rows, settings.dtype_name(args.verifier_device))
    phases = report_phases(sorted(out.glob("*.log")))
    baselines = {}
    _write_report(args, out, rows, baselines, phases)  # the sweep is kept even if a baseline fails below
    if args.baselines:
        print("transformers baselines (one user, greedy, in this process):", flush=True)
        drafter = _assistant_spec(args, modes)
        baselines = hf_baselines(args.target, drafter, prompts, args.baseline_prompts, args.max_new_tokens, args.k,
                                 args.verifier_device)
    _write_report(args, out, rows, baselines, phases)
    try:
        plot(rows, baselines, out / "plot.png")
    except ImportError:
        print("matplotlib is not installed: no plot (the JSON has every figure)")
    print(f"wrote {out / 'results.json'} and {out / 'plot.png'}")
    return 0


def report_agreement(rows: list[Row], dtype: str = "float32") -> None:
    """Prints each row's agreement with speculation off; `dtype`, the engines', explains differences in bf16."""
    if not any(row.compared_with_off for row in rows):
        return
    print("greedy output against speculation off's first answer to each prompt (losslessness on this hardware):")
    for row in rows:
        if row.compared_with_off:
            where = f" (first differing token at {sorted(row.first_differences)[:8]})" if row.first_differences else ""
            print(f"  {row.mode:>6} x{row.concurrency:<4} {row.same_as_off} of {row.compared_with_off} the same{where}",
                  flush=True)
    if dtype != "float32" and any(row.first_differences for row in rows):
        print(f"  ({dtype} engines round a verify pass and a decode step apart at near-ties, and a batch of one row "
              "and of many too; --dtype float32 gives speculation off's tokens exactly)", flush=True)


def _write_report(args, out: Path, rows: list[Row], baselines: dict, phases: dict) -> None:
    report = {
        "command": args.command_line,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "devices": {
            "verifier": args.verifier_device, "drafter": args.drafter_device}},
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "command_line")},
        "rows": [asdict(r) for r in rows],
        "baselines_tokens_per_s": baselines,
        "phases": phases,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))


def add_parser(sub, summary: str) -> None:
    p = sub.add_parser(
        "bench",
        help=summary,
        description="Starts verifier, drafters and routers as separate processes (or uses --address), runs the "
        "prompt set at each concurrency level in each mode, and reports speed, latency and acceptance.",
    )
    flag(p, "--target", default=DEFAULT_TARGET, help="target model SPEC")
    flag(p, "--drafter-model", default=None, help="drafter SPEC for mode `model`")
    flag(p, "--modes", default="off,ngram",
         help="comma-separated: off, ngram, model (the --drafter-model), model=SPEC (that drafter; repeatable), "
         "model=SPEC@BRANCHxBEAM (that drafter drafting trees: serve --draft-tree), model=SPEC@off (chains, "
         "whatever the verifier advises)")
    flag(p, "--concurrency", default="1,4", help="comma-separated concurrent users, e.g. 1,4,16,64,256")
    flag(p, "--prompts", default=str(DEFAULT_PROMPTS), help="JSONL prompt set ({messages: [...]} per line)")
    flag(p, "--requests", default=0, type=int, help="requests per level (0 = one per prompt)")
    flag(p, "--max-new-tokens", default=128, type=int, help="tokens per request")
    flag(p, "--k", default=5, type=int, help="draft block length")
    flag(p, "--verifier-device", default="cpu", help="torch device of the verifier, e.g. cuda:1")
    flag(p, "--drafter-device", default="cpu", help="torch device of the drafter, e.g. cuda:0")
    dtype_flag(p)
    flag(p, "--max-sequence-length", default=2048, type=int, help="verifier context per session")
    flag(p, "--address", default=None, help="use this running router instead of starting processes")
    flag(p, "--prefix-cache-blocks", default=0, type=int,
         help="prefix cache of the started verifier and model drafter (0 = off, so no mode reuses another's "
         "prefills)")
    flag(p, "--warmup", default=2, type=int, help="unmeasured requests per mode before the sweep")
    flag(p, "--baselines", action="store_true", help="also time transformers' generate and assisted generation")
    flag(p, "--baseline-prompts", default=8, type=int, help="prompts for the transformers baselines")
    flag(p, "--out", default=None, help="output directory (default out/bench-TIMESTAMP)")
    p.set_defaults(func=run)
