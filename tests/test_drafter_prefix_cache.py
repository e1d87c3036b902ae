"""The model drafter's prefix cache with the shipped drafter on CPU: a session sharing a system prompt prefills only
its tail, drafts are the same with the cache on and off, LRU eviction stays within the budget, a changed token
ends reuse at its block, and a closed session's committed context is reused by its next turn."""

from __future__ import annotations

import asyncio

import pytest

from drafter_service.drafters import DraftRequest, ModelDrafter, make_drafter
from drafter_service.service import DraftBatcher
from specdec import models
from specdec.prefix_cache import PrefixCache
from specdec.prefix_hash import BLOCK_TOKENS, model_seed
from specdec.sampling import SamplingConfig

SYSTEM = ("You are a careful assistant. Answer in one short paragraph, cite no sources, and never use lists. "
          "If a question is ambiguous, say which reading you answer, and keep every answer polite and brief. "
          "When you do not know, say so plainly instead of guessing.")
QUESTIONS = ["Why is the sky blue?", "What is a prime number?", "How do bees make honey?"]
K = 5


@pytest.fixture(scope="module")
def shipped():
    """The shipped drafter as `specdec serve drafter` builds it (its engine is shared by the drafters below)."""
    return make_drafter(models.TOKEN_DRAFTER, "cpu", 4, 256, models.DEFAULT_TARGET, prefix_cache_blocks=256)


@pytest.fixture(scope="module")
def system_ids(tokenizer):
    ids = tokenizer.encode(SYSTEM)
    assert len(ids) >= 3 * BLOCK_TOKENS
    return ids[: 3 * BLOCK_TOKENS]  # exactly three full blocks


def _drafter(shipped, blocks: int) -> ModelDrafter:
    engine = shipped.engine
    cache = PrefixCache(engine.shape, blocks, engine.device, engine.dtype, shipped.prefix_cache.seed) if blocks else None
    return ModelDrafter(engine, 4, 256, shipped.draft_vocab, cache)


def _session(drafter: ModelDrafter, session_id: str, prompt: list[int], rounds: int = 3) -> list[list[int]]:
    """Drafts `rounds` blocks, committing the first two tokens of each (a partial acceptance: rollback included);
    returns the drafts. The session stays open."""
    drafter.open(session_id)
    context, drafts = list(prompt), []
    for _ in range(rounds):
        (draft,) = drafter.propose([DraftRequest(session_id, list(context), K, SamplingConfig())])
        drafts.append(draft.tokens)
        context += draft.tokens[:2]
    return drafts


def _prefilled(drafter: ModelDrafter, session_id: str, prompt: list[int]) -> int:
    """Context tokens the session's first draft ran through the model."""
    before = drafter.prefilled_tokens
    drafter.open(session_id)
    drafter.propose([DraftRequest(session_id, list(prompt), K, SamplingConfig())])
    return drafter.prefilled_tokens - before


def test_drafter_keys_never_mix_with_the_verifiers(shipped):
    assert shipped.prefix_cache.num_blocks == 256
    assert shipped.prefix_cache.seed != model_seed(models.DEFAULT_TARGET)  # what the verifier of this target uses
    off = make_drafter(models.TOKEN_DRAFTER, "cpu", 1, 64, models.DEFAULT_TARGET, prefix_cache_blocks=0)
    assert off.prefix_cache is None


def test_a_shared_system_prompt_is_prefilled_once_and_drafts_do_not_change(shipped, system_ids, tokenizer):
    prompts = [system_ids + tokenizer.encode(f"\nQuestion: {q}\nAnswer:") for q in QUESTIONS]
    cached, plain = _drafter(shipped, 64), _drafter(shipped, 0)
    with_cache = [_session(cached, f"s{i}", p) for i, p in enumerate(prompts)]
    without = [_session(plain, f"s{i}", p) for i, p in enumerate(prompts)]
    assert with_cache == without
    assert all(len(d) == K for rounds in with_cache for d in rounds)
    # the first session prefilled everything; each later one only what follows the three system blocks
    assert plain.prefilled_tokens == cached.prefilled_tokens + 2 * 3 * BLOCK_TOKENS
    assert cached.cached_tokens == 2 * 3 * BLOCK_TOKENS
    for i in range(len(prompts)):
        cached.close(f"s{i}")
    tail = tokenizer.encode("\nQuestion: What is rain?\nAnswer:")
    assert _prefilled(cached, "next", system_ids + tail) == len(tail)


def test_a_changed_token_ends_reuse_at_its_block(shipped, system_ids, tokenizer):
    prompt = system_ids + tokenizer.encode("\nQuestion: Why is the sky blue?\nAnswer:")
    drafter = _drafter(shipped, 64)
    assert _prefilled(drafter, "a", prompt) == len(prompt)
    changed = list(prompt)
    changed[BLOCK_TOKENS + 3] += 1  # a token of block 1: block 0 still matches, blocks 1 and 2 no longer do
    assert _prefilled(drafter, "b", changed) == len(prompt) - BLOCK_TOKENS
    changed_first = list(prompt)
    changed_first[0] += 1  # every key is chained to block 0, so nothing is reused
    assert _prefilled(drafter, "c", changed_first) == len(prompt)
    # and the drafts after a partial hit are those of a cold prefill
    assert _session(_drafter(shipped, 64), "d", changed) == _session(_drafter(shipped, 0), "d", changed)


def test_lru_eviction_stays_within_the_budget(shipped):
    drafter = _drafter(shipped, 4)
    a = list(range(1000, 1000 + 3 * BLOCK_TOKENS)) + [7]
    b = list(range(2000, 2000 + 3 * BLOCK_TOKENS)) + [7]
    assert _prefilled(drafter, "a", a) == len(a)
    assert _prefilled(drafter, "b", b) == len(b)  # saving b's three blocks evicts two of a's, children first
    assert len(drafter.prefix_cache.held()) == 4
    for session in ("a", "b"):
        drafter.close(session)
    assert len(drafter.prefix_cache.held()) == 4
    assert _prefilled(drafter, "b2", b) == 1  # b is whole: only the last token is fed
    assert _prefilled(drafter, "a2", a) == len(a) - BLOCK_TOKENS  # a kept only its first block


def test_a_closed_session_is_reused_by_its_next_turn_through_the_batcher(shipped, system_ids, tokenizer):
    """The service closes sessions on the torch thread, where the committed context's blocks are saved."""
    first = system_ids + tokenizer.encode("\nQuestion: Describe a large mammal in detail.\nAnswer:")
    answer = list(range(3000, 3000 + 2 * BLOCK_TOKENS))  # what the verifier committed (any tokens will do)

    async def main():
        drafter = _drafter(shipped, 64)
        batcher = DraftBatcher(drafter)
        batcher.start()
        drafter.open("turn1")
        await batcher.propose(DraftRequest("turn1", first, K, SamplingConfig()))
        await batcher.propose(DraftRequest("turn1", first + answer, K, SamplingConfig()))
        batcher.close("turn1")
        await asyncio.gather(*batcher._closing)
        assert drafter.cache.free_slots == drafter.cache.num_slots
        second = first + answer + tokenizer.encode("\nQuestion: And a small one?\nAnswer:")
        before = drafter.cached_tokens
        drafter.open("turn2")
        await batcher.propose(DraftRequest("turn2", second, K, SamplingConfig()))
        return drafter.cached_tokens - before

    reused = asyncio.run(main())
    assert reused == (len(first) + len(answer)) // BLOCK_TOKENS * BLOCK_TOKENS
    assert reused > len(first) // BLOCK_TOKENS * BLOCK_TOKENS  # more than the first prompt: the answer too
