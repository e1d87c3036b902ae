"""Drafters: given a session's committed tokens, propose up to k next tokens and the distributions they came from.

Three kinds, chosen once by `make_drafter`:
- `ngram` (prompt lookup): finds the latest earlier occurrence of the context's last n tokens (n = 3..1) and
  proposes what followed it. Deterministic, so each draft distribution is a point mass.
- `model`: a small causal LM with the target's tokenizer, or a drafter artifact trained by
  `specdec train-drafter` (which borrows the target's embeddings and may score a reduced draft vocabulary), run
  through the Llama engine with one KV slot per session. Greedy requests draft the argmax (point mass); sampled
  requests draw from the drafter's tempered distribution truncated to its top `TOP_N` tokens, and declare exactly
  that distribution (in full-vocabulary ids), which is all speculative sampling needs to stay lossless.
  With a prefix cache (specdec.prefix_cache, keyed under the drafter model's own seed) a new session copies its
  longest cached prefix into its slot and prefills only the rest; its prompt's blocks are saved after its first
  draft and its committed context's blocks when it closes. A hit is the KV the prefill would have computed, so
  drafts are the same with the cache on and off.

- `feature`: a feature-level drafter artifact (specdec.feature_drafter, EAGLE style): one layer fed the target's
  hidden states, which the verifier sends with each verdict (a fused drafter's: those of the several target layers
  it taps, side by side); greedy and sampled drafts as for `model`.

`propose` takes every session with pending work at once (batched drafting). A drafter's per-session state is
rolled back to what the context says is committed; nothing else is trusted. This module knows nothing about gRPC.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from specdec.draft_tree import TreeShape
from specdec.engine import LlamaEngine, Row
from specdec.errors import Exhausted
from specdec.hf_engine import TransformersEngine, make_engine
from specdec.prefix_cache import PrefixCache
from specdec.sampling import SamplingConfig, draft_picks

log = logging.getLogger(__name__)

TOP_N = 64  # support of a sampled draft distribution sent to the verifier


@dataclass
class DraftRequest:
    session_id: str
    context: list[int]  # prompt + committed tokens
    k: int
    sampling: SamplingConfig
    generator: torch.Generator | None = None
    # feature drafters: the target's hidden states [n, feature_width] of context tokens 0..n-1 (the last layer's, or
    # a fused drafter's taps' side by side; n <= len(context) - 1: the newest committed token has none yet, and a
    # proactive draft's guessed tokens have none); or a function making them, which the DraftBatcher calls on the
    # torch thread before drafting
    features: torch.Tensor | Callable[[], torch.Tensor] | None = None
    # a draft tree k levels deep instead of a chain (drafters that can: `can_draft_trees`); None = a chain
    tree: TreeShape | None = None


@dataclass
class Draft:
    tokens: list[int]
    # per token: (ids, probs) of the declared distribution; empty lists mean a point mass on the token
    distributions: list[tuple[list[int], list[float]]] = field(default_factory=list)
    parents: list[int] | None = None  # a draft tree: each token's parent (-1: the newest committed token)


class NgramDrafter:
    kind = "ngram"
    wants_features = False  # only feature drafters ask the verifier for hidden states
    can_draft_trees = False  # only feature drafters draft trees (DraftRequest.tree)

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def open(self, session_id: str) -> None:
        """Prompt lookup keeps no per-session state: every draft is computed from the committed context."""

    def close(self, session_id: str) -> None:
        """Nothing to free (see open)."""

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [Draft(self.lookup(r.context, r.k)) for r in requests]

    def lookup(self, context: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(context) - 1), 0, -1):
            suffix = context[-n:]
            # latest earlier occurrence: recent text predicts the continuation best
            for start in range(len(context) - n - 1, -1, -1):
                if context[start : start + n] == suffix:
                    follow = context[start + n : start + n + k]
                    if follow:
                        return follow
        return []


class ModelDrafter:
    kind = "model"
    wants_features = False
    can_draft_trees = False

    def __init__(
        self,
        engine: LlamaEngine | TransformersEngine,
        max_sessions: int = 64,
        max_sequence_length: int = 2048,
        draft_vocab: list[int] | None = None,  # full-vocabulary id of each drafter logit (reduced draft head)
        prefix_cache: PrefixCache | None = None,  # over this engine's shape, seeded by the drafter's identity
    ):
        self.engine = engine
        self.draft_vocab = draft_vocab
        self.cache = engine.new_cache(max_sessions, min(max_sequence_length, engine.shape.max_position_embeddings))
        self.prefix_cache = prefix_cache
        self._slots: dict[str, int] = {}
        self._cached: dict[str, list[int]] = {}  # tokens whose KV is in the session's slot
        # the context of the session's latest draft (committed tokens; with proactive drafting, maybe guesses
        # after them): all of it has its KV in the slot, so its full blocks are saved at close
        self._context: dict[str, list[int]] = {}
        self.prefilled_tokens = 0  # context tokens run through the model (drafted tokens not counted)
        self.cached_tokens = 0  # context tokens whose KV was copied from the prefix cache instead

    def open(self, session_id: str) -> None:
        slot = self.cache.allocate()
        if slot is None:
            raise Exhausted(f"all {self.cache.num_slots} drafter KV slots are in use")
        self._slots[session_id] = slot
        self._cached[session_id] = []

    def close(self, session_id: str) -> None:
        """Saves the session's committed blocks into the prefix cache (torch work: call on the torch thread, after
        any draft of the session still running there) and frees its slot."""
        slot = self._slots.pop(session_id, None)
        self._cached.pop(session_id, None)
        context = self._context.pop(session_id, None)
        if slot is None:
            return
        try:
            if self.prefix_cache is not None and context:
                self.prefix_cache.save(self.cache, slot, context, len(context))
        finally:
            self.cache.release(slot)

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        # a session closed meanwhile (its draft was cancelled) gets nothing: its slot may already be another's
        live = [r for r in requests
                if r.k > 0 and len(r.context) + r.k < self.cache.max_len and r.session_id in self._slots]
        drafts = {r.session_id: Draft([]) for r in requests}
        if not live:
            return [drafts[r.session_id] for r in requests]
        rows, fresh = [], []
        for r in live:
            slot, cached = self._slots[r.session_id], self._cached[r.session_id]
            if not cached and self.prefix_cache is not None:  # an empty slot: start from the longest cached prefix
                keep = self.prefix_cache.restore(self.cache, slot, r.context)
                self.cached_tokens += keep
                fresh.append(r)
            else:
                keep = _common_prefix(cached, r.context)
            keep = min(keep, len(r.context) - 1)  # the last token is always fed: its logits start the draft
            self.prefilled_tokens += len(r.context) - keep
            rows.append(Row(slot, keep, r.context[keep:]))
            self._cached[r.session_id] = list(r.context)
            self._context[r.session_id] = list(r.context)
        for step in range(max(r.k for r in live)):
            logits, _ = self.engine.forward_flat(self.cache, rows)  # [rows, draft vocab]: one per row
            next_rows = []
            for r, row, (token, dist) in zip(live, rows, _pick(logits, live, self.draft_vocab)):
                draft = drafts[r.session_id]
                draft.tokens.append(token)
                draft.distributions.append(dist)
                if len(draft.tokens) < r.k:
                    position = row.start + len(row.tokens)
                    self._cached[r.session_id].append(token)
                    next_rows.append((r, Row(row.slot, position, [token])))
            if not next_rows:
                break
            live, rows = [r for r, _ in next_rows], [row for _, row in next_rows]
        # Drafted tokens went to positions past each context, so the prompts' KV is intact: save it now, so that
        # sessions opened meanwhile with the same system prompt hit without waiting for this one to close.
        for r in fresh:
            self.prefix_cache.save(self.cache, self._slots[r.session_id], r.context, len(r.context))
        return [drafts[r.session_id] for r in requests]


class FeatureDrafter:
    """A feature-level drafter (specdec.feature_drafter): drafts from the target's hidden states, which the verifier
    sends with each verdict (SessionSpec.return_features; for a fused drafter, those of the layers its model taps:
    SessionSpec.feature_layers). Rows made from the target's features are kept across drafts; rows made from the
    drafter's own predictions never are. Context tokens past the features (a proactive draft's guesses) are fed in
    order with predicted features before drafting starts."""

    kind = "feature"
    wants_features = True
    can_draft_trees = True

    def __init__(self, model, device="cpu", dtype=torch.float32, max_sessions: int = 64,
                 max_sequence_length: int = 2048):
        from specdec.feature_drafter import FeatureRunner

        max_len = min(max_sequence_length, model.config.max_position_embeddings)
        self.runner = FeatureRunner(model, device, dtype, max_sessions, max_len)
        started = time.perf_counter()
        captured = self.runner.warm_graphs(max_sessions)
        if captured:
            log.info("feature drafter: %d CUDA graphs captured before serving in %.1f s", captured,
                     time.perf_counter() - started)
        self.draft_vocab = None if model.draft_vocab is None else model.draft_vocab.tolist()
        # the target layers whose outputs it reads (SessionSpec.feature_layers; empty: the last only) and the width
        # of the features the verifier sends for them
        self.feature_layers = list(model.taps or [])
        self.feature_width = self.runner.feature_width
        self._slots: dict[str, int] = {}
        self._rows: dict[str, list[int]] = {}  # tokens of the slot's rows made from the target's features
        # what the last `propose` held, for the batcher's phases: "wide" (a row past the graphs' width: a new
        # session's prompt), "ahead" (a proactive draft's guessed tokens fed first), "tree", or "chain"
        self.last_batch_kind = "chain"

    def open(self, session_id: str) -> None:
        slot = self.runner.cache.allocate()
        if slot is None:
            raise Exhausted(f"all {self.runner.cache.num_slots} drafter KV slots are in use")
        self._slots[session_id] = slot
        self._rows[session_id] = []

    def close(self, session_id: str) -> None:
        slot = self._slots.pop(session_id, None)
        self._rows.pop(session_id, None)
        if slot is not None:
            self.runner.cache.release(slot)

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = {r.session_id: Draft([]) for r in requests}
        live = [r for r in requests if r.k > 0 and r.session_id in self._slots and r.features is not None
                and r.features.shape[0] > 0 and len(r.context) + r.k < self.runner.cache.max_len]
        if not live:
            self.last_batch_kind = "empty"
            return [drafts[r.session_id] for r in requests]
        rows, feats, forced, positions = [], [], [], []
        for r in live:
            # row p holds token p + 1 made with feature p; the first n rows can be made from the target's
            n = min(r.features.shape[0], len(r.context) - 1)
            keep = min(_common_prefix(self._rows[r.session_id], r.context[1 : n + 1]), n - 1)
            slot = self._slots[r.session_id]
            rows.append(Row(slot, keep, r.context[keep + 1 : n + 1]))
            feats.append(r.features[keep:n])
            self._rows[r.session_id] = r.context[1 : n + 1]
            forced.append(r.context[n + 1 :])
            positions.append(n)
        self.last_batch_kind = ("wide" if any(len(row.tokens) > self.runner.MAX_GRAPH_WIDTH for row in rows)
                                else "ahead" if any(forced) else "tree" if any(r.tree for r in live) else "chain")
        tree_groups: dict[tuple, list[int]] = {}  # (depth, shape) -> the live rows that want such a tree
        for b, r in enumerate(live):
            if r.tree is not None and not forced[b] and len(r.context) + r.tree.nodes(r.k) < self.runner.cache.max_len:
                tree_groups.setdefault((r.k, r.tree), []).append(b)
        for (depth, shape), group in tree_groups.items():
            trees = self.runner.draft_tree(
                [rows[b] for b in group], [feats[b] for b in group], depth, shape.branch, shape.beam,
                [0.0 if live[b].sampling.greedy else live[b].sampling.temperature for b in group],
                [live[b].generator for b in group], TOP_N)
            for b, tree in zip(group, trees):
                drafts[live[b].session_id] = Draft(tree.tokens, tree.distributions, tree.parents)
        if tree_groups:
            chains = [b for b in range(len(live)) if not any(b in g for g in tree_groups.values())]
            live, rows, feats = [live[b] for b in chains], [rows[b] for b in chains], [feats[b] for b in chains]
            forced, positions = [forced[b] for b in chains], [positions[b] for b in chains]
            if not live:
                return [drafts[r.session_id] for r in requests]
        steps = max(r.k for r in live)
        lead = max(len(f) for f in forced)
        if all(positions[b] + lead + steps < self.runner.cache.max_len for b in range(len(live))):
            # every step on the device, one copy at the end; a guessed context (a proactive draft's: `forced`)
            # is fed there too, so one such request no longer sends the whole batch down the host loop below
            # (measured at 64 users on an H200: ~90 synchronizations a batch that way)
            temperatures = [0.0 if r.sampling.greedy else r.sampling.temperature for r in live]
            uniforms = None
            if any(temperatures):  # each sampled session's own draws, r.k of them, as the host loop takes them
                uniforms = torch.zeros(len(live), lead + steps, dtype=torch.float64)
                for b, r in enumerate(live):
                    if temperatures[b]:
                        uniforms[b, len(forced[b]) : len(forced[b]) + r.k] = torch.rand(
                            r.k, generator=r.generator, dtype=torch.float64)
            tokens, dists = self.runner.draft(rows, feats, steps, temperatures, uniforms, TOP_N, forced)
            for b, r in enumerate(live):
                drafts[r.session_id] = Draft(tokens[b][: r.k], dists[b][: r.k] if dists else [([], [])] * r.k)
            return [drafts[r.session_id] for r in requests]
        while live:
            logits, predicted = self.runner.step(rows, feats)
            next_live, next_rows, next_feats = [], [], []
            picks = _pick(logits, live, self.draft_vocab, skip=[bool(f) for f in forced])
            for b, (r, row, (token, dist)) in enumerate(zip(live, rows, picks)):
                draft = drafts[r.session_id]
                if forced[b]:  # a guessed context token: fed, not drafted
                    token = forced[b].pop(0)
                else:
                    draft.tokens.append(token)
                    draft.distributions.append(dist)
                if len(draft.tokens) < r.k:
                    next_live.append((r, b))
                    next_rows.append(Row(row.slot, positions[b], [token]))
                    next_feats.append(predicted[b : b + 1])
                    positions[b] += 1
            forced = [forced[b] for _, b in next_live]
            positions = [positions[b] for _, b in next_live]
            live, rows, feats = [r for r, _ in next_live], next_rows, next_feats
        return [drafts[r.session_id] for r in requests]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _pick(logits: torch.Tensor, requests: list[DraftRequest], draft_vocab: list[int] | None,
          skip: list[bool] | None = None):
    """Per row of logits [rows, draft vocab]: (token, declared distribution), or (None, None) where skip says so
    (no draw spent on it). Greedy rows take one argmax kernel and one host copy for the whole batch, not one per
    row, and declare a point mass."""
    argmax = logits.argmax(-1).tolist() if any(r.sampling.greedy for r in requests) else []
    for b, r in enumerate(requests):
        if skip and skip[b]:
            yield None, None
        elif r.sampling.greedy:
            yield (draft_vocab[argmax[b]] if draft_vocab else argmax[b]), ([], [])
        else:
            yield _sample(logits[b], r, draft_vocab)


def _sample(
    logits: torch.Tensor, request: DraftRequest, draft_vocab: list[int] | None
) -> tuple[int, tuple[list[int], list[float]]]:
    """One sampled draft token from logits [draft vocab], with the distribution it was drawn from (full-vocabulary
    ids). Greedy rows take the batch's argmax instead (_pick)."""
    temperature = torch.tensor([request.sampling.temperature])
    uniform = torch.rand(1, generator=request.generator, dtype=torch.float64)
    pick, top_ids, probs = draft_picks(logits[None], temperature, uniform, TOP_N)
    token, ids = int(pick[0]), top_ids[0].tolist()
    if draft_vocab:
        token, ids = draft_vocab[token], [draft_vocab[i] for i in ids]
    return token, (ids, probs[0].tolist())


def make_drafter(
    spec: str,
    device: str = "cpu",
    max_sessions: int = 64,
    max_sequence_length: int = 2048,
    target: str | None = None,
    prefix_cache_blocks: int = 256,
):
    """`ngram`, a drafter artifact (`target` names the model whose embeddings it borrows), or a model SPEC.
    prefix_cache_blocks: the model drafter's prefix cache size in 16-token KV blocks (0 = off)."""
    if spec == "ngram":
        return NgramDrafter()
    from specdec import models
    from specdec.drafter_model import is_drafter_artifact, load_drafter
    from specdec.prefix_hash import model_seed
    from verifier_service.app import default_dtype

    draft_vocab = None
    spec, alias_target = models.resolve_drafter(spec)
    identity = f"drafter:{spec}"
    from specdec.feature_drafter import is_feature_drafter, load_feature_drafter

    if is_feature_drafter(spec):
        model = load_feature_drafter(spec, target or alias_target or models.DEFAULT_TARGET)
        return FeatureDrafter(model, device, default_dtype(device), max_sessions, max_sequence_length)
    if is_drafter_artifact(spec):
        target = target or alias_target or models.DEFAULT_TARGET
        hf_model = load_drafter(spec, target)
        identity += f":{target}"  # the KV also depends on the target's embeddings the artifact borrows
        if getattr(hf_model, "draft_vocab", None) is not None:
            draft_vocab = hf_model.draft_vocab.tolist()
    else:
        hf_model = models.load_hf_model(spec)
    engine = make_engine(hf_model, device=device, dtype=default_dtype(device))
    prefix_cache = None
    if prefix_cache_blocks > 0 and engine.supports_prefix_cache:
        # The "drafter:" identity keeps these keys apart from any verifier's, even for the same model files.
        prefix_cache = PrefixCache(engine.shape, prefix_cache_blocks, engine.device, engine.dtype, model_seed(identity))
    return ModelDrafter(engine, max_sessions, max_sequence_length, draft_vocab, prefix_cache)
