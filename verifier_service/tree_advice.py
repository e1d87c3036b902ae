"""The draft tree a verifier advises its drafters (GetModelInfoResponse.draft_tree), from its own passes' cost.

A tree raises tau (the shipped fused drafter on the demo's prompt: 1.76 for chains, 2.49 for a 2x2 tree 3 deep), but
its verify pass holds every node. Whether that pays is a property of the hardware, measured here rather than
guessed: on a CPU where a pass of a tree's tokens costs about a decode step (a 2-core AVX-512 EPYC: 11 tokens ~1.2x
one), `make demo` went from 1.30-1.56x off with chains to 1.64-1.79x with 2x2 trees; where it costs much more (an
AVX2 EPYC: 11 tokens 1.69x one; an AMX CPU in fp32: 6 tokens 1.64x) trees tied or lost (docs/benchmarks.md,
fourteenth session). On a GPU trees lost at one user across two H200s (level-by-level drafting and the wider verify
cost more than their tau bought: seventh session) and at 64 users on one H200 (tau 2.80 against 1.99, but rounds of
53 ms against 33: 9-12% below chains, sixteenth session), so GPU verifiers advise chains without measuring.

Owns only the decision; drafters follow it unless told otherwise (`--draft-tree`), and requests that choose their
own draft length keep it.
"""

from __future__ import annotations

import logging
import time

import torch

from specdec.draft_tree import TreeShape
from specdec.engine import Row

log = logging.getLogger(__name__)

CANDIDATE = TreeShape(2, 2)  # the best of 2x1 / 3x1 / 2x2 / 3x2 / 2x3 on the AVX-512 EPYC at 3 deep
# A tree pays when its verify pass costs at most this many decode steps: at tau 2.49 against 1.76 for chains, a
# round of the tree may cost ~1.4x a chain's; the margin leaves room for the tree's extra drafting passes.
PAYS_AT_MOST = 1.3
CONTEXT = 64  # tokens of context the passes are timed at


def pass_cost_ratio(engine, tokens: int, repeats: int = 5) -> float:
    """The fastest of `repeats` passes of `tokens` tokens over the fastest of as many one-token passes, taken in
    turns (so a burst of other work slows both, not one) after a warm-up of each, at CONTEXT tokens of context in a
    cache of their own (the serving cache is not touched)."""
    cache = engine.new_cache(1, CONTEXT + tokens + 1)
    engine.forward(cache, [Row(0, 0, list(range(1, CONTEXT + 1)))])
    times: dict[int, list[float]] = {1: [], tokens: []}
    for _ in range(repeats + 1):
        for width in times:
            started = time.perf_counter()
            engine.forward(cache, [Row(0, CONTEXT, list(range(2, width + 2)))])
            times[width].append(time.perf_counter() - started)
    return min(times[tokens][1:]) / min(times[1][1:])


def advise_draft_tree(engine, depth: int, max_tree_nodes: int, setting: str = "auto") -> str:
    """GetModelInfoResponse.draft_tree: "BRANCHxBEAM" or "" (chains). setting: "auto" measures on a CPU (chains
    on other devices), "off" advises chains, "BRANCHxBEAM" advises that shape without measuring."""
    if setting != "auto":
        shape = TreeShape.parse(setting)  # ValueError for a malformed one, at start-up
        return "" if shape is None else str(shape)
    nodes = CANDIDATE.nodes(depth)
    if engine.device.type != "cpu" or not 0 < nodes <= max_tree_nodes:  # (0 nodes: an engine without trees)
        return ""
    with torch.inference_mode():
        ratio = pass_cost_ratio(engine, nodes + 1)
    advice = str(CANDIDATE) if ratio <= PAYS_AT_MOST else ""
    log.info("a verify pass of %d tokens costs %.2fx a decode step here: advising %s", nodes + 1, ratio,
             f"{advice} draft trees {depth} deep" if advice else "chains")
    return advice
