"""Where one speculative round's time goes, chain against draft tree, for one session on one device.

The pieces a round of the stack runs, each timed as the tiers run it (synchronized wall time, host work included,
median over `--repeats` after warm-up), with the shipped drafter and the default target:

- `decode step`: the verifier's pass for one token (speculation off pays this per token);
- `drafter catch-up`: the drafter's pass over a verdict's rows (here 3, the tree's mean accepted path + 1);
- `chain draft`: a k-token greedy chain on the device (`FeatureRunner.draft`);
- `tree draft`: a BRANCHxBEAM tree k deep (`FeatureRunner.draft_tree`);
- `chain verify` / `tree verify`: the verifier's pass over the block with the drafter's layers' features, the
  verdict (argmax, the tree's greedy walk) and, for the tree, the accepted path's KV moved into place.

What a round costs beyond their sum in the stack is the servers' own work and the gRPC hops.

    python bench/tree_round.py --target /root/m/smollm2.gguf --device cuda:0 --json out/tree_round.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drafter_cost import _timed  # noqa: E402  (bench/ is on the path when run as a script)
from specdec import models  # noqa: E402
from specdec.engine import LlamaEngine, Row, tree_visibility  # noqa: E402
from specdec.feature_drafter import FeatureRunner, load_feature_drafter  # noqa: E402
from specdec.verification import verify_tree_greedy  # noqa: E402


def timed(fn, device, repeats: int) -> float:
    """Median milliseconds of fn(), synchronized (drafter_cost's timer), after 3 warm-up calls (CUDA graphs are
    captured there)."""
    for _ in range(3):
        _timed(fn, device)
    return statistics.median(_timed(fn, device) for _ in range(repeats))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=models.DEFAULT_TARGET)
    p.add_argument("--drafter", default="drafters/smollm2-135m-instruct-fused")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--tree", default="4x4", help="BRANCHxBEAM")
    p.add_argument("--context", type=int, default=160, help="committed tokens before the round")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    branch, beam = (int(v) for v in args.tree.split("x"))

    target = LlamaEngine(models.load_hf_model(args.target), device, dtype)
    model = load_feature_drafter(args.drafter, args.target)
    layers = model.taps or True
    runner = FeatureRunner(model, device, dtype, 2, args.context + 200)
    n = args.context
    context = [(7 * i) % 1000 + 10 for i in range(n + 1)]
    cache = target.new_cache(2, n + 200)
    _, _, feats = target.forward_flat(cache, [Row(0, 0, context[:-1])], hidden=layers)
    runner.step([Row(0, 0, context[1 : n + 1])], [feats])
    results = {}

    results["decode step"] = timed(lambda: target.forward(cache, [Row(0, n, [context[-1]])]), device, args.repeats)
    results["drafter catch-up (3 rows)"] = timed(
        lambda: runner.step([Row(0, n - 3, context[n - 2 : n + 1])], [feats[n - 3 : n]]), device, args.repeats)
    last = [Row(0, n - 1, [context[n]])]
    results[f"chain draft, k = {args.k}"] = timed(lambda: runner.draft(last, [feats[n - 1 : n]], args.k), device,
                                                  args.repeats)
    trees = runner.draft_tree(last, [feats[n - 1 : n]], args.k, branch, beam)
    results[f"tree draft {args.tree}, {args.k} deep ({len(trees[0].tokens)} nodes)"] = timed(
        lambda: runner.draft_tree(last, [feats[n - 1 : n]], args.k, branch, beam), device, args.repeats)

    chain = [11] * args.k

    def verify_chain():
        flat, _, _ = target.forward_flat(cache, [Row(0, n, [context[-1], *chain], True)], hidden=layers)
        return flat.argmax(-1).tolist()

    tree = trees[0]
    visible = tree_visibility(tree.parents)

    def verify_tree():
        row = Row(0, n, [context[-1], *tree.tokens], True, tree_base=n, visible=visible)
        flat, _, _ = target.forward_flat(cache, [row], hidden=layers)
        verdict = verify_tree_greedy(flat.argmax(-1).tolist(), tree.tokens, tree.parents)
        path = verdict.path or [len(tree.tokens) - 1]  # move at least one entry, as an accepted path does
        cache.move([0] * len(path), [n + 1 + j for j in path], [n + 1 + i for i in range(len(path))])

    results[f"chain verify, {args.k + 1} tokens"] = timed(verify_chain, device, args.repeats)
    results[f"tree verify, {len(tree.tokens) + 1} tokens"] = timed(verify_tree, device, args.repeats)
    results = {k: round(v, 3) for k, v in results.items()}
    for name, ms in results.items():
        print(f"{name:<45} {ms:8.3f} ms", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "device": str(device),
                                               "dtype": str(dtype), "ms": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
