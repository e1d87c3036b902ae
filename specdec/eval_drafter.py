"""`specdec eval-drafter`: how many tokens a drafter buys per verify step against a target, measured offline.

Runs the real speculative loop in one process on the engine (specdec.engine), every prompt of the file a session
of one ragged batch: the drafter proposes k tokens per session, the target scores them in one forward, and
specdec.verification.verify accepts a prefix and adds the recovered or bonus token. Reported per temperature:

- tau: mean tokens committed per verify step (accepted draft tokens + 1), the speedup's numerator;
- acceptance by draft position i: P(draft token i accepted | tokens 0..i-1 accepted), over steps that drafted it.

Drafter SPECs: a drafter artifact (specdec.drafter_model), a Hugging Face model directory with the target's
tokenizer, or `ngram` (prompt lookup: the longest suffix n-gram of the context, n = 3..1, found earlier in the
context proposes the k tokens that followed it). `--hf-crosscheck N` also runs transformers' assisted generation
(greedy, k constant) on the first N prompts and reports its tokens per target forward for the same pair.

This module owns the measurement loop; it does not own serving drafters (drafter_service/) or verification math.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specdec import drafter_model, models
from specdec.engine import LlamaEngine, Row
from specdec.sampling import SamplingConfig, probs_from_logits, sample
from specdec.verification import verify

NGRAM = "ngram"


@dataclass
class _Session:
    slot: int
    tokens: list[int]  # committed: prompt + generated
    prompt_len: int
    target_len: int = 0  # leading tokens of `tokens` whose KV the target's cache holds
    draft_len: int = 0  # likewise for the drafter's cache
    done: bool = False
    steps: list[tuple[int, int]] = field(default_factory=list)  # (draft_len, num_accepted) per verify step


class _NgramDrafter:
    """Prompt lookup: deterministic, so it declares the point mass on each token it proposes."""

    def __init__(self, max_n: int = 3):
        from drafter_service.drafters import NgramDrafter

        self.lookup = NgramDrafter(max_n).lookup  # the drafter service's own lookup, so figures match serving

    def prefill(self, sessions):
        """No state to build."""

    def propose(self, sessions, k, config, generator) -> list[list[int]]:
        return [self.lookup(s.tokens, k) for s in sessions]

    def draft_probs(self, proposals, k, vocab):
        return None

    def committed(self, session, old_len, num_accepted, k):
        """No state to roll back."""


class _ModelDrafter:
    """A Llama-family drafter on the engine, with its own KV cache; samples at the request's temperature."""

    def __init__(self, hf_model, num_slots, max_len, device, dtype):
        self.engine = LlamaEngine(hf_model, device, dtype)
        self.cache = self.engine.new_cache(num_slots, max_len)
        self.draft_vocab = getattr(hf_model, "draft_vocab", None)
        self._probs = None

    def prefill(self, sessions):
        rows = [Row(s.slot, 0, s.tokens[:-1]) for s in sessions]
        self.engine.forward(self.cache, rows)
        for s in sessions:
            s.draft_len = len(s.tokens) - 1

    def propose(self, sessions, k, config, generator) -> list[list[int]]:
        proposals = [[] for _ in sessions]
        step_probs = []  # k tensors [batch, vocab]
        rows = [Row(s.slot, s.draft_len, s.tokens[s.draft_len :]) for s in sessions]
        for i in range(k):
            logits = torch.stack([out[-1] for out in self.engine.forward(self.cache, rows)])  # [batch, draft_vocab]
            probs = probs_from_logits(logits, config)  # [batch, draft_vocab]
            ids = sample(probs, torch.rand(len(sessions), generator=generator).to(probs.device))
            full_ids = drafter_model.to_target_ids(ids, self.draft_vocab)
            step_probs.append(probs)
            for b, s in enumerate(sessions):
                proposals[b].append(int(full_ids[b]))
            rows = [Row(s.slot, len(s.tokens) + i, [proposals[b][i]]) for b, s in enumerate(sessions)]
        self._probs = torch.stack(step_probs, dim=1)  # [batch, k, draft_vocab]
        return proposals

    def draft_probs(self, proposals, k, vocab):
        return drafter_model.to_target_probs(self._probs, self.draft_vocab, vocab)  # [batch, k, vocab]

    def committed(self, session, old_len, num_accepted, k):
        # the cache holds the old context plus draft tokens 0..k-2; the accepted ones stay valid
        session.draft_len = old_len + min(num_accepted, k - 1)


class _FeatureDrafter:
    """A feature-level drafter (specdec.feature_drafter): reads the target's hidden states of committed tokens."""

    def __init__(self, model, num_slots, max_len, device, dtype):
        from specdec.feature_drafter import FeatureRunner

        self.runner = FeatureRunner(model, device, dtype, num_slots, max_len)
        self.model = model
        self.draft_vocab = model.draft_vocab
        self.features: dict[int, torch.Tensor] = {}  # slot -> [committed tokens - 1, hidden]: all but the last's
        self.valid: dict[int, int] = {}  # slot -> rows in the drafter's cache made from the target's features
        self._probs = None

    @property
    def taps(self) -> list[int] | None:
        """The target layers it reads (None: the last alone)."""
        return self.model.taps

    def observe(self, session, features: torch.Tensor) -> None:
        old = self.features.get(session.slot)
        self.features[session.slot] = features if old is None else torch.cat((old, features))

    def prefill(self, sessions):
        """Forgets the slots' earlier sessions; the first draft's step runs the prompt's rows (their features come
        through observe after this)."""
        for s in sessions:
            self.features.pop(s.slot, None)
            self.valid.pop(s.slot, None)

    def propose(self, sessions, k, config, generator) -> list[list[int]]:
        rows, feats, known = [], [], []
        for s in sessions:
            f = self.features[s.slot]
            n = f.shape[0]  # = len(s.tokens) - 1; row p is token p + 1 with feature p
            start = min(self.valid.get(s.slot, 0), n - 1)  # at least one row: its output starts the draft
            rows.append(Row(s.slot, start, s.tokens[start + 1 : n + 1]))
            feats.append(f[start:n])
            self.valid[s.slot] = n  # later rows will hold drafted tokens: not trusted next time
            known.append(n)
        proposals, step_probs = [[] for _ in sessions], []
        for i in range(k):
            logits, predicted = self.runner.step(rows, feats)
            probs = probs_from_logits(logits, config)
            ids = sample(probs, torch.rand(len(sessions), generator=generator).to(probs.device))
            full_ids = drafter_model.to_target_ids(ids, self.draft_vocab).tolist()
            step_probs.append(probs)
            for b in range(len(sessions)):
                proposals[b].append(full_ids[b])
            rows = [Row(s.slot, known[b] + i, [full_ids[b]]) for b, s in enumerate(sessions)]
            feats = list(predicted[:, None])
        self._probs = torch.stack(step_probs, dim=1)  # [batch, k, draft_vocab]
        return proposals

    draft_probs = _ModelDrafter.draft_probs

    def committed(self, session, old_len, num_accepted, k):
        """Rolled back by `valid`; the verifier's features arrive through observe."""


def _load_drafter(spec: str, target: str, num_slots: int, max_len: int, device, dtype, target_vocab: int):
    if spec == NGRAM:
        return _NgramDrafter(), None
    from specdec.feature_drafter import is_feature_drafter, load_feature_drafter

    if is_feature_drafter(spec):
        return _FeatureDrafter(load_feature_drafter(spec, target), num_slots, max_len, device, dtype), None
    if drafter_model.is_drafter_artifact(spec):
        hf = drafter_model.load_drafter(spec, target)
    else:
        hf = models.load_hf_model(spec)
        if hf.config.vocab_size != target_vocab:
            raise ValueError(f"drafter {spec!r} has vocabulary {hf.config.vocab_size}, the target {target_vocab}")
    return _ModelDrafter(hf, num_slots, max_len, device, dtype), hf


def measure(target_engine, drafter, prompts, k, config, max_new_tokens, eos_ids, seed, device) -> dict:
    """Runs every prompt to completion with speculative decoding; returns tau and acceptance by position."""
    generator = torch.Generator().manual_seed(seed)
    cache = target_engine.new_cache(len(prompts), max(len(p) for p in prompts) + max_new_tokens + k + 2)
    sessions = [_Session(slot=i, tokens=list(p), prompt_len=len(p)) for i, p in enumerate(prompts)]
    drafter.prefill(sessions)
    observe = getattr(drafter, "observe", None)  # a feature drafter reads the target's hidden states
    hidden_layers = getattr(drafter, "taps", None) or True  # (or several layers' side by side)
    rows = [Row(s.slot, 0, s.tokens[:-1]) for s in sessions]
    _, _, hidden = target_engine.forward_flat(cache, rows, hidden=hidden_layers)
    for s, h in zip(sessions, hidden.split([len(r.tokens) for r in rows])):
        s.target_len = len(s.tokens) - 1
        if observe:
            observe(s, h)
    vocab = target_engine.shape.vocab_size
    while True:
        active = [s for s in sessions if not s.done]
        if not active:
            break
        proposals = drafter.propose(active, k, config, generator)
        draft_lens = torch.tensor([len(p) for p in proposals])
        draft_tokens = torch.zeros(len(active), k, dtype=torch.long)
        for b, p in enumerate(proposals):
            draft_tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        rows = [
            Row(s.slot, s.target_len, s.tokens[s.target_len :] + p, all_logits=True) for s, p in zip(active, proposals)
        ]
        flat, sizes, hidden = target_engine.forward_flat(cache, rows, hidden=hidden_layers)
        outs, hidden = flat.split(sizes), hidden.split(sizes)
        target_probs = torch.zeros(len(active), k + 1, vocab)  # [batch, k + 1, vocab]
        for b, (out, p) in enumerate(zip(outs, proposals)):
            target_probs[b, : len(p) + 1] = probs_from_logits(out[-(len(p) + 1) :].float().cpu(), config)
        draft_probs = drafter.draft_probs(proposals, k, vocab)
        if draft_probs is None:  # deterministic drafter: point masses on its tokens
            draft_probs = torch.zeros(len(active), k, vocab).scatter_(-1, draft_tokens.unsqueeze(-1), 1.0)
        verdict = verify(
            target_probs, draft_tokens, draft_probs.float().cpu(), draft_lens,
            torch.rand(len(active), k, generator=generator), torch.rand(len(active), generator=generator),
        )
        for b, s in enumerate(active):
            n = int(verdict.num_accepted[b])
            old_len = len(s.tokens)
            s.steps.append((len(proposals[b]), n))
            s.target_len = old_len + n
            drafter.committed(s, old_len, n, k)
            if observe:  # the rows of the last committed token and the accepted drafts
                observe(s, hidden[b][: n + 1])
            new = proposals[b][:n] + [int(verdict.next_tokens[b])]
            for token in new:
                s.tokens.append(token)
                if token in eos_ids or len(s.tokens) - s.prompt_len >= max_new_tokens:
                    s.done = True
                    break
    return summarize(sessions, k)


def tree_nodes(shape: list[int]) -> int:
    """Draft tokens a static tree of this shape (top-K per depth) holds: sum over depths of K_1 * ... * K_d."""
    return sum(math.prod(shape[: d + 1]) for d in range(len(shape)))


def _copy_kv(cache, src: int, dst: int, begin: int, end: int) -> None:
    """KV positions begin..end-1 of slot src into slot dst, every layer."""
    for keys, values in zip(cache.keys, cache.values):
        keys[dst, :, begin:end] = keys[src, :, begin:end]
        values[dst, :, begin:end] = values[src, :, begin:end]


@torch.inference_mode()
def measure_tree(target_engine, model, prompts, shape: list[int], max_new_tokens, eos_ids, device, dtype) -> dict:
    """Greedy tau with a static draft tree (shape: top-K per depth, e.g. 4,2,2,1,1) from a feature drafter, measured
    with real passes, one prompt at a time. The drafter expands the tree level by level: every node of a level is
    one row of one pass, in a KV slot of its own forked from its parent's, fed its parent's predicted state, as
    drafting feeds a chain. The target scores every root-to-leaf path as one row of one pass (each in a slot forked
    from the session's), so the tree's nodes are scored as a tree attention mask would score them, paths sharing
    their prefixes' rows; the walk keeps the path that agrees longest with the target's argmax and commits it plus
    the target's next token: greedy decoding's tokens, as for a chain. Offline only: serving verifies chains."""
    from specdec.feature_drafter import FeatureRunner

    paths = math.prod(shape)
    max_len = max(len(p) for p in prompts) + max_new_tokens + len(shape) + 2
    runner = FeatureRunner(model, device, dtype, 1 + 2 * paths, max_len)  # slot 0: the session; two pools of paths
    vocab_index = model.draft_vocab
    layers = model.taps or True
    cache = target_engine.new_cache(1 + paths, max_len)
    per_prompt, generated = [], 0
    for prompt in prompts:
        tokens = list(prompt)
        _, _, feats = target_engine.forward_flat(cache, [Row(0, 0, tokens[:-1])], hidden=layers)
        valid, accepted_per_step = 0, []
        while True:
            n = feats.shape[0]  # = len(tokens) - 1: row p of the drafter is token p + 1 with the target's state p
            start = min(valid, n - 1)
            logits, h = runner.step([Row(0, start, tokens[start + 1 : n + 1])], [feats[start:n]])
            valid = n
            frontier = [([], 0, h[0], logits[0])]  # (path tokens, drafter slot, predicted state, next logits)
            for depth, width in enumerate(shape):
                children = []
                for path, slot, state, row_logits in frontier:
                    top = row_logits.topk(width).indices
                    top = top if vocab_index is None else vocab_index[top.to(vocab_index.device)]
                    children += [(path + [int(t)], slot, state) for t in top.tolist()]
                if depth == len(shape) - 1:
                    leaves = [path for path, _, _ in children]
                    break
                pool = 1 + (depth % 2) * paths  # children's slots; their parents' are in the other pool (or 0)
                for i, (_, parent, _) in enumerate(children):
                    _copy_kv(runner.cache, parent, pool + i, 0, n + depth)
                rows = [Row(pool + i, n + depth, [path[-1]]) for i, (path, _, _) in enumerate(children)]
                step_logits, step_h = runner.step(rows, [state[None] for _, _, state in children])
                frontier = [(path, pool + i, step_h[i], step_logits[i]) for i, (path, _, _) in enumerate(children)]
            target_len = len(tokens) - 1
            for i in range(len(leaves)):
                _copy_kv(cache, 0, 1 + i, 0, target_len)
            rows = [Row(1 + i, target_len, [tokens[-1], *path], all_logits=True) for i, path in enumerate(leaves)]
            flat, sizes, hidden = target_engine.forward_flat(cache, rows, hidden=layers)
            picks = flat.argmax(-1).view(len(leaves), -1).tolist()  # [paths, depth + 1]
            agree = []
            for path, pick in zip(leaves, picks):
                m = 0
                while m < len(path) and path[m] == pick[m]:
                    m += 1
                agree.append(m)
            best = max(range(len(leaves)), key=lambda i: (agree[i], -i))
            m = agree[best]
            _copy_kv(cache, 1 + best, 0, target_len, target_len + m + 1)
            feats = torch.cat((feats, hidden.view(len(leaves), len(shape) + 1, -1)[best, : m + 1]))
            accepted_per_step.append(m)
            done = False
            for token in leaves[best][:m] + [picks[best][m]]:
                tokens.append(token)
                if token in eos_ids or len(tokens) - len(prompt) >= max_new_tokens:
                    done = True
                    break
            if done:
                break
        generated += len(tokens) - len(prompt)
        per_prompt.append({"tokens": tokens[len(prompt):], "accepted": accepted_per_step})
    steps = [m for p in per_prompt for m in p["accepted"]]
    return {
        "tree": shape, "nodes": tree_nodes(shape), "paths": paths,
        "tau": round(sum(m + 1 for m in steps) / max(1, len(steps)), 4), "verify_steps": len(steps),
        "generated_tokens": generated,
        "per_prompt_tau": [round(sum(m + 1 for m in p["accepted"]) / max(1, len(p["accepted"])), 3)
                           for p in per_prompt],
        "outputs": [p["tokens"] for p in per_prompt],
    }


def summarize(sessions, k) -> dict:
    steps = [step for s in sessions for step in s.steps]
    reached = [sum(1 for d, n in steps if d > i and n >= i) for i in range(k)]
    accepted = [sum(1 for d, n in steps if d > i and n > i) for i in range(k)]
    return {
        "tau": round(sum(n + 1 for _, n in steps) / max(1, len(steps)), 4),
        "verify_steps": len(steps),
        "generated_tokens": sum(len(s.tokens) - s.prompt_len for s in sessions),
        "mean_draft_len": round(sum(d for d, _ in steps) / max(1, len(steps)), 3),
        "acceptance_by_position": [round(a / r, 4) if r else None for a, r in zip(accepted, reached)],
        "per_prompt_tau": [round(sum(n + 1 for _, n in s.steps) / max(1, len(s.steps)), 3) for s in sessions],
    }


def _full_vocab_model(hf_model, vocab: int):
    """A reduced-head drafter as transformers expects one: logits over the full vocabulary, -inf off the head."""
    draft_vocab = getattr(hf_model, "draft_vocab", None)
    if draft_vocab is None:
        return hf_model
    old = hf_model.lm_head.weight.detach()
    head = torch.nn.Linear(old.shape[1], vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[draft_vocab] = old
        head.bias.fill_(-1e9)
        head.bias[draft_vocab] = 0.0
    hf_model.lm_head = head
    return hf_model


@torch.inference_mode()
def hf_crosscheck(target_spec, drafter_hf, prompts, k, max_new_tokens, eos_ids) -> dict:
    """transformers' assisted generation, greedy, k drafted per step: committed tokens per target forward."""
    target = models.load_hf_model(target_spec)
    assistant = _full_vocab_model(drafter_hf, target.config.vocab_size).float().eval()
    assistant.generation_config.num_assistant_tokens = k
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    assistant.generation_config.assistant_confidence_threshold = 0.0
    calls = [0]
    hook = target.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    tokens = 0
    try:
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = target.generate(
                ids, attention_mask=torch.ones_like(ids), assistant_model=assistant, do_sample=False,
                max_new_tokens=max_new_tokens, eos_token_id=list(eos_ids), pad_token_id=list(eos_ids)[0],
            )
            tokens += out.shape[1] - ids.shape[1]
    finally:
        hook.remove()
    return {"prompts": len(prompts), "generated_tokens": tokens, "target_forwards": calls[0],
            "tokens_per_target_forward": round(tokens / max(1, calls[0]), 4)}


def read_prompts(path: str, tokenizer) -> list[list[int]]:
    prompts = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return prompts


def add_parser(subparsers, summary: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval-drafter",
        help=summary,
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--target", default=models.DEFAULT_TARGET, help="target model SPEC (default: %(default)s)")
    p.add_argument("--drafter", nargs="+", required=True, help="drafter SPEC(s): artifact dir, HF model dir, or ngram")
    p.add_argument("--prompts", required=True, help="JSONL of {messages: [...]} (or {prompt: ...}) records")
    p.add_argument("-k", type=int, default=5, help="draft tokens per verify step")
    p.add_argument("--temperature", type=float, nargs="+", default=[0.0, 0.7], help="0 = greedy")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompts")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--hf-crosscheck", type=int, default=0, metavar="N", help="also run transformers' assisted generation on N prompts"
    )
    p.add_argument("--tree", metavar="K1,K2,...",
                   help="also measure greedy tau with a static draft tree of a feature drafter (top-K per depth, "
                        "e.g. 4,2,2,1,1), offline, one prompt at a time")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=run)
    return p


def tree_shape(spec: str) -> list[int]:
    """`--tree 4,2,2,1,1` -> [4, 2, 2, 1, 1]: the top-K drafted at each depth, each at least 1."""
    try:
        shape = [int(k) for k in spec.split(",")]
    except ValueError:
        shape = []
    if not shape or min(shape) < 1:
        raise SystemExit(f"--tree {spec!r}: give the top-K at each depth, comma-separated, e.g. 4,2,2,1,1")
    return shape


def run(args) -> int:
    shape = tree_shape(args.tree) if args.tree else None
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = models.load_tokenizer(args.target)
    prompts = read_prompts(args.prompts, tokenizer)
    if args.limit:
        prompts = prompts[: args.limit]
    eos_ids = {t for t in (tokenizer.eos_token_id,) if t is not None}
    target_hf = models.load_hf_model(args.target)
    target_engine = LlamaEngine(target_hf, device, dtype)
    vocab = target_hf.config.vocab_size
    del target_hf
    max_len = max(len(p) for p in prompts) + args.max_new_tokens + args.k + 2
    report = {"target": args.target, "prompts": args.prompts, "num_prompts": len(prompts), "k": args.k,
              "max_new_tokens": args.max_new_tokens, "device": str(device), "drafters": {}}
    for spec in args.drafter:
        drafter, drafter_hf = _load_drafter(spec, args.target, len(prompts), max_len, device, dtype, vocab)
        results = {}
        for temperature in args.temperature:
            started = time.perf_counter()
            stats = measure(target_engine, drafter, prompts, args.k, SamplingConfig(temperature=temperature),
                            args.max_new_tokens, eos_ids, args.seed, device)
            stats["seconds"] = round(time.perf_counter() - started, 1)
            results[f"T={temperature:g}"] = stats
            by_pos = " ".join("-" if a is None else f"{a:.2f}" for a in stats["acceptance_by_position"])
            print(f"{spec}  T={temperature:g}  k={args.k}  tau={stats['tau']:.3f}  acceptance by position: {by_pos}  "
                  f"({stats['verify_steps']} steps, {stats['generated_tokens']} tokens, {stats['seconds']} s)")
        if args.hf_crosscheck and drafter_hf is not None:
            check = hf_crosscheck(
                args.target, drafter_hf, prompts[: args.hf_crosscheck], args.k, args.max_new_tokens, eos_ids
            )
            ours = results.get("T=0")
            if ours:
                per_prompt = ours["per_prompt_tau"][: args.hf_crosscheck]
                check["ours_mean_per_prompt_tau_same_prompts"] = round(sum(per_prompt) / len(per_prompt), 4)
            results["hf_assisted_generation_greedy"] = check
            print(f"{spec}  transformers assisted generation (greedy, k={args.k}, {check['prompts']} prompts): "
                  f"{check['tokens_per_target_forward']:.3f} tokens per target forward")
        if args.tree and not isinstance(drafter, _FeatureDrafter):
            print(f"{spec}  --tree skipped: trees are drafted by feature drafters only")
        elif args.tree:
            started = time.perf_counter()
            stats = measure_tree(target_engine, drafter.model, prompts, shape, args.max_new_tokens, eos_ids, device,
                                 dtype)
            stats["seconds"] = round(time.perf_counter() - started, 1)
            stats.pop("outputs")
            results[f"tree={args.tree}"] = stats
            print(f"{spec}  T=0  tree {args.tree} ({stats['nodes']} nodes)  tau={stats['tau']:.3f}  "
                  f"({stats['verify_steps']} steps, {stats['generated_tokens']} tokens, {stats['seconds']} s)")
        report["drafters"][spec] = results
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":  # python -m specdec.<module> <subcommand> ... is the same as `specdec <subcommand> ...`
    from specdec.cli import main

    sys.exit(main())
