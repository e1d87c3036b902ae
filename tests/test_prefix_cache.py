"""The verifier's prefix cache with the real target: a hit is exactly the KV a prefill computes, output with a
hit equals output without, finished conversations are reused, and LRU eviction stays within the budget."""

from __future__ import annotations

import asyncio

import torch

from specdec.engine import Row
from specdec.prefix_hash import BLOCK_TOKENS, block_hashes, model_seed
from specdec.sampling import SamplingConfig
from verifier_service.prefix_cache import PrefixCache
from verifier_service.scheduler import Scheduler
from verifier_service.session import FINISH_NONE, SessionSettings

SEED = model_seed("test-model")
SYSTEM = ("You are a careful assistant. Answer in one short paragraph, cite no sources, and never use lists. "
          "If a question is ambiguous, say which reading you answer.")


def _prompt(tokenizer, question: str) -> list[int]:
    return tokenizer.encode(f"{SYSTEM}\nQuestion: {question}\nAnswer:")


async def _generate(scheduler, session_id, prompt, max_new=12):
    result = await scheduler.open(SessionSettings(session_id, prompt, max_new, SamplingConfig()))
    out, cached = list(result.tokens), result.session.stats.cached_prompt_tokens
    while result.session.finish == FINISH_NONE:
        result = await scheduler.step(session_id, len(result.session.tokens), [])
        out.extend(result.tokens)
    scheduler.close(session_id)
    await asyncio.gather(*scheduler._saving)  # the blocks of a closed session are saved in the background
    return out, cached


def test_restored_kv_is_the_prefill_kv_and_logits_match(engine, tokenizer):
    prompt = _prompt(tokenizer, "Why is the sky blue?")
    cache = engine.new_cache(2, 256)
    prefix = PrefixCache(engine.shape, 16, engine.device, engine.dtype, SEED)
    full = engine.forward(cache, [Row(0, 0, prompt)])[0]
    prefix.save(cache, 0, prompt, len(prompt))
    start = prefix.restore(cache, 1, prompt)
    assert start == len(prompt) // BLOCK_TOKENS * BLOCK_TOKENS > 0
    for layer in range(engine.shape.num_layers):
        assert torch.equal(cache.keys[layer][1, :, :start], cache.keys[layer][0, :, :start])
        assert torch.equal(cache.values[layer][1, :, :start], cache.values[layer][0, :, :start])
    rest = engine.forward(cache, [Row(1, start, prompt[start:])])[0]
    assert torch.allclose(rest, full, atol=1e-4, rtol=0)
    assert rest.argmax() == full.argmax()


def test_greedy_output_with_a_hit_equals_output_without(engine, eos, tokenizer):
    questions = ["Why is the sky blue?", "What is a prime number?", "How do bees make honey?"]

    async def main(blocks: int):
        s = Scheduler(engine, eos, max_sessions=2, max_sequence_length=256,
                      prefix_cache=PrefixCache(engine.shape, blocks, engine.device, engine.dtype, SEED)
                      if blocks else None)
        s.start()
        out = [await _generate(s, q, _prompt(tokenizer, q)) for q in questions]
        again = await _generate(s, "again", _prompt(tokenizer, questions[0]))
        await s.stop()
        return out, again

    plain, _ = asyncio.run(main(0))
    cached, again = asyncio.run(main(64))
    prompt_blocks = [len(_prompt(tokenizer, q)) // BLOCK_TOKENS * BLOCK_TOKENS for q in questions]
    assert [tokens for tokens, _ in cached] == [tokens for tokens, _ in plain]
    assert cached[0][1] == 0
    shared = len(tokenizer.encode(SYSTEM)) // BLOCK_TOKENS * BLOCK_TOKENS  # the system prompt's full blocks
    assert all(hit >= shared > 0 for _, hit in cached[1:])  # later questions reuse the shared system prompt
    assert again[0] == plain[0][0] and again[1] >= prompt_blocks[0]


def test_a_finished_conversation_is_reused_by_its_next_turn(engine, eos, tokenizer):
    first = _prompt(tokenizer, "Describe a large mammal in detail.")

    async def main():
        s = Scheduler(engine, eos, max_sessions=2, max_sequence_length=256,
                      prefix_cache=PrefixCache(engine.shape, 64, engine.device, engine.dtype, SEED))
        s.start()
        answer, _ = await _generate(s, "turn1", first, max_new=24)
        second = first + answer + tokenizer.encode("\nQuestion: And a small one?\nAnswer:")
        got, hit = await _generate(s, "turn2", second)
        await s.stop()
        return answer, second, got, hit

    answer, second, got, hit = asyncio.run(main())
    # prompt + committed tokens whose KV exists (all but the last; an EOS is committed but never sent) were
    # saved when turn 1 closed; the next turn's prompt repeats them up to the EOS
    committed = len(first) + len(answer) + (len(answer) < 24)
    assert hit == min(committed - 1, len(first) + len(answer)) // BLOCK_TOKENS * BLOCK_TOKENS
    assert hit > len(first) // BLOCK_TOKENS * BLOCK_TOKENS  # more than the first prompt: the answer too

    async def plain():
        s = Scheduler(engine, eos, max_sessions=2, max_sequence_length=256)
        s.start()
        out, _ = await _generate(s, "plain", second)
        await s.stop()
        return out

    assert got == asyncio.run(plain())


def test_lru_eviction_stays_in_budget_and_evicts_a_chain_from_its_tail(engine):
    cache = engine.new_cache(1, 128)
    changes = []
    prefix = PrefixCache(engine.shape, 4, engine.device, engine.dtype, SEED,
                         on_change=lambda gained, lost: changes.append((gained, lost)))
    a, b = list(range(100, 148)), list(range(200, 248))  # three blocks each; the KV content does not matter here
    ha, hb = block_hashes(a, SEED), block_hashes(b, SEED)
    prefix.save(cache, 0, a, len(a))
    assert changes[-1] == (ha, [])
    prefix.save(cache, 0, b, len(b))
    assert changes[-1] == (hb, [ha[2], ha[1]])  # children go first: a's first block is still usable
    assert len(prefix.held()) == 4
    assert prefix.restore(cache, 0, a + [1]) == BLOCK_TOKENS
    assert prefix.restore(cache, 0, b + [1]) == 3 * BLOCK_TOKENS
    assert prefix.restore(cache, 0, b) == 3 * BLOCK_TOKENS - 1  # the last prompt token is always recomputed


def test_a_prefix_hit_is_not_padded_to_a_cold_prefill_and_gets_its_first_token_first(engine, eos, tokenizer,
                                                                                      monkeypatch):
    """Prefills in one tick: a hit's short tail must neither pay for a cold prompt's width nor wait for it."""
    passes: list[list[int]] = []  # per forward pass, the new tokens of each row
    forward = engine.forward
    monkeypatch.setattr(engine, "forward", lambda cache, rows: passes.append([len(r.tokens) for r in rows])
                        or forward(cache, rows))
    hit_prompt = _prompt(tokenizer, "What is a prime number?")
    cold_prompt = tokenizer.encode(f"Another preamble entirely. {SYSTEM} {SYSTEM}\nQuestion: Why?\nAnswer:")

    async def main():
        s = Scheduler(engine, eos, max_sessions=3, max_sequence_length=256,
                      prefix_cache=PrefixCache(engine.shape, 64, engine.device, engine.dtype, SEED))
        s.start()
        await _generate(s, "warm", _prompt(tokenizer, "Why is the sky blue?"), max_new=2)  # caches the system prompt
        passes.clear()
        finished = []
        opens = {name: asyncio.ensure_future(s.open(SessionSettings(name, prompt, 4, SamplingConfig())))
                 for name, prompt in (("cold", cold_prompt), ("hit", hit_prompt))}
        for name, future in opens.items():
            future.add_done_callback(lambda _, name=name: finished.append(name))
        results = {name: await future for name, future in opens.items()}
        await s.stop()
        return finished, results

    finished, results = asyncio.run(main())
    tail = len(hit_prompt) - results["hit"].session.stats.cached_prompt_tokens
    assert results["hit"].session.stats.cached_prompt_tokens > 0 and results["cold"].session.stats.cached_prompt_tokens == 0
    assert len(cold_prompt) > 2 * tail
    assert passes == [[tail], [len(cold_prompt)]]  # shortest first, each in its own pass: no padding
    assert finished == ["hit", "cold"]
