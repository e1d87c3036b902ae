"""The Llama engine against transformers' own implementation (fp32, CPU), and batched against unbatched.

Tolerance: max |logit difference| <= 1e-4 for random small models and 5e-4 for the real target, whose logits
span about +-30; both are far below the gaps that decide a greedy token in practice, and the end-to-end test
checks exact token equality with transformers' generate.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import transformers

from specdec.engine import Linear, LlamaEngine, Row, UnsupportedModel, _attend, _pack

CONFIGS = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 16}),
}


def tiny_model(kind: str, seed: int = 0):
    config_cls, extra = CONFIGS[kind]
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=kind == "llama", **extra,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # transformers zero-initializes biases; make them matter
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_engine_logits_match_transformers(kind):
    model = tiny_model(kind)
    engine = LlamaEngine(model)
    cache = engine.new_cache(2, 64)
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = reference_logits(model, ids)
    slot = cache.allocate()
    prefill = engine.forward(cache, [Row(slot, 0, ids[:25], all_logits=True)])[0]
    rest = engine.forward(cache, [Row(slot, 25, ids[25:], all_logits=True)])[0]
    assert (torch.cat([prefill, rest]) - expected).abs().max() <= 1e-4


def test_engine_matches_transformers_on_the_real_target(hf_target, tokenizer):
    engine = LlamaEngine(hf_target)
    cache = engine.new_cache(1, 128)
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. Speculative decoding is")
    expected = reference_logits(hf_target, ids)
    got = engine.forward(cache, [Row(0, 0, ids, all_logits=True)])[0]
    assert (got - expected).abs().max() <= 5e-4
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_hidden_layers_are_transformers_hidden_states_side_by_side():
    """forward_flat(hidden=[i, ..., last]): each listed layer's output at every new token (what a `fused` feature
    drafter reads), the last layer's before the final norm; the logits are those of the plain pass."""
    model = tiny_model("llama")
    engine = LlamaEngine(model)
    ids = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states  # embeddings, then layers
    cache = engine.new_cache(1, 32)
    logits, _, hidden = engine.forward_flat(cache, [Row(0, 0, ids[:7])], hidden=[0, 2])
    plain, _, last = engine.forward_flat(engine.new_cache(1, 32), [Row(0, 0, ids[:7])], hidden=True)
    torch.testing.assert_close(logits, plain)
    assert hidden.shape == (7, 128)
    torch.testing.assert_close(hidden[:, :64], states[1][0, :7], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hidden[:, 64:], last)
    _, _, more = engine.forward_flat(cache, [Row(0, 7, ids[7:])], hidden=[1, 2])  # a later pass reads the cache
    torch.testing.assert_close(more[:, :64], states[2][0, 7:], atol=1e-4, rtol=1e-4)
    for wrong in ([0, 1], [2, 0, 2], [], [0, 3]):  # not ending with the last layer, unordered, none, no such layer
        with pytest.raises(ValueError, match="the last"):
            engine.forward_flat(cache, [Row(0, 0, ids[:3])], hidden=wrong)


def test_batched_forward_equals_each_row_alone():
    model = tiny_model("llama", seed=3)
    engine = LlamaEngine(model)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (7, 19, 3)]
    blocks = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (1, 6, 3)]

    alone = []
    for prompt, block in zip(prompts, blocks):
        cache = engine.new_cache(1, 64)
        engine.forward(cache, [Row(0, 0, prompt)])
        alone.append(engine.forward(cache, [Row(0, len(prompt), block, all_logits=True)])[0])

    cache = engine.new_cache(3, 64)
    engine.forward(cache, [Row(i, 0, p) for i, p in enumerate(prompts)])  # ragged prefill
    batched = engine.forward(cache, [Row(i, len(p), b, all_logits=True) for i, (p, b) in enumerate(zip(prompts, blocks))])
    for a, b in zip(alone, batched):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-5


def test_rollback_is_a_smaller_start_position():
    model = tiny_model("qwen2", seed=4)
    engine = LlamaEngine(model)
    cache = engine.new_cache(1, 64)
    ids = list(range(10, 30))
    engine.forward(cache, [Row(0, 0, ids[:12])])
    engine.forward(cache, [Row(0, 12, [1, 2, 3, 4])])  # a rejected block leaves stale KV at 12..15
    got = engine.forward(cache, [Row(0, 12, ids[12:], all_logits=True)])[0]
    assert (got - reference_logits(model, ids)[12:]).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_is_transformers_own_to_the_bit(dtype):
    """The engine's RMSNorm (torch's fused rms_norm, then the weight) gives exactly what transformers' Llama RMSNorm
    computes (fp32 normalization rounded to the model's dtype, then scaled in it), for a layer's hidden states and
    for per-head q/k norms (Qwen3)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from specdec.engine import _rms_norm

    torch.manual_seed(0)
    for shape in [(1, 1, 64), (3, 5, 64), (2, 4, 3, 16)]:
        norm = LlamaRMSNorm(shape[-1], eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(shape[-1]))
        x = (torch.randn(shape) * 4).to(dtype)
        with torch.no_grad():
            assert torch.equal(_rms_norm(x, norm.weight.detach(), 1e-6), norm(x)), shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_computes_f_linear_packed_or_not(dtype, monkeypatch):
    """The engine's projections on a CPU go through oneDNN's packed GEMM where it can pack (fp32 everywhere; bf16
    only with AVX-512 or AVX-NE-CONVERT) and F.linear otherwise: the same numbers either way, one token or many."""
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64, dtype=dtype), torch.randn(96, dtype=dtype)
    fast = Linear(weight, bias)
    monkeypatch.setenv("SPECDEC_CPU_PACKED_WEIGHTS", "no")
    plain = Linear(weight, bias)
    assert plain.weight is weight and (plain.out_features, plain.in_features) == (96, 64)
    if dtype == torch.float32 and torch.backends.mkldnn.is_available():
        assert fast.weight is None  # packed: the copy in oneDNN's layout replaced it
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for shape in [(1, 64), (4, 64), (2, 3, 64)]:
        x = torch.randn(shape, dtype=dtype)
        expected = torch.nn.functional.linear(x, weight, bias)
        assert torch.equal(plain(x), expected)
        torch.testing.assert_close(fast(x), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [1, 4])
def test_reduced_precision_attention_matches_fp32_and_ignores_masked_keys(dtype, width):
    """One bf16 query a row goes to the CPU kernel as two (its slow path for a single query), wider queries and
    fp16 as they are: either way fp32's result within the dtype's rounding, and a key the engine's additive mask
    hides changes nothing."""
    torch.manual_seed(0)
    q = torch.randn(2, 6, width, 16, dtype=dtype)
    keys, values = torch.randn(2, 2, 40, 16, dtype=dtype), torch.randn(2, 2, 40, 16, dtype=dtype)
    visible = torch.ones(2, 1, width, 40, dtype=torch.bool)
    visible[0, ..., 30:] = False  # row 0 sees 30 keys, row 1 all 40
    mask = torch.zeros((), dtype=dtype).masked_fill(~visible, float("-inf"))  # as LlamaEngine._blocks builds it
    got = _attend(q, keys, values, mask)
    assert got.dtype == dtype and got.shape == q.shape
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), keys.float(), values.float(),
                                                                attn_mask=visible, enable_gqa=True)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
    keys[0, :, 35], values[0, :, 35] = 100.0, 100.0
    assert torch.equal(_attend(q, keys, values, mask)[0], got[0])


def test_unsupported_architecture_is_refused_with_its_name():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModel, match="gpt2"):
        LlamaEngine(model)


def test_bucketed_padded_pass_equals_the_exact_pass():
    """What a CUDA graph replays: batch, width and KV length padded to buckets, padding written to scratch."""
    from specdec.engine import _bucket, _pack

    model = tiny_model("llama", seed=6)
    engine = LlamaEngine(model)
    prompts = [list(range(3, 3 + n)) for n in (9, 17, 5)]
    blocks = [[11], [12, 13, 14, 15, 16], [17, 18]]
    exact_cache, padded_cache = engine.new_cache(4, 64), engine.new_cache(4, 64)
    for cache in (exact_cache, padded_cache):
        engine.forward(cache, [Row(i, 0, p) for i, p in enumerate(prompts)])
    rows = [Row(i, len(p), b, all_logits=True) for i, (p, b) in enumerate(zip(prompts, blocks))]
    exact = engine.forward(exact_cache, rows)

    batch, width = _bucket(len(rows)), _bucket(max(len(b) for b in blocks))  # 4 rows, 8 tokens
    inputs = _pack(rows, batch, width, padded_cache.scratch)
    with torch.inference_mode():
        logits = engine._head(engine._layers(padded_cache, *inputs, kv_len=64)).float()  # [batch, width, vocab]
    for b, (row, expected) in enumerate(zip(rows, exact)):
        assert (logits[b, : len(row.tokens)] - expected).abs().max() <= 1e-5
    for layer in range(len(engine.layers)):  # real slots hold the same KV either way
        for slot, row in enumerate(rows):
            n = row.start + len(row.tokens)
            assert torch.allclose(padded_cache.keys[layer][slot, :, :n], exact_cache.keys[layer][slot, :, :n], atol=1e-6)


def _decode_one_step_at_a_time(engine, cache, rows, steps):
    out = [[] for _ in rows]
    for _ in range(steps):
        logits = engine.forward(cache, rows)
        rows = [Row(r.slot, r.start + 1, [int(l[-1].argmax())]) for r, l in zip(rows, logits)]
        for tokens, row in zip(out, rows):
            tokens.append(row.tokens[0])
    return out


def _prefilled(engine, prompts):
    cache = engine.new_cache(len(prompts) + 1, 64)
    logits = engine.forward(cache, [Row(i, 0, p) for i, p in enumerate(prompts)])
    return cache, [Row(i, len(p), [int(l[-1].argmax())]) for i, (p, l) in enumerate(zip(prompts, logits))]


def test_decode_greedy_equals_one_step_at_a_time():
    """Several greedy steps in one call, argmax fed back on the device: the same tokens and the same KV as a loop
    of single passes, for a ragged batch and for one row (which reads its slot as a view)."""
    engine = LlamaEngine(tiny_model("qwen3", seed=7))
    for prompts in ([list(range(5, 14)), list(range(20, 41)), [7, 8, 9]], [list(range(30, 42))]):
        (loop_cache, rows), (chunk_cache, _) = _prefilled(engine, prompts), _prefilled(engine, prompts)
        expected = _decode_one_step_at_a_time(engine, loop_cache, rows, 9)
        assert len({t for tokens in expected for t in tokens}) > 3  # a real continuation, not one repeated token
        assert engine.decode_greedy(chunk_cache, rows, 9) == expected
        asked = []
        stopped = engine.decode_greedy(chunk_cache, rows, 9, more=lambda i: asked.append(i) or i < 4)
        assert stopped == [tokens[:4] for tokens in expected] and asked == [1, 2, 3, 4]  # stops when told
        for layer in range(len(engine.layers)):
            for row in rows:
                n = row.start + 9
                assert torch.equal(chunk_cache.keys[layer][row.slot, :, :n], loop_cache.keys[layer][row.slot, :, :n])


def test_steps_queued_ahead_are_taken_up_by_the_next_decode():
    """decode_greedy(ahead=n) queues n more steps the next call for the rows they lead to takes up: the same
    tokens as decoding straight on, whether it asks for fewer (the rest stay queued), as many or more steps than
    were queued, chained call after call. Other rows, a pass of any kind, or a slot allocated drop them (the tokens stay right: their
    KV is overwritten)."""
    engine = LlamaEngine(tiny_model("llama", seed=9))
    prompts = [list(range(5, 14)), list(range(20, 33))]
    loop_cache, rows = _prefilled(engine, prompts)
    expected = _decode_one_step_at_a_time(engine, loop_cache, rows, 16)

    def after(n):  # the rows once n tokens of `expected` are committed
        return [Row(r.slot, r.start + n, [e[n - 1]]) for r, e in zip(rows, expected)]

    for first, queued, asked in ((4, 2, 1), (4, 2, 2), (4, 3, 6), (1, 4, 8)):
        cache, _ = _prefilled(engine, prompts)
        assert engine.decode_greedy(cache, rows, first, ahead=queued) == [e[:first] for e in expected]
        assert cache.ahead is not None and cache.ahead.tokens.shape == (2, queued)
        assert engine.decode_greedy(cache, after(first), asked) == [e[first:first + asked] for e in expected]
        left = queued - asked  # queued steps not asked for stay queued, for the call after
        assert (cache.ahead is None) if left <= 0 else cache.ahead.tokens.shape == (2, left)
        made = first + asked
        assert engine.decode_greedy(cache, after(made), 3) == [e[made:made + 3] for e in expected]

    cache, _ = _prefilled(engine, prompts)  # chained: every call takes up the last one's and queues more
    made = 0
    for asked in (3, 4, 2, 5):
        taken = cache.ahead is not None
        assert engine.decode_greedy(cache, after(made) if made else rows, asked, ahead=2) == [
            e[made:made + asked] for e in expected]
        assert taken == (made > 0)
        made += asked

    for interrupt in ("other rows", "pass", "allocate"):
        cache, _ = _prefilled(engine, prompts)
        engine.decode_greedy(cache, rows, 4, ahead=3)
        if interrupt == "other rows":
            assert engine.decode_greedy(cache, after(4)[:1], 2) == [expected[0][4:6]]
        elif interrupt == "pass":
            engine.forward(cache, [Row(2, 0, [1, 2, 3])])
        else:
            cache.allocate()
        assert cache.ahead is None
        assert engine.decode_greedy(cache, after(4), 5) == [e[4:9] for e in expected]


def test_decode_greedy_on_padded_buffers_equals_one_step_at_a_time():
    """What the CUDA-graph path of decode_greedy does, on the CPU: rows padded to a batch bucket and a width of 2
    (a compiled graph's floor), one fixed KV length for every step, the packed buffers advanced in place."""
    from specdec.engine import _feed_back, _greedy_steps

    engine = LlamaEngine(tiny_model("llama", seed=8))
    prompts = [list(range(3, 3 + n)) for n in (6, 15, 11)]
    (loop_cache, rows), (padded_cache, _) = _prefilled(engine, prompts), _prefilled(engine, prompts)
    expected = _decode_one_step_at_a_time(engine, loop_cache, rows, 8)
    buffers = list(_pack(rows, 4, 2, padded_cache.scratch))

    def step():
        with torch.inference_mode():
            return _feed_back(engine._head(engine._layers(padded_cache, *buffers, 64)), buffers, padded_cache.scratch)

    assert _greedy_steps(step, buffers[0], 8)[:3].tolist() == expected


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_pack_lays_out_rows_and_padding(data):
    """Real tokens go to their slot at their positions; padding writes to the scratch slot; a padding query sits at
    its row's last position (a real key, so its softmax is finite)."""
    width = data.draw(st.integers(1, 8))
    rows = data.draw(st.lists(st.builds(
        Row, st.integers(0, 40), st.integers(0, 300), st.lists(st.integers(0, 49151), min_size=1, max_size=width)),
        max_size=12))
    batch = len(rows) + data.draw(st.integers(0, 4))
    scratch = 41
    tokens, positions, write_slots, write_pos, slots, base, visible = _pack(rows, batch, width, scratch)
    write_slots, write_pos = write_slots.view(batch, width), write_pos.view(batch, width)
    for b in range(batch):
        row = rows[b] if b < len(rows) else None
        assert slots[b] == (row.slot if row else scratch)
        for t in range(width):
            real = row is not None and t < len(row.tokens)
            assert tokens[b, t] == (row.tokens[t] if real else 0)
            assert write_slots[b, t] == (row.slot if real else scratch)
            if row is not None:
                assert positions[b, t] == row.start + min(t, len(row.tokens) - 1)
                # a chain: everything before its start, then its own tokens up to this one (padding: the last's)
                assert base[b] == row.start
                assert visible[b, t].tolist() == [j <= min(t, len(row.tokens) - 1) for j in range(width)]
            assert write_pos[b, t] == (positions[b, t] if real else 0)


def _ancestors(parents: list[int]) -> list[list[int]]:
    """Per block token (0 = the root, i + 1 = node i): the block offsets it sees, its own last."""
    seen = [[0]]
    for i, parent in enumerate(parents):
        seen.append(seen[parent + 1] + [i + 1])
    return seen


def test_a_tree_pass_scores_every_node_as_its_own_chain_would():
    """One pass over a draft tree (each node sees the prefix and its ancestors, at its depth's position) gives each
    node the logits of running its root-to-node path as a chain, and each node's KV is its path's KV (moved into
    place, the accepted path continues as a chain would). Ragged with a chain row in the same pass."""
    model = tiny_model("qwen3", seed=9)
    engine = LlamaEngine(model)
    prompt, other = list(range(40, 53)), list(range(60, 69))
    root, tokens, parents = 7, [11, 12, 13, 14, 15, 16], [-1, -1, 0, 0, 2, 1]
    cache = engine.new_cache(3, 64)
    engine.forward(cache, [Row(0, 0, prompt), Row(1, 0, other)])
    n = len(prompt)
    tree = Row(0, n, [root, *tokens], all_logits=True, tree_base=n, visible=_ancestors(parents))
    chain = Row(1, len(other), [5, 6, 7], all_logits=True)
    got_tree, got_chain = engine.forward(cache, [tree, chain])
    assert (got_chain - reference_logits(model, other + [5, 6, 7])[-3:]).abs().max() <= 1e-4
    seen = _ancestors(parents)
    for node in range(len(tokens) + 1):
        path = [([root] + tokens)[j] for j in seen[node]]
        expected = reference_logits(model, prompt + path)[-1]
        assert (got_tree[node] - expected).abs().max() <= 1e-4, f"node {node - 1} (path {path})"
    # accept the path root -> node 0 -> node 2 -> node 4, move its KV into place and continue as a chain
    path = [0, 2, 4]
    cache.move([0] * len(path), [n + 1 + j for j in path], [n + 1 + i for i in range(len(path))])
    committed = prompt + [root] + [tokens[j] for j in path]
    after = engine.forward(cache, [Row(0, len(committed), [3, 4], all_logits=True)])[0]
    assert (after - reference_logits(model, committed + [3, 4])[-2:]).abs().max() <= 1e-4


def test_a_tree_can_grow_across_passes():
    """A drafter adds a tree's levels one pass at a time: nodes written earlier (past the tree base) are seen only
    by their descendants."""
    model = tiny_model("llama", seed=10)
    engine = LlamaEngine(model)
    prompt = list(range(20, 31))
    n = len(prompt)
    cache = engine.new_cache(1, 64)
    engine.forward(cache, [Row(0, 0, prompt)])
    # level 1: nodes 0, 1 (both children of the prefix); level 2: node 2 under 1, node 3 under 0
    engine.forward(cache, [Row(0, n, [8, 9], tree_base=n, visible=[[0], [1]])])
    got = engine.forward(cache, [Row(0, n + 2, [10, 11], all_logits=True, tree_base=n, visible=[[1, 2], [0, 3]])])[0]
    assert (got[0] - reference_logits(model, prompt + [9, 10])[-1]).abs().max() <= 1e-4
    assert (got[1] - reference_logits(model, prompt + [8, 11])[-1]).abs().max() <= 1e-4


def test_tree_visibility_is_each_nodes_path():
    from specdec.engine import tree_visibility

    parents = [-1, -1, 0, 0, 2, 1, 5, -1]
    seen = tree_visibility(parents)
    for row, offsets in enumerate(_ancestors(parents)):
        assert seen[row].nonzero().flatten().tolist() == sorted(offsets)
