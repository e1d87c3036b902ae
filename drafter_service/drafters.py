"""Drafters: given a session's committed tokens, propose up to k next tokens and the distributions they came from.

Two kinds, chosen once by `make_drafter`:
- `ngram` (prompt lookup): finds the latest earlier occurrence of the context's last n tokens (n = 3..1) and
  proposes what followed it. Deterministic, so each draft distribution is a point mass.
- `model`: a small causal LM with the target's tokenizer, or a drafter artifact trained by
  `specdec train-drafter` (which borrows the target's embeddings and may score a reduced draft vocabulary), run
  through the Llama engine with one KV slot per session. Greedy requests draft the argmax (point mass); sampled
  requests draw from the drafter's tempered distribution truncated to its top `TOP_N` tokens, and declare exactly
  that distribution (in full-vocabulary ids), which is all speculative sampling needs to stay lossless.

`propose` takes every session with pending work at once (batched drafting). A drafter's per-session state is
rolled back to what the context says is committed; nothing else is trusted. This module knows nothing about gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specdec.engine import LlamaEngine, Row
from specdec.errors import Exhausted
from specdec.sampling import SamplingConfig

TOP_N = 64  # support of a sampled draft distribution sent to the verifier


@dataclass
class DraftRequest:
    session_id: str
    context: list[int]  # prompt + committed tokens
    k: int
    sampling: SamplingConfig
    generator: torch.Generator | None = None


@dataclass
class Draft:
    tokens: list[int]
    # per token: (ids, probs) of the declared distribution; empty lists mean a point mass on the token
    distributions: list[tuple[list[int], list[float]]] = field(default_factory=list)


class NgramDrafter:
    kind = "ngram"

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

    def __init__(
        self,
        engine: LlamaEngine,
        max_sessions: int = 64,
        max_sequence_length: int = 2048,
        draft_vocab: list[int] | None = None,  # full-vocabulary id of each drafter logit (reduced draft head)
    ):
        self.engine = engine
        self.draft_vocab = draft_vocab
        self.cache = engine.new_cache(max_sessions, min(max_sequence_length, engine.shape.max_position_embeddings))
        self._slots: dict[str, int] = {}
        self._cached: dict[str, list[int]] = {}  # tokens whose KV is in the session's slot

    def open(self, session_id: str) -> None:
        slot = self.cache.allocate()
        if slot is None:
            raise Exhausted(f"all {self.cache.num_slots} drafter KV slots are in use")
        self._slots[session_id] = slot
        self._cached[session_id] = []

    def close(self, session_id: str) -> None:
        slot = self._slots.pop(session_id, None)
        self._cached.pop(session_id, None)
        if slot is not None:
            self.cache.release(slot)

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        live = [r for r in requests if r.k > 0 and len(r.context) + r.k < self.cache.max_len]
        drafts = {r.session_id: Draft([]) for r in requests}
        if not live:
            return [drafts[r.session_id] for r in requests]
        rows = []
        for r in live:
            cached = self._cached[r.session_id]
            keep = _common_prefix(cached, r.context)
            keep = min(keep, len(r.context) - 1)  # the last token is always fed: its logits start the draft
            rows.append(Row(self._slots[r.session_id], keep, r.context[keep:]))
            self._cached[r.session_id] = list(r.context)
        for step in range(max(r.k for r in live)):
            logits = self.engine.forward(self.cache, rows)
            next_rows = []
            for r, row, row_logits in zip(live, rows, logits):
                token, dist = _pick(row_logits[-1], r, self.draft_vocab)
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
        return [drafts[r.session_id] for r in requests]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _pick(
    logits: torch.Tensor, request: DraftRequest, draft_vocab: list[int] | None
) -> tuple[int, tuple[list[int], list[float]]]:
    """One draft token from logits [draft vocab], with the distribution it was drawn from (full-vocabulary ids)."""
    if request.sampling.greedy:
        index = int(logits.argmax())
        return (draft_vocab[index] if draft_vocab else index), ([], [])
    top = (logits.double() / request.sampling.temperature).topk(TOP_N)
    # float32 on the wire: sample from exactly the rounded, renormalized values the verifier will see
    probs = top.values.softmax(-1).float()
    probs = probs / probs.sum()
    index = int(torch.multinomial(probs.double(), 1, generator=request.generator))
    ids = top.indices.tolist()
    if draft_vocab:
        ids = [draft_vocab[i] for i in ids]
    return ids[index], (ids, probs.tolist())


def make_drafter(
    spec: str,
    device: str = "cpu",
    max_sessions: int = 64,
    max_sequence_length: int = 2048,
    target: str | None = None,
):
    """`ngram`, a drafter artifact (`target` names the model whose embeddings it borrows), or a model SPEC."""
    if spec == "ngram":
        return NgramDrafter()
    from specdec import models
    from specdec.drafter_model import is_drafter_artifact, load_drafter
    from verifier_service.app import default_dtype

    draft_vocab = None
    spec, alias_target = models.resolve_drafter(spec)
    if is_drafter_artifact(spec):
        hf_model = load_drafter(spec, target or alias_target or models.DEFAULT_TARGET)
        if getattr(hf_model, "draft_vocab", None) is not None:
            draft_vocab = hf_model.draft_vocab.tolist()
    else:
        hf_model = models.load_hf_model(spec)
    engine = LlamaEngine(hf_model, device=device, dtype=default_dtype(device))
    return ModelDrafter(engine, max_sessions, max_sequence_length, draft_vocab)
