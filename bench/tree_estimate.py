"""What tree drafts would buy a feature drafter, greedy, before building them: tau for static draft trees, estimated
from the ranks the drafter gives the target's own tokens along the target's path.

A greedy verify step accepts drafted tokens while they equal the target's, so a tree whose every node at depth L - 1
expands the drafter's top K_L tokens accepts the target's token at depth L exactly when the drafter ranks it below
K_L given the correct path so far (the chain of k tokens is K = 1, ..., 1). The drafter's outputs along the correct
path are what training's unrolled forward computes (FeatureDrafterModel.unrolled: pass d, row j is drafting step
d + 1 after the target's features up to row j - d; the training-equals-serving test ties it to serving), so one pass
per depth over each whole sequence gives every start's ranks at once. The sequences are the target's own greedy
answers to the prompt file (this engine, EOS ends one), and the walk starts after the prefill's token, as serving
does: tau = mean over verify steps of (tokens accepted + 1), each step starting where the last one ended.

Trees are static and full (N nodes to verify = sum over depths of K_1 * ... * K_L); dynamic trees (EAGLE-2), which
expand only the likeliest nodes, buy the same tau with fewer nodes. Sampling is not estimated.

    .venv/bin/python bench/tree_estimate.py --prompts ../shared/prompts/chat.jsonl --max-new-tokens 128 \\
        --json bench/results/tree-estimate-cpu/tree_estimate.json
"""

from __future__ import annotations

import argparse
import math
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from specdec import models  # noqa: E402
from specdec.engine import LlamaEngine, Row  # noqa: E402
from specdec.eval_drafter import read_prompts  # noqa: E402
from specdec.feature_drafter import load_feature_drafter  # noqa: E402
from verifier_service.app import eos_ids_of  # noqa: E402

SHAPES = ["1,1,1,1,1", "1,1,1,1,1,1,1,1", "2,1,1,1,1", "2,2,1,1,1", "3,2,1,1,1", "4,2,2,1,1", "4,3,2,2,1,1,1,1",
          "8,4,2,2,1,1,1,1"]



def tree_nodes(shape: list[int]) -> int:
    """Nodes of a static tree with shape[d] children per node at depth d."""
    return sum(math.prod(shape[: d + 1]) for d in range(len(shape)))

def greedy_answers(engine: LlamaEngine, prompts: list[list[int]], max_new_tokens: int, eos: frozenset[int]):
    """The target's greedy answer to every prompt (EOS excluded), all prompts one ragged batch."""
    cache = engine.new_cache(len(prompts), max(map(len, prompts)) + max_new_tokens + 1)
    logits = engine.forward(cache, [Row(i, 0, p) for i, p in enumerate(prompts)])
    first = [int(row[-1].argmax()) for row in logits]
    rows = [Row(i, len(p), [t]) for i, (p, t) in enumerate(zip(prompts, first))]
    rest = engine.decode_greedy(cache, rows, max_new_tokens - 1)
    answers = []
    for head, tail in zip(first, rest):
        answer = []
        for token in [head, *tail]:
            if token in eos:
                break
            answer.append(token)
        answers.append(answer)
    return answers


@torch.inference_mode()
def ranks_along_path(engine: LlamaEngine, drafter, prompt: list[int], answer: list[int], depth: int) -> torch.Tensor:
    """ranks [depth, len(answer)]: ranks[L - 1, t] is the drafter's rank of answer[t] (0 = its top token) as the
    L-th drafted token of a draft whose first token is answer[t - L + 1], the correct path before it; -1 where
    undefined (the draft would start before the answer), a large number where the token is outside the draft
    vocabulary."""
    ids = prompt + answer
    cache = engine.new_cache(1, len(ids) + 1)
    _, _, features = engine.forward_flat(cache, [Row(0, 0, ids)], hidden=drafter.taps or True)  # the target's, before its norm
    outs = drafter.unrolled(torch.tensor([ids]), features[None].float(), depth)
    index = None
    if drafter.draft_vocab is not None:  # target id -> draft-vocabulary row (or -1)
        index = torch.full((engine.shape.vocab_size,), -1, dtype=torch.long)
        index[drafter.draft_vocab] = torch.arange(len(drafter.draft_vocab))
    p = len(prompt)
    ranks = torch.full((depth, len(answer)), -1, dtype=torch.long)
    for d, z in enumerate(outs):  # pass d, row j predicts ids[j + 2] as drafting step d + 1
        logits = drafter.logits(z[0]).float()  # [rows, draft vocab]
        for t in range(len(answer)):
            j = p + t - 2
            if p + t - d - 1 < p:  # the draft would start inside the prompt: serving never drafts there
                continue
            row = index[ids[j + 2]] if index is not None else ids[j + 2]
            if row < 0:
                ranks[d, t] = 1 << 30
                continue
            ranks[d, t] = int((logits[j] > logits[j, row]).sum())
    return ranks


def walk(ranks: torch.Tensor, shape: list[int]) -> list[int]:
    """Accepted draft tokens per verify step along one answer for a static tree of this shape. The first step
    starts after the answer's first token (the prefill's)."""
    accepted, t, n = [], 1, ranks.shape[1]
    while t < n:
        m = 0
        while m < len(shape) and t + m < n and 0 <= ranks[m, t + m] < shape[m]:
            m += 1
        accepted.append(m)
        t += m + 1
    return accepted


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=models.DEFAULT_TARGET, help="target model SPEC")
    p.add_argument("--drafter", default="drafters/smollm2-135m-instruct-feature", help="feature drafter artifact")
    p.add_argument("--prompts", required=True, help="JSONL of {messages: [...]} records")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--limit", type=int, default=0, help="the first N prompts only")
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="tree shapes: top-K per depth, comma-separated")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    started = time.perf_counter()
    hf = models.load_hf_model(args.target)
    engine = LlamaEngine(hf)
    drafter = load_feature_drafter(args.drafter, args.target).eval()
    tokenizer = models.load_tokenizer(args.target)
    prompts = read_prompts(args.prompts, tokenizer)[: args.limit or None]
    shapes = [[int(k) for k in s.split(",")] for s in args.shapes]
    depth = max(map(len, shapes))
    print(f"{len(prompts)} prompts: the target's greedy answers...", flush=True)
    answers = greedy_answers(engine, prompts, args.max_new_tokens, eos_ids_of(hf))
    all_ranks = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        all_ranks.append(ranks_along_path(engine, drafter, prompt, answer, depth))
        print(f"\rranks along the target's path: {i + 1}/{len(prompts)}", end="", flush=True)
    print()
    results = []
    for shape in shapes:
        steps = [m for ranks in all_ranks for m in walk(ranks, shape)]
        tau = sum(m + 1 for m in steps) / max(1, len(steps))
        results.append({"shape": shape, "nodes": tree_nodes(shape), "tau": round(tau, 3), "verify_steps": len(steps)})
        print(f"tree {','.join(map(str, shape)):<18} {tree_nodes(shape):>4} nodes   tau {tau:.3f}")
    # top-K hit rate by depth along the correct path, given the path so far (what each depth's K buys)
    by_depth = []
    for d in range(depth):
        r = torch.cat([ranks[d][ranks[d] >= 0] for ranks in all_ranks])
        by_depth.append({k: round(float((r < k).float().mean()), 4) for k in (1, 2, 4, 8)})
    print("top-K hit rate by depth (K = 1, 2, 4, 8):")
    for d, hits in enumerate(by_depth):
        print(f"  depth {d + 1}: " + "  ".join(f"{hits[k]:.3f}" for k in (1, 2, 4, 8)))
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
              "target": args.target, "drafter": args.drafter, "prompts": len(prompts),
              "answer_tokens": sum(map(len, answers)), "trees": results, "top_k_hit_rate_by_depth": by_depth,
              "seconds": round(time.perf_counter() - started, 1)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
