"""The transformers fallback engine: architectures outside the Llama family still verify losslessly."""

from __future__ import annotations

import asyncio

import pytest
import torch
import transformers

from specdec.engine import LlamaEngine, Row
from specdec.hf_engine import TransformersEngine, make_engine
from specdec.sampling import SamplingConfig
from verifier_service.scheduler import Scheduler
from verifier_service.session import FINISH_NONE, SessionSettings

VOCAB = 500


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    # a wide initialization, so greedy output varies token to token (the default repeats one token)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                     initializer_range=0.5)
    return transformers.GPT2LMHeadModel(config).eval()


def test_make_engine_falls_back_only_outside_the_llama_family(gpt2):
    assert isinstance(make_engine(gpt2), TransformersEngine)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))
    assert isinstance(make_engine(llama), LlamaEngine)


def test_rows_with_rollback_match_a_full_forward(gpt2):
    engine = TransformersEngine(gpt2)
    cache = engine.new_cache(2, 128)
    a, b = cache.allocate(), cache.allocate()
    seq_a, seq_b = list(range(10, 40)), list(range(100, 117))
    engine.forward(cache, [Row(a, 0, seq_a[:20]), Row(b, 0, seq_b[:10])])
    engine.forward(cache, [Row(a, 20, [7, 8, 9], True)])  # a block that will be rejected
    # roll a back to 20 tokens (the rejected block is overwritten), extend both
    out = engine.forward(cache, [Row(a, 20, seq_a[20:], True), Row(b, 10, seq_b[10:], True)])
    with torch.inference_mode():
        full_a = gpt2(torch.tensor([seq_a])).logits[0, 20:]
        full_b = gpt2(torch.tensor([seq_b])).logits[0, 10:]
    torch.testing.assert_close(out[0], full_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], full_b, rtol=1e-4, atol=1e-4)


def test_speculative_greedy_output_equals_generate(gpt2):
    prompt = [5, 17, 42, 99, 3, 250]
    expected = gpt2.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    full = prompt + expected

    def drafter(ctx):  # right for two tokens, then wrong: every verdict accepts a prefix and corrects
        block = full[len(ctx):len(ctx) + 4]
        if len(block) > 2:
            block[2] = (block[2] + 1) % VOCAB
        return block

    async def main():
        scheduler = Scheduler(make_engine(gpt2), frozenset(), max_sessions=2, max_sequence_length=128)
        scheduler.start()
        settings = SessionSettings("s", prompt, 24, SamplingConfig())
        result = await scheduler.open(settings)
        out = list(result.tokens)
        while result.session.finish == FINISH_NONE:
            tokens = list(result.session.tokens)
            result = await scheduler.step("s", len(tokens), drafter(tokens))
            out.extend(result.tokens)
        await scheduler.stop()
        return out, result.session.stats

    out, stats = asyncio.run(main())
    assert len(set(expected)) > 10
    assert out == expected
    assert stats.accepted_draft_tokens > 0
