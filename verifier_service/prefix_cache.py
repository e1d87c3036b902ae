"""The verifier's prefix cache: the shared KV block cache (specdec.prefix_cache) plus the session lifecycle.

On open, the session's longest cached prefix is copied into its KV slot and only the rest is prefilled; after
prefill and when the session closes, its full blocks (prompt, then prompt + committed) are copied into the pool.
Blocks keep the hidden states of the layers their saver asked for (SessionSettings.feature_layers); they serve
sessions asking for the same layers, or for the last layer alone.
The block pool, hashing and LRU live in specdec.prefix_cache; this module only decides when a verifier session's
KV is worth saving. Every method runs on the torch thread (specdec.compute). Gained and lost block hashes go to
`on_change` (the locality publisher); this module knows nothing about Redis or scheduling.
"""

from __future__ import annotations

import torch

from specdec import prefix_cache
from specdec.engine import KVCache


class PrefixCache(prefix_cache.PrefixCache):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._prefilled: set[str] = set()  # sessions whose slot KV is valid up to their kv_length

    def after_prefill(self, cache: KVCache, session) -> None:
        """Saves the prompt's blocks at once, so concurrent sessions sharing a system prompt hit."""
        self._prefilled.add(session.id)
        self.save(cache, session.slot, session.tokens, session.kv_length, _features(session),
                  session.settings.feature_layers)

    def wants(self, session) -> bool:
        """Whether closing this session has KV worth saving (a failed prefill leaves none)."""
        return session.id in self._prefilled

    def on_close(self, cache: KVCache, session) -> None:
        if session.id in self._prefilled:
            self._prefilled.discard(session.id)
            self.save(cache, session.slot, session.tokens, session.kv_length, _features(session),
                      session.settings.feature_layers)


def _features(session):
    """The hidden states of the session's committed tokens (one per token but the newest) that it kept: its
    feature_layers' side by side, or the last layer's."""
    return torch.cat(session.features) if session.features else None
