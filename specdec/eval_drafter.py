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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specdec import drafter_model, models
from specdec.draft_tree import TreeShape
from specdec.engine import LlamaEngine, Row, tree_visibility
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

    def rows(self, sessions) -> tuple[list[Row], list[torch.Tensor]]:
        """The drafter's rows for the sessions' committed tokens not yet in its cache, and their features."""
        rows, feats = [], []
        for s in sessions:
            f = self.features[s.slot]
            n = f.shape[0]  # = len(s.tokens) - 1; row p is token p + 1 with feature p
            start = min(self.valid.get(s.slot, 0), n - 1)  # at least one row: its output starts the draft
            rows.append(Row(s.slot, start, s.tokens[start + 1 : n + 1]))
            feats.append(f[start:n])
            self.valid[s.slot] = n  # later rows will hold drafted tokens: not trusted next time
        return rows, feats

    def propose(self, sessions, k, config, generator) -> list[list[int]]:
        rows, feats = self.rows(sessions)
        known = [r.start + len(r.tokens) for r in rows]
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


def measure_tree(target_engine, drafter: "_FeatureDrafter", prompts, k, shape, config, max_new_tokens, eos_ids,
                 seed) -> dict:
    """`measure` with draft trees, through the code that serves them: the feature drafter's
    FeatureRunner.draft_tree (`shape`: a specdec.draft_tree.TreeShape, k levels deep), one tree-attention
    pass of the target for every session's tree (the verifier's row layout), verify_tree (sampled) or its greedy
    walk, and the accepted path's KV moved into place (KVCache.move). Tau counts tokens per verify step as for
    chains; acceptance by position is by depth; nodes_per_step is the verify pass's extra width."""
    from drafter_service.drafters import TOP_N
    from specdec.verification import tree_depths, verify_tree, verify_tree_greedy

    generator = torch.Generator().manual_seed(seed)
    nodes = shape.nodes(k)
    cache = target_engine.new_cache(len(prompts), max(len(p) for p in prompts) + max_new_tokens + nodes + 2)
    sessions = [_Session(slot=i, tokens=list(p), prompt_len=len(p)) for i, p in enumerate(prompts)]
    drafter.prefill(sessions)
    layers = drafter.taps or True
    rows = [Row(s.slot, 0, s.tokens[:-1]) for s in sessions]
    _, _, hidden = target_engine.forward_flat(cache, rows, hidden=layers)
    for s, h in zip(sessions, hidden.split([len(r.tokens) for r in rows])):
        s.target_len = len(s.tokens) - 1
        drafter.observe(s, h)
    temperature = 0.0 if config.greedy else config.temperature
    vocab = target_engine.shape.vocab_size
    node_counts = []
    while True:
        active = [s for s in sessions if not s.done]
        if not active:
            break
        trees = drafter.runner.draft_tree(*drafter.rows(active), k, shape.branch, shape.beam,
                                          [temperature] * len(active), [generator] * len(active), TOP_N)
        rows = [Row(s.slot, s.target_len, [s.tokens[-1], *tree.tokens], True, tree_base=s.target_len,
                    visible=tree_visibility(tree.parents)) for s, tree in zip(active, trees)]
        flat, sizes, hidden = target_engine.forward_flat(cache, rows, hidden=layers)
        moves: tuple[list, list, list] = ([], [], [])
        for s, tree, logits, h in zip(active, trees, flat.split(sizes), hidden.split(sizes)):
            if config.greedy:
                verdict = verify_tree_greedy(logits.argmax(-1).tolist(), tree.tokens, tree.parents)
            else:
                draft_probs = torch.zeros(len(tree.tokens), vocab, dtype=torch.float64)
                for i, (ids, probs) in enumerate(tree.distributions):
                    draft_probs[i, ids] = torch.tensor(probs, dtype=torch.float64)
                draft_probs /= draft_probs.sum(-1, keepdim=True)
                verdict = verify_tree(probs_from_logits(logits.double().cpu(), config), tree.tokens, tree.parents,
                                      draft_probs, torch.rand(len(tree.tokens), generator=generator,
                                                              dtype=torch.float64),
                                      torch.rand(1, generator=generator, dtype=torch.float64))
            path = verdict.path
            for depth, node in enumerate(path):
                moves[0].append(s.slot)
                moves[1].append(s.target_len + 1 + node)
                moves[2].append(s.target_len + 1 + depth)
            old_len = len(s.tokens)
            s.steps.append((max(tree_depths(tree.parents), default=0), len(path)))
            node_counts.append(len(tree.tokens))
            s.target_len = old_len + len(path)
            drafter.observe(s, h[[0] + [j + 1 for j in path]])
            for token in [*(tree.tokens[j] for j in path), verdict.next_token]:
                s.tokens.append(token)
                if token in eos_ids or len(s.tokens) - s.prompt_len >= max_new_tokens:
                    s.done = True
                    break
        cache.move(*moves)
    return {**summarize(sessions, k), "tree": f"{shape.branch}x{shape.beam}", "max_nodes": nodes,
            "nodes_per_step": round(sum(node_counts) / max(1, len(node_counts)), 2),
            "outputs": [s.tokens[s.prompt_len :] for s in sessions]}


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
    p.add_argument("--tree", metavar="BRANCHxBEAM",
                   help="also measure draft trees of a feature drafter, k levels deep, at each temperature, as "
                        "`specdec serve --draft-tree` drafts and verifies them (e.g. 4x4: the root's 4 likeliest "
                        "children, then 4 children for each of the 4 likeliest nodes of each level)")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    try:
        shape = TreeShape.parse(args.tree) if args.tree else None
    except ValueError as exc:
        raise SystemExit(f"--tree: {exc}") from None
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
    max_len = max(len(p) for p in prompts) + args.max_new_tokens + (shape.nodes(args.k) if shape else args.k) + 2
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
        if shape and not isinstance(drafter, _FeatureDrafter):
            print(f"{spec}  --tree skipped: trees are drafted by feature drafters only")
        elif shape:
            for temperature in args.temperature:
                started = time.perf_counter()
                stats = measure_tree(target_engine, drafter, prompts, args.k, shape,
                                     SamplingConfig(temperature=temperature), args.max_new_tokens, eos_ids, args.seed)
                stats["seconds"] = round(time.perf_counter() - started, 1)
                stats.pop("outputs")
                results[f"T={temperature:g} tree={args.tree}"] = stats
                by_depth = " ".join("-" if a is None else f"{a:.2f}" for a in stats["acceptance_by_position"])
                print(f"{spec}  T={temperature:g}  tree {args.tree}, {args.k} deep ({stats['nodes_per_step']} "
                      f"nodes a step)  tau={stats['tau']:.3f}  acceptance by depth: {by_depth}  "
                      f"({stats['verify_steps']} steps, {stats['generated_tokens']} tokens, {stats['seconds']} s)")
        report["drafters"][spec] = results
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":  # python -m specdec.<module> <subcommand> ... is the same as `specdec <subcommand> ...`
    from specdec.cli import main

    sys.exit(main())
