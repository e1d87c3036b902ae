"""The fallback engine: any causal LM transformers can run, behind the same interface as specdec.engine's.

The Llama-family engine (specdec/engine.py) is the fast path. Architectures outside that family (GPT-2, Phi,
Gemma, ...) still serve through this one: each KV slot is a transformers `DynamicCache`, and a pass runs the
rows one at a time through the model's own forward, after cropping each slot's cache to the row's start (which
is how rejected draft tokens are rolled back). No cross-session batching, no CUDA graphs, no prefix cache: it is
for correctness with any model, not speed. `make_engine` picks the engine once, at the edge.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch

from specdec.engine import SUPPORTED_MODEL_TYPES, LlamaEngine, Row, UnsupportedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """What the tiers read from an engine's shape."""

    vocab_size: int
    max_position_embeddings: int


class SlotCaches:
    """Per-session transformers caches: the slot interface of specdec.engine.KVCache (allocate / release)."""

    def __init__(self, num_slots: int, max_len: int):
        self.num_slots = num_slots
        self.max_len = max_len
        self.caches: list = [None] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    def allocate(self) -> int | None:
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        self.caches[slot] = None
        self._free.append(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)


class TransformersEngine:
    """Runs rows through a transformers causal LM, one row per forward, each with its own cache."""

    supports_prefix_cache = False
    supports_trees = False  # transformers' classes take no tree attention mask here: chains only

    def __init__(self, hf_model, device="cpu", dtype=torch.float32):
        self.model = hf_model.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.dtype = dtype
        config = hf_model.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
        self.shape = ModelShape(config.vocab_size, limit)
        # transformers renamed `past_key_values` to `cache` (5.2x); take whichever this version's model has
        parameters = inspect.signature(hf_model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"

    def new_cache(self, num_slots: int, max_len: int) -> SlotCaches:
        return SlotCaches(num_slots, max_len)

    def forward(self, cache: SlotCaches, rows: list[Row]) -> list[torch.Tensor]:
        """Per row logits [n, vocab] (n = len(tokens) or 1), float32."""
        logits, sizes = self.forward_flat(cache, rows)
        return list(logits.split(sizes))

    @torch.inference_mode()
    def forward_flat(self, cache: SlotCaches, rows: list[Row], hidden: bool = False) -> tuple[torch.Tensor, list[int]]:
        from transformers import DynamicCache

        if hidden:
            raise UnsupportedModel("feature-level drafters need the Llama-family engine's hidden states; this target "
                                   "runs through transformers: use a token-level drafter (a model or ngram)")

        out = []
        for row in rows:
            past = cache.caches[row.slot]
            if past is None or row.start == 0:
                past = cache.caches[row.slot] = DynamicCache(config=self.model.config)
            if past.get_seq_length() > row.start:  # roll back what the slot holds past the row's start
                past.crop(row.start - past.get_seq_length())  # a negative count: tokens to drop, in every version
            if past.get_seq_length() != row.start:
                raise RuntimeError(f"slot {row.slot} holds {past.get_seq_length()} tokens, the row starts at "
                                   f"{row.start}: the caller skipped tokens")
            ids = torch.tensor([row.tokens], device=self.device)
            positions = torch.arange(row.start, row.start + len(row.tokens), device=self.device)[None]
            result = self.model(input_ids=ids, position_ids=positions, use_cache=True, **{self._cache_arg: past})
            logits = result.logits[0]  # [n, vocab]
            out.append((logits if row.all_logits else logits[-1:]).float())
        return torch.cat(out), [len(r.tokens) if r.all_logits else 1 for r in rows]


def make_engine(hf_model, device="cpu", dtype=torch.float32):
    """The Llama-family engine when the architecture is one it implements, else the transformers fallback."""
    if hf_model.config.model_type in SUPPORTED_MODEL_TYPES:
        return LlamaEngine(hf_model, device=device, dtype=dtype)
    log.warning("%s is outside the fast engine's families (%s): serving it through transformers' own model, one "
                "session per forward and without prefix caching", hf_model.config.model_type,
                ", ".join(SUPPORTED_MODEL_TYPES))
    return TransformersEngine(hf_model, device=device, dtype=dtype)
