"""One batch of drafts as the drafter server runs it, with and without new sessions' prompts in it.

At 64 users on an H200 the drafter's batches holding a new session's first draft (its whole prompt as one wide row,
fed with the target's hidden states of every prompt token) took 31 ms mean against 7.8 ms for plain chain batches,
and were more than half of its torch thread's time (docs/benchmarks.md, thirteenth session). This times
`FeatureDrafter.propose`, the call the DraftBatcher makes, for `--running` sessions drafting their next chain (each
after a verdict of 3 committed tokens) plus W new sessions' first drafts (prompts of `--prompt` tokens), W from
`--new`; then the same new sessions' drafts in a call of their own, after the running sessions' (what a batcher that
kept prompts apart would run). Random tokens and features, the real drafter's weights and shapes. `--profile`
prints torch.profiler's top operators of the widest mixed batch (its drafting calls only).

In the stack those batches were slow at p90 only, and the suspected cost is a first use per pass shape: `--prompt
20-120` draws each new session's prompt length from that range, and `--cold` times every batch as it comes (no
warm-up of its shape; the median, p90 and worst of the repeats), so new shapes keep arriving as in serving.
`--prompt-graphs no` runs prompts eagerly, as before the prompt graphs (FeatureRunner.MAX_PROMPT_WIDTH).

    python bench/drafter_batch.py --device cuda:0 --target /root/m/smollm2.gguf --json $OUT/drafter_batch.json
    python bench/drafter_batch.py --device cuda:0 --target /root/m/smollm2.gguf --prompt 20-120 --cold \
        --repeats 40 --prompt-graphs no
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drafter_cost import _timed as timed  # noqa: E402  (ms of one call, the device synchronized)
from drafter_service.drafters import DraftRequest, make_drafter  # noqa: E402
from specdec import models  # noqa: E402
from specdec.sampling import SamplingConfig  # noqa: E402

GREEDY = SamplingConfig()


class Sessions:
    """Sessions of one drafter with their contexts and the target's (random) features."""

    def __init__(self, drafter, vocab: int, generator: torch.Generator):
        self.drafter, self.vocab, self.generator = drafter, vocab, generator
        self.context: dict[str, list[int]] = {}
        self.features: dict[str, torch.Tensor] = {}
        self._opened = 0

    def open(self, prompt: tuple[int, int]) -> str:
        """A session with a prompt of between prompt[0] and prompt[1] tokens."""
        sid = f"s{self._opened}"
        self._opened += 1
        self.drafter.open(sid)
        prompt = int(torch.randint(prompt[0], prompt[1] + 1, (), generator=self.generator))
        self.context[sid] = torch.randint(0, self.vocab, (prompt + 1,), generator=self.generator).tolist()
        self.features[sid] = self._states(prompt)
        return sid

    def close(self, sid: str) -> None:
        self.drafter.close(sid)
        del self.context[sid], self.features[sid]

    def commit(self, sid: str, tokens: int) -> None:
        """A verdict: `tokens` more committed tokens, their features with them."""
        self.context[sid] += torch.randint(0, self.vocab, (tokens,), generator=self.generator).tolist()
        self.features[sid] = torch.cat((self.features[sid], self._states(tokens)))

    def request(self, sid: str, k: int) -> DraftRequest:
        return DraftRequest(sid, list(self.context[sid]), k, GREEDY, None, self.features[sid])

    def _states(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.drafter.feature_width, generator=self.generator).to(torch.float16)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--drafter", default="drafters/smollm2-135m-instruct-fused", help="a feature drafter artifact")
    p.add_argument("--target", default=models.DEFAULT_TARGET, help="the target whose embeddings the drafter borrows")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--running", type=int, default=16, help="sessions drafting their next chain in every batch")
    p.add_argument("--new", default="0,1,4,16", help="new sessions' first drafts added to the batch, a list")
    p.add_argument("--prompt", default="150", help="a new session's prompt tokens: N, or LOW-HIGH drawn per session")
    p.add_argument("--cold", action="store_true", help="no warm-up of each batch's shape: every batch timed as it comes")
    p.add_argument("--prompt-graphs", choices=("yes", "no"), default="yes",
                   help="no: new sessions' prompts run eagerly (FeatureRunner.MAX_PROMPT_WIDTH lowered)")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="torch.profiler's top operators of the widest mixed batch")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    widths = [int(w) for w in args.new.split(",")]
    drafter = make_drafter(args.drafter, args.device, max_sessions=args.running + max(widths) + 1,
                           target=args.target)
    if not getattr(drafter, "wants_features", False):
        p.error(f"{args.drafter} is not a feature drafter")
    if args.prompt_graphs == "no":
        drafter.runner.MAX_PROMPT_WIDTH = drafter.runner.MAX_GRAPH_WIDTH
    low, _, high = args.prompt.partition("-")
    prompt = (int(low), int(high or low))
    vocab = drafter.runner.engine.shape.vocab_size
    sessions = Sessions(drafter, vocab, torch.Generator().manual_seed(0))
    running = [sessions.open(prompt) for _ in range(args.running)]
    drafter.propose([sessions.request(s, args.k) for s in running])  # their prompts' KV, as after a first draft

    def batch(new: int, apart: bool, timed=timed) -> tuple[float, float]:
        """(ms of the running sessions' drafts, ms until the new sessions' drafts too): one call, or two."""
        for s in running:
            sessions.commit(s, 3)
        fresh = [sessions.open(prompt) for _ in range(new)]
        chains = [sessions.request(s, args.k) for s in running]
        firsts = [sessions.request(s, args.k) for s in fresh]
        if apart or not fresh:
            first = timed(lambda: drafter.propose(chains), device)
            both = first + (timed(lambda: drafter.propose(firsts), device) if fresh else 0.0)
        else:
            first = both = timed(lambda: drafter.propose(chains + firsts), device)
        for s in fresh:
            sessions.close(s)
        for s in running:  # keep the contexts short of the KV's end whatever the repeats
            if len(sessions.context[s]) > 400:
                sessions.close(s)
                running[running.index(s)] = sessions.open(prompt)
        return first, both

    results = []
    for new in widths:
        for apart in ((False, True) if new else (False,)):
            if not args.cold:
                batch(new, apart)  # a warm-up of this shape
            times = [batch(new, apart) for _ in range(args.repeats)]
            alls = sorted(t[1] for t in times)
            row = {"running": args.running, "new": new, "prompt": args.prompt, "apart": apart, "cold": args.cold,
                   "prompt_graphs": args.prompt_graphs,
                   "running_drafts_ms": statistics.median(t[0] for t in times),
                   "all_drafts_ms": statistics.median(alls),
                   "all_drafts_p90_ms": alls[min(len(alls) - 1, int(0.9 * len(alls)))], "all_drafts_max_ms": alls[-1]}
            results.append(row)
            print(f"{args.running} running + {new:>3} new ({'two calls' if apart else 'one call '}): running "
                  f"sessions' drafts {row['running_drafts_ms']:7.2f} ms, all {row['all_drafts_ms']:7.2f} ms "
                  f"(median of {args.repeats}; all: p90 {row['all_drafts_p90_ms']:.2f}, worst "
                  f"{row['all_drafts_max_ms']:.2f})", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:  # paused outside the drafting calls (the setup's randn)
            prof.toggle_collection_dynamic(False, activities)

            def profiled(fn, device):
                prof.toggle_collection_dynamic(True, activities)
                try:
                    return timed(fn, device)
                finally:
                    prof.toggle_collection_dynamic(False, activities)

            batch(max(widths), False, profiled)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
        if device.type == "cuda":
            print(prof.key_averages().table(sort_by=sort, row_limit=10))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "device": str(device),
                                               "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
