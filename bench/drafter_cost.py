"""Drafter cost per token relative to its target, through the engine both run on (specdec.engine.LlamaEngine).

cost_ratio = median over interleaved rounds of (drafter decode step time) / (target decode step time), batch 1, one
new token after a `--context`-token prefix: the c in the expected speedup tau / (1 + k * c). Also times the target
verifying k + 1 tokens, the step a drafter's k tokens replace. Feature drafters (specdec.feature_drafter) are timed
on their runner's drafting step (one token, a predicted feature), and per token of a whole k-token greedy draft on
the device (`draft_greedy`, how they serve greedy sessions: `cost_ratio_greedy_draft`). Run it on each device the drafter will serve on:

    python bench/drafter_cost.py --target smollm2-135m-instruct --drafters drafters/smollm2-135m-instruct \
        --device cuda --json out/cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from specdec import drafter_model, models  # noqa: E402
from specdec.engine import LlamaEngine, Row  # noqa: E402
from specdec.feature_drafter import FeatureRunner, is_feature_drafter, load_feature_drafter  # noqa: E402


def _timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) * 1e3


def step_fn(engine: LlamaEngine, context: int, new_tokens: int):
    """One forward of `new_tokens` tokens after `context` cached ones (the cache is rolled back free each call)."""
    cache = engine.new_cache(1, context + new_tokens + 1)
    prefix = [(7 * i) % 1000 + 10 for i in range(context)]
    engine.forward(cache, [Row(0, 0, prefix)])
    step = [11] * new_tokens
    return lambda: engine.forward(cache, [Row(0, context, step, all_logits=new_tokens > 1)])


def feature_step_fn(model, device, dtype, context: int):
    """A feature drafter's drafting step: one token with a predicted feature after `context` rows."""
    runner = FeatureRunner(model, device, dtype, 1, context + 2)
    hidden = model.config.hidden_size
    prefix = [(7 * i) % 1000 + 10 for i in range(context)]
    runner.step([Row(0, 0, prefix)], [torch.randn(context, hidden)])
    feature = torch.randn(1, hidden, device=device, dtype=dtype)
    return lambda: runner.step([Row(0, context, [11])], [feature])


def feature_draft_fn(model, device, dtype, context: int, k: int):
    """How a feature drafter serves greedy drafts: k tokens in one `draft_greedy` call (all steps on the device,
    one host copy); its time / k is the drafting cost per token."""
    runner = FeatureRunner(model, device, dtype, 1, context + k + 2)
    hidden = model.config.hidden_size
    prefix = [(7 * i) % 1000 + 10 for i in range(context)]
    runner.step([Row(0, 0, prefix)], [torch.randn(context, hidden)])
    feature = torch.randn(1, hidden, device=device, dtype=dtype)
    return lambda: runner.draft_greedy([Row(0, context, [11])], [feature], k)


def interleaved_ms(fns: dict, device, repeats: int, warmup: int = 5) -> dict[str, list[float]]:
    """Times every step once per round, round after round, so load from other processes hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=models.DEFAULT_TARGET)
    p.add_argument("--drafters", nargs="+", required=True, help="drafter artifact directories or HF model dirs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 on cuda, float32 on cpu by default")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--verify-widths", default="",
                   help="also time the target's pass of each of these many tokens, comma-separated (e.g. 2,4,6,8,11)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    target = LlamaEngine(models.load_hf_model(args.target), device, dtype)
    fns = {
        "target_decode": step_fn(target, args.context, 1),
        "target_verify": step_fn(target, args.context, args.k + 1),
    }
    widths = [int(w) for w in args.verify_widths.split(",") if w.strip()]
    for width in widths:
        fns[f"target_width_{width}"] = step_fn(target, args.context, width)
    shapes = {}
    for spec in args.drafters:
        if is_feature_drafter(spec):  # layer(s) fed the target's hidden states: its runner's step
            model = load_feature_drafter(spec, args.target)
            fns[spec] = feature_step_fn(model, device, dtype, args.context)
            fns[f"{spec}#greedy-draft"] = feature_draft_fn(model, device, dtype, args.context, args.k)
            shapes[spec] = (len(model.lm.model.layers), int(model.lm.lm_head.weight.shape[0]))
            continue
        if drafter_model.is_drafter_artifact(spec):
            hf = drafter_model.load_drafter(spec, args.target)
        else:
            hf = models.load_hf_model(spec)
        drafter = LlamaEngine(hf, device, dtype)
        fns[spec] = step_fn(drafter, args.context, 1)
        shapes[spec] = (drafter.shape.num_layers, drafter.lm_head.out_features)
    times = interleaved_ms(fns, device, args.repeats)
    target_times = times["target_decode"]
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "dtype": str(dtype), "context": args.context, "k": args.k,
        "repeats": args.repeats,
        "target_decode_ms": round(statistics.median(target_times), 4),
        "target_decode_min_ms": round(min(target_times), 4),
        "target_verify_k_plus_1_ms": round(statistics.median(times["target_verify"]), 4),
        "drafters": {},
    }
    if widths:  # a pass of w tokens against a decode step: what verifying w - 1 draft tokens costs
        results["target_pass_ms_by_width"] = {
            w: round(statistics.median(times[f"target_width_{w}"]), 4) for w in widths}
    for spec, (layers, head_rows) in shapes.items():
        mine = times[spec]
        results["drafters"][spec] = {
            "layers": layers, "head_rows": head_rows,
            "decode_ms": round(statistics.median(mine), 4), "decode_min_ms": round(min(mine), 4),
            # median over rounds of the per-round ratio, and the ratio of the fastest runs: both resist load spikes
            "cost_ratio": round(statistics.median(d / t for d, t in zip(mine, target_times)), 4),
            "cost_ratio_of_min": round(min(mine) / min(target_times), 4),
        }
        drafts = times.get(f"{spec}#greedy-draft")
        if drafts:  # per token of a whole greedy draft, as a feature drafter serves greedy sessions
            results["drafters"][spec].update({
                "greedy_draft_ms_per_token": round(statistics.median(drafts) / args.k, 4),
                "cost_ratio_greedy_draft": round(statistics.median(d / args.k / t for d, t in zip(drafts, target_times)), 4),
            })
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
