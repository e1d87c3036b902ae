"""Chained hashes of full 16-token blocks: the names under which KV prefixes are cached and advertised.

Block i's key is hash(key of block i - 1, tokens of block i), and block 0's parent is a seed derived from the
model's identity, so one key names a whole prefix (every token before the block's end) and two models never
share a key. Only full blocks are hashed: a partial tail block is never cached. The verifier (what it holds)
and the router (what a prompt needs) both call `block_hashes`, so they agree by construction.

This module owns no KV and no storage; it is pure and cheap (blake2b, ~1 us per block).
"""

from __future__ import annotations

import hashlib
import struct

BLOCK_TOKENS = 16
_DIGEST_BYTES = 16  # 128 bits: collisions are out of reach for any fleet's lifetime of blocks


def model_seed(model_identity: str) -> bytes:
    """The parent of block 0 for a model; also the model's namespace in the locality store."""
    return hashlib.blake2b(b"specdec-prefix-v1\0" + model_identity.encode(), digest_size=_DIGEST_BYTES).digest()


def model_namespace(model_identity: str) -> str:
    """A short tag for the model's keys in the locality store."""
    return model_seed(model_identity).hex()[:16]


def block_hashes(token_ids: list[int], seed: bytes, max_tokens: int | None = None) -> list[str]:
    """Hex keys of the full blocks of token_ids (of its first max_tokens when given), block 0 first."""
    n = len(token_ids) if max_tokens is None else min(len(token_ids), max_tokens)
    parent, out = seed, []
    pack = struct.Struct(f"<{BLOCK_TOKENS}i").pack
    for start in range(0, n - n % BLOCK_TOKENS, BLOCK_TOKENS):
        parent = hashlib.blake2b(parent + pack(*token_ids[start : start + BLOCK_TOKENS]),
                                 digest_size=_DIGEST_BYTES).digest()
        out.append(parent.hex())
    return out
