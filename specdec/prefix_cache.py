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
    """features: also keep, per block, the target's hidden states of its 16 tokens (float16, on the host) when a
    saver has them, so sessions of feature-level drafters, which need the hidden state of every prompt token, can
    restore a prefix too (`restore_with_features` stops at the first block saved without the layers it wants). A
    block keeps the layers its saver had (a fused drafter's several, side by side, the last layer's last); it serves
    a session asking for those layers, or for the last layer alone (its last columns)."""

    def __init__(self, shape: LlamaShape, num_blocks: int, device, dtype, seed: bytes,
                 on_change: Callable[[list[str], list[str]], None] | None = None, features: bool = False):
        # every layer's blocks in one tensor each for keys and values, as the KVCache keeps its slots, so a restore
        # or a save is one indexed copy each, not one per layer
        size = (shape.num_layers, num_blocks, shape.num_kv_heads, BLOCK_TOKENS, shape.head_dim)
        self.keys = torch.zeros(size, device=device, dtype=dtype)
        self.values = torch.zeros(size, device=device, dtype=dtype)
        self.num_blocks = num_blocks
        self.seed = seed
        self.on_change = on_change
        self._index: OrderedDict[str, int] = OrderedDict()  # hash -> pool block; least recently used first
        # pool block -> (its saver's layers, () = the last alone; hidden states [16, (len(layers) or 1) * hidden]
        # float16 on the host)
        self.features: dict[int, tuple[tuple[int, ...], torch.Tensor]] | None = {} if features else None
        self.hidden_size = shape.hidden_size
        self._free = list(range(num_blocks - 1, -1, -1))
        self.hits = self.lookups = 0  # blocks found / blocks asked, for logs and benchmarks

    def held(self) -> list[str]:
        return list(self._index)

    def restore(self, cache: KVCache, slot: int, tokens: list[int]) -> int:
        """Copies the longest cached prefix of tokens into the slot; returns how many tokens need no prefill."""
        return self._restore(cache, slot, tokens, with_features=False)[0]

    def restore_with_features(self, cache: KVCache, slot: int, tokens: list[int],
                              layers: tuple[int, ...] = ()) -> tuple[int, torch.Tensor | None]:
        """`restore` for a session that wants hidden states of `layers` (() = the last layer alone): only blocks
        cached with those count; returns that count and their hidden states [count, (len(layers) or 1) * hidden]
        (float16, host), or (0, None)."""
        return self._restore(cache, slot, tokens, with_features=True, layers=tuple(layers))

    def _serves(self, block: int, layers: tuple[int, ...]) -> bool:
        saved = self.features.get(block) if self.features is not None else None
        return saved is not None and (saved[0] == layers or not layers)

    def _restore(self, cache: KVCache, slot: int, tokens: list[int], with_features: bool, layers=()):
        hashes = block_hashes(tokens, self.seed)
        found = 0
        for h in hashes:
            if h not in self._index or (with_features and not self._serves(self._index[h], layers)):
                break
            found += 1
        self.lookups += len(hashes)
        self.hits += found
        if not found:
            return 0, None
        ids = [self._index[h] for h in hashes[:found]]
        blocks = torch.tensor(ids, device=self.keys.device)
        n = found * BLOCK_TOKENS
        for pool, slots in ((self.keys, cache.all_keys), (self.values, cache.all_values)):
            chunk = pool.index_select(1, blocks)  # [layers, found, kv_heads, 16, head_dim]
            num_layers, _, kv_heads, _, head_dim = chunk.shape
            slots[:, slot, :, :n] = chunk.transpose(1, 2).reshape(num_layers, kv_heads, n, head_dim)
        self._touch(hashes[:found])
        # At least one token is always recomputed: the prefill needs the last prompt token's logits.
        n = min(n, len(tokens) - 1)
        if not with_features:
            return n, None
        width = (len(layers) or 1) * self.hidden_size  # a last-layer session takes a fused block's last columns
        return n, torch.cat([self.features[block][1][:, -width:] for block in ids])[:n]

    def save(self, cache: KVCache, slot: int, tokens: list[int], kv_length: int,
             features: torch.Tensor | None = None, layers: tuple[int, ...] = ()) -> None:
        """Copies the full blocks among the first kv_length tokens (those whose KV is valid) into the pool, with
        their hidden states when `features` [>= their tokens, (len(layers) or 1) * hidden] (of `layers`, () = the
        last alone) is given."""
        hashes = block_hashes(tokens, self.seed, max_tokens=kv_length)[: self.num_blocks]
        self._touch(hashes)  # the chain's own blocks are now most recent: eviction takes others first
        new = [i for i, h in enumerate(hashes) if h not in self._index]
        # blocks cached before without hidden states, or with the last layer's alone, get this saver's
        lacking = [i for i, h in enumerate(hashes) if h in self._index and self._upgrades(self._index[h], layers)]
        lost = []
        if new:
            while len(self._free) < len(new):
                victim, block = self._index.popitem(last=False)
                self._free.append(block)
                lost.append(victim)
            targets = [self._free.pop() for _ in new]
            for i, block in zip(new, targets):
                self._index[hashes[i]] = block
                if self.features is not None:
                    self.features.pop(block, None)  # a reused block's old hidden states are not this one's
            self._touch(hashes)
            src = torch.tensor(new, device=self.keys.device)
            dst = torch.tensor(targets, device=self.keys.device)
            width = len(hashes) * BLOCK_TOKENS
            for pool, slots in ((self.keys, cache.all_keys), (self.values, cache.all_values)):
                num_layers, _, kv_heads, _, head_dim = slots.shape
                blocks = slots[:, slot, :, :width].reshape(num_layers, kv_heads, len(hashes), BLOCK_TOKENS,
                                                           head_dim)
                pool[:, dst] = blocks.index_select(2, src).transpose(1, 2)
        if features is not None and self.features is not None:
            for i in new + lacking:
                rows = features[i * BLOCK_TOKENS : (i + 1) * BLOCK_TOKENS]
                if rows.shape[0] == BLOCK_TOKENS and hashes[i] in self._index:  # (evicted by this very save)
                    self.features[self._index[hashes[i]]] = (tuple(layers), rows.to("cpu", torch.float16).clone())
        if new and self.on_change:
            self.on_change([hashes[i] for i in new], lost)

    def _upgrades(self, block: int, layers: tuple[int, ...]) -> bool:
        """Whether a saver with `layers`' hidden states adds to what the block keeps: it keeps none, or the last
        layer's alone while the saver has several (which serve last-layer sessions too)."""
        if self.features is None:
            return False
        saved = self.features.get(block)
        return saved is None or (not saved[0] and bool(layers))

    def _touch(self, hashes: list[str]) -> None:
        # Children first, so a chain's parents are the more recent: LRU evicts a chain from its tail, and a
        # surviving chain is never cut in the middle.
        for h in reversed(hashes):
            if h in self._index:
                self._index.move_to_end(h)
