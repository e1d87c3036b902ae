"""Chained block hashes: one key names a whole prefix, per model, full blocks only."""

from __future__ import annotations

import random

from specdec.prefix_hash import BLOCK_TOKENS, block_hashes, model_namespace, model_seed

SEED = model_seed("smollm2-135m-instruct")


def _tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(49152) for _ in range(n)]


def test_same_prefix_gives_the_same_keys_and_only_full_blocks_count():
    tokens = _tokens(5 * BLOCK_TOKENS + 7)
    keys = block_hashes(tokens, SEED)
    assert len(keys) == 5
    assert block_hashes(tokens[: 3 * BLOCK_TOKENS], SEED) == keys[:3]
    assert block_hashes(tokens[: 3 * BLOCK_TOKENS + 15], SEED) == keys[:3]  # a partial block has no key
    assert block_hashes(tokens + _tokens(40, seed=1), SEED)[:5] == keys
    assert block_hashes(tokens, SEED, max_tokens=2 * BLOCK_TOKENS + 3) == keys[:2]
    assert len(set(keys)) == 5


def test_any_differing_token_changes_its_block_key_and_every_key_after_it():
    tokens = _tokens(6 * BLOCK_TOKENS)
    keys = block_hashes(tokens, SEED)
    for position in (0, 17, 3 * BLOCK_TOKENS - 1, 6 * BLOCK_TOKENS - 1):
        changed = list(tokens)
        changed[position] = (changed[position] + 1) % 49152
        other = block_hashes(changed, SEED)
        block = position // BLOCK_TOKENS
        assert other[:block] == keys[:block], position
        assert all(a != b for a, b in zip(other[block:], keys[block:])), position


def test_a_block_key_depends_on_its_parents_not_only_its_own_tokens():
    a, b, shared = _tokens(BLOCK_TOKENS, 1), _tokens(BLOCK_TOKENS, 2), _tokens(BLOCK_TOKENS, 3)
    assert block_hashes(a + shared, SEED)[1] != block_hashes(b + shared, SEED)[1]


def test_different_models_never_share_keys():
    tokens = _tokens(4 * BLOCK_TOKENS)
    other = model_seed("some-other-model")
    assert not set(block_hashes(tokens, SEED)) & set(block_hashes(tokens, other))
    assert model_namespace("smollm2-135m-instruct") != model_namespace("some-other-model")
