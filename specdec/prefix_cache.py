"""A prefix cache of KV blocks: full 16-token blocks keyed by chained hash, reused across sessions of one engine.

A preallocated pool of blocks (keys/values [num_blocks, kv_heads, 16, head_dim] per layer) bounds the memory;
an LRU index maps block hash -> pool block. `restore` copies a token list's longest cached prefix into a KV slot
(the caller prefills only the rest); `save` copies the full blocks of a slot's valid KV into the pool. Copies, not
shared pages: a slot never aliases the pool, so eviction can never corrupt a running session, and rollback in the
slot stays free.

A block's KV depends on every token before it; the chained hash (specdec.prefix_hash) names exactly that prefix,
seeded by the model's identity, so a hit is the KV the prefill would have computed and two models never share a
key. Both tiers use this class: the verifier (verifier_service.prefix_cache adds its session lifecycle and
publishes changes) and the model drafter. Every method does torch work: call it on the torch thread
(specdec.compute). Gained and lost block hashes go to `on_change`; this module knows nothing about Redis,
sessions or scheduling.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from specdec.engine import KVCache, LlamaShape
from specdec.prefix_hash import BLOCK_TOKENS, block_hashes


class PrefixCache:
    """features: also keep, per block, the target's last-layer hidden states of its 16 tokens (float16, on the host)
    when a saver has them, so sessions of feature-level drafters, which need the hidden state of every prompt token,
    can restore a prefix too (`restore_with_features` stops at the first block saved without them)."""

    def __init__(self, shape: LlamaShape, num_blocks: int, device, dtype, seed: bytes,
                 on_change: Callable[[list[str], list[str]], None] | None = None, features: bool = False):
        size = (num_blocks, shape.num_kv_heads, BLOCK_TOKENS, shape.head_dim)
        self.keys = [torch.zeros(size, device=device, dtype=dtype) for _ in range(shape.num_layers)]
        self.values = [torch.zeros(size, device=device, dtype=dtype) for _ in range(shape.num_layers)]
        self.num_blocks = num_blocks
        self.seed = seed
        self.on_change = on_change
        self._index: OrderedDict[str, int] = OrderedDict()  # hash -> pool block; least recently used first
        # [num_blocks, 16, hidden] float16 on the host, valid for the blocks in _with_features
        self.features = torch.zeros(num_blocks, BLOCK_TOKENS, shape.hidden_size, dtype=torch.float16) if features else None
        self._with_features: set[int] = set()
        self._free = list(range(num_blocks - 1, -1, -1))
        self.hits = self.lookups = 0  # blocks found / blocks asked, for logs and benchmarks

    def held(self) -> list[str]:
        return list(self._index)

    def restore(self, cache: KVCache, slot: int, tokens: list[int]) -> int:
        """Copies the longest cached prefix of tokens into the slot; returns how many tokens need no prefill."""
        return self._restore(cache, slot, tokens, with_features=False)[0]

    def restore_with_features(self, cache: KVCache, slot: int, tokens: list[int]) -> tuple[int, torch.Tensor | None]:
        """`restore` for a session that wants hidden states: only blocks cached with theirs count; returns that
        count and their hidden states [count, hidden] (float16, host), or (0, None)."""
        return self._restore(cache, slot, tokens, with_features=True)

    def _restore(self, cache: KVCache, slot: int, tokens: list[int], with_features: bool):
        hashes = block_hashes(tokens, self.seed)
        found = 0
        for h in hashes:
            if h not in self._index or (with_features and self._index[h] not in self._with_features):
                break
            found += 1
        self.lookups += len(hashes)
        self.hits += found
        if not found:
            return 0, None
        ids = [self._index[h] for h in hashes[:found]]
        blocks = torch.tensor(ids, device=self.keys[0].device)
        n = found * BLOCK_TOKENS
        for pool, slots in ((self.keys, cache.keys), (self.values, cache.values)):
            for layer_pool, layer_slots in zip(pool, slots):
                chunk = layer_pool.index_select(0, blocks)  # [found, kv_heads, 16, head_dim]
                layer_slots[slot, :, :n] = chunk.transpose(0, 1).reshape(chunk.shape[1], n, chunk.shape[3])
        self._touch(hashes[:found])
        # At least one token is always recomputed: the prefill needs the last prompt token's logits.
        n = min(n, len(tokens) - 1)
        return n, self.features[ids].reshape(-1, self.features.shape[-1])[:n] if with_features else None

    def save(self, cache: KVCache, slot: int, tokens: list[int], kv_length: int,
             features: torch.Tensor | None = None) -> None:
        """Copies the full blocks among the first kv_length tokens (those whose KV is valid) into the pool, with
        their hidden states when `features` [>= their tokens, hidden] is given."""
        hashes = block_hashes(tokens, self.seed, max_tokens=kv_length)[: self.num_blocks]
        self._touch(hashes)  # the chain's own blocks are now most recent: eviction takes others first
        new = [i for i, h in enumerate(hashes) if h not in self._index]
        # blocks cached before by a session without hidden states get them now, if this one has them
        lacking = [i for i, h in enumerate(hashes) if h in self._index and self._index[h] not in self._with_features]
        lost = []
        if new:
            while len(self._free) < len(new):
                victim, block = self._index.popitem(last=False)
                self._free.append(block)
                lost.append(victim)
            targets = [self._free.pop() for _ in new]
            for i, block in zip(new, targets):
                self._index[hashes[i]] = block
                self._with_features.discard(block)  # a reused block's old hidden states are not this one's
            self._touch(hashes)
            src = torch.tensor(new, device=self.keys[0].device)
            dst = torch.tensor(targets, device=self.keys[0].device)
            width = len(hashes) * BLOCK_TOKENS
            for pool, slots in ((self.keys, cache.keys), (self.values, cache.values)):
                for layer_pool, layer_slots in zip(pool, slots):
                    kv_heads, _, head_dim = layer_slots.shape[1:]
                    blocks = layer_slots[slot, :, :width].reshape(kv_heads, len(hashes), BLOCK_TOKENS, head_dim)
                    layer_pool[dst] = blocks.index_select(1, src).transpose(0, 1)
        if features is not None and self.features is not None:
            for i in new + lacking:
                rows = features[i * BLOCK_TOKENS : (i + 1) * BLOCK_TOKENS]
                if rows.shape[0] == BLOCK_TOKENS and hashes[i] in self._index:  # (evicted by this very save)
                    block = self._index[hashes[i]]
                    self.features[block] = rows.to("cpu", torch.float16)
                    self._with_features.add(block)
        if new and self.on_change:
            self.on_change([hashes[i] for i in new], lost)

    def _touch(self, hashes: list[str]) -> None:
        # Children first, so a chain's parents are the more recent: LRU evicts a chain from its tail, and a
        # surviving chain is never cut in the middle.
        for h in reversed(hashes):
            if h in self._index:
                self._index.move_to_end(h)
