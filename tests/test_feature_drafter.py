"""The feature-level drafter (specdec.feature_drafter): what it trains on is what it runs.

Training unrolls drafting steps in one pass over a sequence (`FeatureDrafterModel.unrolled`); serving runs them one
at a time over a KV cache (`FeatureRunner`). If the two disagreed, the drafter would be trained for inputs it
never sees. Checked on a small random model, CPU, fp32: drafting steps 1..3 from any point of a sequence give the
unrolled passes' rows (max abs diff 1e-4); plus the artifact round trip and its target check.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from specdec import drafter_model
from specdec.engine import Row
from specdec.feature_drafter import FeatureDrafterModel, FeatureRunner, is_feature_drafter, load_feature_drafter

LLAMA = dict(
    model_type="llama", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    rms_norm_eps=1e-5, max_position_embeddings=256, rope_theta=10000.0, num_hidden_layers=1,
)
VOCAB = 96


def _model(draft_vocab=None, seed=0, num_layers=1, taps=None) -> FeatureDrafterModel:
    torch.manual_seed(seed)
    embed, head = torch.randn(VOCAB, 64) * 0.5, torch.randn(VOCAB, 64) * 0.5
    model = FeatureDrafterModel(LLAMA, embed, head, draft_vocab, num_layers=num_layers, taps=taps)
    with torch.no_grad():  # no zero-initialized parameter may hide a wiring mistake
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("start,num_layers,taps", [(1, 1, None), (5, 1, None), (17, 1, None), (5, 2, None),
                                                   (5, 1, [1, 4, 7])])
def test_drafting_steps_equal_the_unrolled_training_passes(start, num_layers, taps):
    """(taps: a `fused` drafter, reading three target layers' states side by side and drafting on from its own
    predictions of the last layer's)"""
    model = _model(num_layers=num_layers, taps=taps)
    T, passes = 24, 3
    ids = torch.randint(0, VOCAB, (1, T))
    features = torch.randn(1, T, model.feature_width)
    with torch.no_grad():
        unrolled = model.unrolled(ids, features, passes)  # pass d, row j: [1, T - 1, 64]
    runner = FeatureRunner(model, "cpu", torch.float32, num_slots=2, max_len=64)
    slot = 1
    # committed: tokens 0..start, features 0..start-1 -> rows 0..start-1 (row p is token p + 1 with feature p)
    logits, h = runner.step([Row(slot, 0, ids[0, 1 : start + 1].tolist())], [features[0, :start]])
    torch.testing.assert_close(h[0], unrolled[0][0, start - 1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[0], model.logits(unrolled[0][0, start - 1]), atol=1e-4, rtol=1e-4)
    for d in range(1, passes):  # drafting step d + 1 feeds the sequence's next token with the predicted feature
        position = start + d - 1
        logits, h = runner.step([Row(slot, position, [int(ids[0, position + 1])])], [h])
        torch.testing.assert_close(h[0], unrolled[d][0, position], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lengths", [(4, 11, 1, 7), (4, 21, 1, 7, 30)], ids=["narrow", "with-wide-rows"])
@pytest.mark.parametrize("taps", [None, [1, 4, 7]], ids=["last-layer", "fused"])
def test_batched_rows_equal_rows_alone(taps, lengths):
    """(fused: rows of the target's three layers side by side and a row of the drafter's own prediction, one
    hidden state wide, in one pass; with-wide-rows: rows past MAX_GRAPH_WIDTH, new sessions' prompts, which run in
    a pass of their own)"""
    model = _model(taps=taps)
    runner = FeatureRunner(model, "cpu", torch.float32, num_slots=len(lengths) + 1, max_len=64)
    seqs = [torch.randint(0, VOCAB, (n,)).tolist() for n in lengths]
    feats = [torch.randn(len(s), model.feature_width if i != 2 else 64) for i, s in enumerate(seqs)]
    together, together_h = runner.step([Row(i, 0, s) for i, s in enumerate(seqs)], feats)
    for i, (s, f) in enumerate(zip(seqs, feats)):
        alone, alone_h = runner.step([Row(i, 0, s)], [f])
        torch.testing.assert_close(together[i], alone[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(together_h[i], alone_h[0], atol=1e-4, rtol=1e-4)


class _Replayed:
    """A stand-in CUDA graph on the CPU: a replay re-runs the captured pass on its static buffers and writes its
    outputs in place, as a real replay does."""

    def __init__(self, step, outputs):
        self.step, self.outputs = step, outputs

    def replay(self):
        for output, new in zip(self.outputs, self.step()):
            output.copy_(new)


def test_warmed_graphs_are_the_ones_drafting_replays(monkeypatch):
    """warm_graphs captures, before serving, every bucket a batch of chain drafts asks for while its contexts stay
    within the warmed KV length (the passes, and the greedy drafting loop as one graph): drafting afterwards
    captures nothing more, and its drafts (replayed through stand-in graphs, every other line of the graphed path
    as on a GPU) equal an eager runner's, greedy (the loop's graph) and sampled (pass by pass)."""
    model = _model(taps=[1, 4, 7], draft_vocab=sorted(range(3, VOCAB, 2)))
    eager = FeatureRunner(model, "cpu", torch.float32, num_slots=9, max_len=64)
    graphed = FeatureRunner(model, "cpu", torch.float32, num_slots=9, max_len=64)
    graphed._graphs = {}
    recorded = []

    def record(fn, matches, what):
        recorded.append(what)
        # a captured graph has run nothing yet: its outputs hold garbage until a replay writes them
        outputs = tuple(torch.full_like(o, float("nan") if o.is_floating_point() else -1) for o in fn())
        graph = _Replayed(fn, outputs)
        graph.replay()  # as _record does, before the check
        return (graph, outputs) if matches(outputs, fn()) else None

    monkeypatch.setattr(graphed, "_record", record)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    # batches 1, 2, 4, 8 x (passes 1, 2, 4, 8 wide, and loops of 2, 3, 4, 5 picks) x the one KV bucket of 64, and
    # the prompts' passes: batches 1, 2, 4 x 32 and 64 wide (128 does not fit the KV)
    assert graphed.warm_graphs(8) == 4 * 4 + 4 * 4 + 3 * 2 == len(recorded)
    recorded.clear()
    eager_passes = []  # _forward's eager passes (a capture's pass is called without `head`)
    real_pass = graphed._pass

    def counted_pass(*args, **kwargs):
        if "head" in kwargs:
            eager_passes.append(tuple(args[0].shape))
        return real_pass(*args, **kwargs)

    monkeypatch.setattr(graphed, "_pass", counted_pass)
    # new sessions' prompts (rows wider than 16) beside running sessions' rows: 5 of them go as 4 + 1
    for lengths, steps in (((5, 2, 7), 4), ((5, 2, 7, 1, 3, 6, 4, 2), 2), ((5, 2, 7, 1, 3), 5),
                           ((40, 3, 20, 33, 25, 2, 17), 3), ((30, 50), 2)):
        n_rows = len(lengths)
        seqs = [torch.randint(0, VOCAB, (n,)).tolist() for n in lengths]
        feats = [torch.randn(len(s), model.feature_width) for s in seqs]
        rows = [Row(i, 0, s) for i, s in enumerate(seqs)]
        assert graphed.draft_greedy(rows, feats, steps) == eager.draft_greedy(rows, feats, steps)
        temperatures, uniforms = [0.0, 0.8] * 4, torch.rand(n_rows, steps, dtype=torch.float64)
        (want, want_dists), (got, got_dists) = (r.draft(rows, feats, steps, temperatures[:n_rows], uniforms)
                                                for r in (eager, graphed))
        assert got == want
        for got_row, want_row in zip(got_dists, want_dists):  # (padded to a bucket: equal to float rounding)
            assert [ids for ids, _ in got_row] == [ids for ids, _ in want_row]
            assert all(torch.allclose(torch.tensor(g), torch.tensor(w), atol=1e-6) for (_, g), (_, w) in
                       zip(got_row, want_row))
    assert recorded == [] and eager_passes == []
    graphed.MAX_PROMPT_WIDTH = 32  # prompts past it share one eager pass; the others still replay the graphs
    seqs = [torch.randint(0, VOCAB, (n,)).tolist() for n in (40, 3, 20, 50, 33)]
    feats = [torch.randn(len(s), model.feature_width) for s in seqs]
    rows = [Row(i, 0, s) for i, s in enumerate(seqs)]
    assert graphed.draft_greedy(rows, feats, 2) == eager.draft_greedy(rows, feats, 2)
    assert eager_passes == [(3, 50)] and recorded == []


def test_a_prompt_graph_that_fails_its_check_leaves_prompts_eager_and_the_other_graphs_in_place(monkeypatch):
    model = _model(taps=[1, 4, 7])
    eager = FeatureRunner(model, "cpu", torch.float32, num_slots=9, max_len=64)
    graphed = FeatureRunner(model, "cpu", torch.float32, num_slots=9, max_len=64)
    graphed._graphs = {}

    def record(fn, matches, what):
        outputs = tuple(torch.full_like(o, float("nan") if o.is_floating_point() else -1) for o in fn())
        if " x 32 tokens" in what or " x 64 tokens" in what:  # the prompt passes' graphs replay nothing
            return None
        graph = _Replayed(fn, outputs)
        graph.replay()
        return graph, outputs

    monkeypatch.setattr(graphed, "_record", record)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    assert graphed.warm_graphs(8) == 4 * 4 + 4 * 4  # the chains' passes and loops only
    assert graphed._graphs is not None and not graphed._prompt_graphs
    seqs = [torch.randint(0, VOCAB, (n,)).tolist() for n in (40, 3, 20)]
    feats = [torch.randn(len(s), model.feature_width) for s in seqs]
    rows = [Row(i, 0, s) for i, s in enumerate(seqs)]
    assert graphed.draft_greedy(rows, feats, 3) == eager.draft_greedy(rows, feats, 3)
    assert graphed._graphs is not None


@pytest.mark.parametrize("draft_vocab", [None, sorted(range(3, VOCAB, 2))], ids=["full-head", "reduced-head"])
def test_greedy_drafting_on_the_device_equals_step_by_step(draft_vocab):
    """draft_greedy feeds each step's argmax and predicted feature back without the host: the same tokens as
    stepping and picking argmaxes one step at a time, for rows of different lengths and starts."""
    model = _model(draft_vocab)
    seqs = [torch.randint(0, VOCAB, (n,)).tolist() for n in (3, 9, 6)]
    feats = [torch.randn(len(s), 64) for s in seqs]
    rows = [Row(slot, 0, s) for slot, s in enumerate(seqs)]
    fused = FeatureRunner(model, "cpu", torch.float32, num_slots=3, max_len=64).draft_greedy(rows, feats, 4)

    runner = FeatureRunner(model, "cpu", torch.float32, num_slots=3, max_len=64)
    vocab = model.draft_vocab
    logits, h = runner.step(rows, feats)
    expected = [[] for _ in rows]
    for step in range(4):
        picks = logits.argmax(-1)
        tokens = picks if vocab is None else vocab[picks]
        for b, token in enumerate(tokens.tolist()):
            expected[b].append(token)
        if step < 3:
            logits, h = runner.step([Row(r.slot, r.start + len(r.tokens) + step, [expected[b][-1]])
                                     for b, r in enumerate(rows)], [h[b : b + 1] for b in range(len(rows))])
    assert fused == expected
    assert len({tuple(t) for t in fused}) > 1  # the rows drafted different things: a real check


def _chain_children(model, seq, feats, path, branch):
    """The `branch` most likely next tokens (target ids) after drafting `path` as a chain after seq, in a fresh
    slot: what a draft tree's node at the end of `path` must have as children."""
    runner = FeatureRunner(model, "cpu", torch.float32, num_slots=1, max_len=64)
    logits, h = runner.step([Row(0, 0, seq)], [feats])
    for i, token in enumerate(path):
        logits, h = runner.step([Row(0, len(seq) + i, [token])], [h])
    top = logits[0].topk(branch).indices
    return (top if model.draft_vocab is None else model.draft_vocab[top]).tolist()


@pytest.mark.parametrize("draft_vocab", [None, sorted(range(3, VOCAB, 2))], ids=["full-head", "reduced-head"])
def test_a_draft_trees_nodes_are_what_chains_along_their_paths_would_draft(draft_vocab):
    """draft_tree grows a level per pass, each node seeing only its ancestors: each expanded node's children are
    the drafter's top tokens after its path drafted as a chain, for two rows of one pass; a one-branch tree is the
    greedy chain."""
    model = _model(draft_vocab, seed=3)
    seqs = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 9)]
    feats = [torch.randn(len(s), 64) for s in seqs]
    rows = [Row(slot, 0, s) for slot, s in enumerate(seqs)]
    runner = FeatureRunner(model, "cpu", torch.float32, num_slots=2, max_len=64)
    trees = runner.draft_tree(rows, feats, depth=3, branch=2, beam=2)
    for seq, f, tree in zip(seqs, feats, trees):
        assert len(tree.tokens) == 2 + 2 * 2 * 2 and tree.parents[:2] == [-1, -1]
        paths = {-1: []}
        for i, (token, parent) in enumerate(zip(tree.tokens, tree.parents)):
            paths[i] = paths[parent] + [token]
        for parent in sorted(set(tree.parents)):
            kids = [tree.tokens[i] for i, p in enumerate(tree.parents) if p == parent]
            assert kids == _chain_children(model, seq, f, paths[parent], 2), f"children of node {parent}"
    chain = FeatureRunner(model, "cpu", torch.float32, num_slots=2, max_len=64).draft_greedy(rows, feats, 4)
    one_branch = runner.draft_tree(rows, feats, depth=4, branch=1, beam=1)
    assert [t.tokens for t in one_branch] == chain and all(t.parents == [-1, 0, 1, 2] for t in one_branch)


def test_a_sampled_tree_declares_for_each_node_the_distribution_it_was_drawn_from():
    """Sampled siblings are drawn without replacement: the first declares the node's tempered top-n distribution,
    each next one that distribution with its elder siblings removed and renormalized; each holds its own token;
    siblings differ; the same generator seed drafts the same tree; greedy rows in the same pass declare point
    masses and keep their greedy children."""
    model = _model(sorted(range(3, VOCAB, 2)), seed=4)
    seqs = [torch.randint(0, VOCAB, (n,)).tolist() for n in (6, 8)]
    feats = [torch.randn(len(s), 64) for s in seqs]
    rows = [Row(slot, 0, s) for slot, s in enumerate(seqs)]

    def draft(seed):
        runner = FeatureRunner(model, "cpu", torch.float32, num_slots=2, max_len=64)
        return runner.draft_tree(rows, feats, depth=3, branch=3, beam=2, temperatures=[0.9, 0.0],
                                 generators=[torch.Generator().manual_seed(seed), None], top_n=16)

    sampled, greedy = draft(1)
    assert draft(1)[0] == sampled and draft(2)[0] != sampled
    assert greedy == draft(2)[1] and all(d == ([], []) for d in greedy.distributions)
    for parent in set(sampled.parents):
        kids = [i for i, p in enumerate(sampled.parents) if p == parent]
        assert len({sampled.tokens[i] for i in kids}) == len(kids)
        first_ids, first_probs = sampled.distributions[kids[0]]
        q = dict(zip(first_ids, first_probs))
        assert abs(sum(first_probs) - 1) < 1e-5
        for j, i in enumerate(kids):
            ids, probs = sampled.distributions[i]
            removed = {sampled.tokens[k] for k in kids[:j]}
            rest = sum(v for t, v in q.items() if t not in removed)
            expected = {t: (0.0 if t in removed else v / rest) for t, v in q.items()}
            assert ids == first_ids
            assert all(abs(p - expected[t]) < 1e-5 for t, p in zip(ids, probs))
            assert dict(zip(ids, probs))[sampled.tokens[i]] > 0


@pytest.mark.parametrize("num_layers,taps", [(1, None), (2, None), (1, [3, 7])])
def test_artifact_round_trip_and_target_check(tmp_path, monkeypatch, num_layers, taps):
    draft_vocab = sorted(torch.randperm(VOCAB)[:40].tolist())
    model = _model(draft_vocab, num_layers=num_layers, taps=taps)
    embed, head = model.lm.model.embed_tokens.weight, model.lm.lm_head.weight
    full_head = torch.zeros(VOCAB, 64)
    full_head[draft_vocab] = head.detach()
    drafter_model.save_drafter(tmp_path / "d", model, target="tiny", target_hash_hex=drafter_model.target_hash(
        embed, full_head), draft_vocab=draft_vocab, training={}, dtype=torch.float32, kind="feature",
        state=model.own_state(), taps=model.taps)
    assert is_feature_drafter(tmp_path / "d")
    monkeypatch.setattr(drafter_model, "target_head_weights", lambda spec: (embed.detach(), full_head))
    loaded = load_feature_drafter(tmp_path / "d", "tiny")
    ids, features = torch.randint(0, VOCAB, (1, 9)), torch.randn(1, 9, model.feature_width)
    assert loaded.taps == taps
    with torch.no_grad():
        for a, b in zip(model.unrolled(ids, features, 2), loaded.unrolled(ids, features, 2)):
            torch.testing.assert_close(a, b)
    assert loaded.draft_vocab.tolist() == draft_vocab
    with pytest.raises(drafter_model.DrafterMismatch):  # a layer-drafter loader refuses it by kind
        drafter_model.load_drafter(tmp_path / "d", "tiny")
    other = full_head.clone()
    other[draft_vocab[0], 0] += 1.0
    monkeypatch.setattr(drafter_model, "target_head_weights", lambda spec: (embed.detach(), other))
    with pytest.raises(drafter_model.DrafterMismatch, match="train one for this target"):
        load_feature_drafter(tmp_path / "d", "tiny")


def test_the_verifier_sends_each_committed_tokens_hidden_state_once(engine, eos, tokenizer):
    """With return_features, open's and each block's results carry the target's hidden states of the committed
    tokens that had none: after every step one row per committed token but the newest, equal to a plain forward
    over the same tokens (the real target, CPU); a later session with the same prompt restores its prefix from the
    prefix cache, hidden states included."""
    import asyncio

    from specdec.sampling import SamplingConfig
    from verifier_service.prefix_cache import PrefixCache
    from verifier_service.scheduler import Scheduler
    from verifier_service.session import FINISH_NONE, SessionSettings

    ids = tokenizer.encode("The three primary colors of light are red, green and blue. The three primary colors of")

    async def session(scheduler, session_id, drafts):
        settings = SessionSettings(session_id, ids, 12, SamplingConfig(), return_features=True)
        result = await scheduler.open(settings)
        rows = [result.features]
        assert result.features.shape[0] == len(ids)
        cached.append(result.session.stats.cached_prompt_tokens)
        while result.session.finish == FINISH_NONE:
            tokens = list(result.session.tokens)
            result = await scheduler.step(session_id, len(tokens), drafts(tokens))
            assert result.features.shape[0] == result.accepted + 1
            rows.append(result.features)
        tokens = list(result.session.tokens)
        scheduler.close(session_id)
        return tokens, torch.cat(rows)

    cached = []

    async def main():
        from specdec.prefix_hash import model_seed

        cache = PrefixCache(engine.shape, 64, engine.device, engine.dtype, model_seed("test"), features=True)
        scheduler = Scheduler(engine, eos, max_sessions=2, max_sequence_length=256, prefix_cache=cache)
        scheduler.start()
        # drafts: the context's last 3 tokens again (sometimes right on this repetitive prompt), then none
        out = [await session(scheduler, "a", lambda ctx: ctx[-3:]), await session(scheduler, "b", lambda ctx: [])]
        await scheduler.stop()
        return out

    (tokens_a, rows_a), (tokens_b, rows_b) = asyncio.run(main())
    assert tokens_a == tokens_b
    assert cached[0] == 0 and cached[1] >= 16  # the second prompt's first block came from the cache
    reference_cache = engine.new_cache(1, 256)
    _, _, expected = engine.forward_flat(reference_cache, [Row(0, 0, tokens_a[:-1])], hidden=True)
    for rows in (rows_a, rows_b):
        assert rows.shape == expected.shape == (len(tokens_a) - 1, engine.shape.hidden_size)
        torch.testing.assert_close(rows.float(), expected.float(), atol=0.05, rtol=0.01)  # sent as float16


def test_prefix_blocks_serve_hidden_states_only_once_saved_with_them(engine):
    from specdec.prefix_cache import PrefixCache
    from specdec.prefix_hash import model_seed

    tokens = list(range(100, 140))  # two full blocks and a tail
    kv = engine.new_cache(2, 64)
    _, _, hidden = engine.forward_flat(kv, [Row(0, 0, tokens)], hidden=True)
    cache = PrefixCache(engine.shape, 8, engine.device, engine.dtype, model_seed("test"), features=True)
    cache.save(kv, 0, tokens, len(tokens) - 1)  # by a session without hidden states
    assert cache.restore(kv, 1, tokens) == 32
    assert cache.restore_with_features(kv, 1, tokens) == (0, None)
    cache.save(kv, 0, tokens, len(tokens) - 1, hidden)  # the same blocks, now with them
    n, rows = cache.restore_with_features(kv, 1, tokens)
    assert n == 32
    torch.testing.assert_close(rows.float(), hidden[:32].float(), atol=0.05, rtol=0.01)


TAPS = [2, 15, 29]  # a fused drafter's on the real target (30 layers): a low, a middle and the last layer


async def _feature_session(scheduler, session_id, ids, layers, drafts, max_new=12):
    """Opens a session that wants `layers`' hidden states (None: the last layer's, as before feature_layers) and
    steps it to the end with drafts(context); returns its tokens, the features of all its verdicts, the prompt
    tokens it restored from the prefix cache and each verdict's pass size."""
    from specdec.sampling import SamplingConfig
    from verifier_service.session import FINISH_NONE, SessionSettings

    settings = SessionSettings(session_id, ids, max_new, SamplingConfig(), return_features=True,
                               feature_layers=tuple(layers or ()))
    result = await scheduler.open(settings)
    features, passes = [result.features], [result.batch_rows]
    assert result.features.shape[0] == len(ids)
    while result.session.finish == FINISH_NONE:
        tokens = list(result.session.tokens)
        result = await scheduler.step(session_id, len(tokens), drafts(tokens))
        assert result.features.shape[0] == result.accepted + 1
        features.append(result.features)
        passes.append(result.batch_rows)
    tokens = list(result.session.tokens)
    scheduler.close(session_id)
    return tokens, torch.cat(features), result.session.stats.cached_prompt_tokens, passes


def _expected_features(engine, tokens, layers):
    """The target's features of every committed token but the newest, from one plain pass over them."""
    _, _, expected = engine.forward_flat(engine.new_cache(1, 256), [Row(0, 0, tokens[:-1])], hidden=layers or True)
    return expected


def test_sessions_of_one_pass_each_get_their_own_layers(engine, eos, tokenizer):
    """A last-layer session and two fused ones tapping different layers, in the same passes (one prefill, then
    verify passes; the engine asked once for the union of their layers): each gets exactly its own layers' outputs
    side by side, those of a plain pass over its tokens, and the last-layer session the same features as alone."""
    import asyncio

    from verifier_service.scheduler import Scheduler

    prompts = ["The three primary colors of light are red, green and blue. The three primary colors of",
               "One, two, three, four, five, six, seven, eight, nine, ten. One, two, three, four, five,",
               "Monday, Tuesday, Wednesday, Thursday, Friday. Monday, Tuesday, Wednesday, Thursday,"]
    layers = [None, TAPS, [10, 29]]

    async def main():
        scheduler = Scheduler(engine, eos, max_sessions=3, max_sequence_length=256)
        scheduler.start()
        out = await asyncio.gather(*(
            _feature_session(scheduler, f"s{i}", tokenizer.encode(p), taps, lambda ctx: ctx[-3:])
            for i, (p, taps) in enumerate(zip(prompts, layers))))
        await scheduler.stop()
        return out

    hidden = engine.shape.hidden_size
    for (tokens, features, _, passes), taps in zip(asyncio.run(main()), layers):
        assert passes[0] == 3 and passes.count(3) >= 2  # the prefill and a verify pass had all three
        expected = _expected_features(engine, tokens, taps)
        assert features.shape == expected.shape == (len(tokens) - 1, len(taps or [0]) * hidden)
        torch.testing.assert_close(features.float(), expected.float(), atol=0.05, rtol=0.01)  # sent as float16


def test_the_prefix_cache_serves_each_session_the_layers_it_asks_for(engine, eos, tokenizer):
    """Blocks keep their saver's layers' hidden states: a fused session restores no prefix saved by a last-layer
    session (it lacks the other layers) and saves its own over it; then both kinds restore the whole prefix (a
    last-layer session from the fused blocks' last columns); every session's features are a plain pass's."""
    import asyncio

    from specdec.prefix_hash import model_seed
    from verifier_service.prefix_cache import PrefixCache
    from verifier_service.scheduler import Scheduler

    ids = tokenizer.encode("The three primary colors of light are red, green and blue. The three primary colors of")
    order = [("last", None), ("fused", TAPS), ("last-again", None), ("fused-again", TAPS)]

    async def main():
        cache = PrefixCache(engine.shape, 64, engine.device, engine.dtype, model_seed("test"), features=True)
        scheduler = Scheduler(engine, eos, max_sessions=2, max_sequence_length=256, prefix_cache=cache)
        scheduler.start()
        out = [await _feature_session(scheduler, sid, ids, taps, lambda ctx: [], max_new=6) for sid, taps in order]
        await scheduler.stop()
        return out

    runs = asyncio.run(main())
    full_blocks = len(ids) // 16 * 16
    assert full_blocks >= 16 and [cached for _, _, cached, _ in runs] == [0, 0, full_blocks, full_blocks]
    for (tokens, features, _, _), (_, taps) in zip(runs, order):
        assert tokens == runs[0][0]
        torch.testing.assert_close(features.float(), _expected_features(engine, tokens, taps).float(), atol=0.05,
                                   rtol=0.01)


def test_a_feature_layer_list_the_target_cannot_serve_fails_the_open_with_invalid_argument(engine, eos, tokenizer):
    """Through VerifierServicer.Verify: unordered, not ending with the last layer, past the last, repeated, or sent
    without return_features: each open answers INVALID_ARGUMENT naming the fix; the last layer listed alone is the
    plain last-layer session, and a good fused list gets its layers' features."""
    import asyncio

    import grpc

    from specdec.proto import session_pb2, verifier_pb2
    from verifier_service.scheduler import Scheduler
    from verifier_service.service import VerifierServicer

    ids = tokenizer.encode("The capital of France is")
    cases = {"unordered": [15, 2, 29], "no-last": [2, 15], "past-last": [2, 30], "repeated": [2, 29, 29],
             "no-features": [2, 29], "last-alone": [29], "fused": [2, 29]}

    async def main():
        scheduler = Scheduler(engine, eos, max_sessions=2, max_sequence_length=64)
        scheduler.start()

        async def requests():
            for sid, layers in cases.items():
                spec = session_pb2.SessionSpec(session_id=sid, prompt_ids=ids, max_new_tokens=1, feature_layers=layers,
                                               return_features=sid != "no-features")
                yield verifier_pb2.VerifyRequest(open=spec)

        replies = {r.session_id: r async for r in VerifierServicer(scheduler, "m").Verify(requests(), None)}
        await scheduler.stop()
        return replies

    replies = asyncio.run(main())
    for sid in ("unordered", "no-last", "past-last", "repeated", "no-features"):
        assert replies[sid].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], sid
        assert "feature_layers" in replies[sid].error.message
    assert "0..29" in replies["past-last"].error.message and "return_features" in replies["no-features"].error.message
    hidden = engine.shape.hidden_size
    for sid, width in (("last-alone", hidden), ("fused", 2 * hidden)):
        assert not replies[sid].HasField("error")
        assert len(replies[sid].features) == len(ids) * width * 2  # float16


@pytest.mark.parametrize("draft_vocab", [None, sorted(range(3, VOCAB, 2))], ids=["full-head", "reduced-head"])
def test_sampled_drafting_on_the_device_equals_step_by_step(draft_vocab):
    """`draft` with sampled rows (and a greedy one) next to stepping from the host and picking with the same
    uniforms: the same tokens and the same declared distributions (target ids; probabilities to 1e-6), each
    drafted token inside its own declared support with probability > 0."""
    from specdec.sampling import draft_picks

    model = _model(draft_vocab)
    seqs = [torch.randint(0, VOCAB, (n,)).tolist() for n in (3, 9, 6)]
    feats = [torch.randn(len(s), 64) for s in seqs]
    rows = [Row(slot, 0, s) for slot, s in enumerate(seqs)]
    temperatures, uniforms = [0.7, 0.0, 1.3], torch.rand(3, 4, dtype=torch.float64)
    tokens, dists = FeatureRunner(model, "cpu", torch.float32, num_slots=3, max_len=64).draft(
        rows, feats, 4, temperatures, uniforms, top_n=8)

    runner = FeatureRunner(model, "cpu", torch.float32, num_slots=3, max_len=64)
    vocab = model.draft_vocab
    logits, h = runner.step(rows, feats)
    for step in range(4):
        picks, ids, probs = draft_picks(logits, torch.tensor(temperatures), uniforms[:, step], 8)
        picked = picks if vocab is None else vocab[picks]
        ids = ids if vocab is None else vocab[ids]
        for b, token in enumerate(picked.tolist()):
            assert tokens[b][step] == token
            if temperatures[b]:
                # (the device loop's padded one-token passes round like the host's to ~1e-9, not bit for bit)
                assert dists[b][step][0] == ids[b].tolist()
                assert dists[b][step][1] == pytest.approx(probs[b].tolist(), abs=1e-6)
                support = dict(zip(*dists[b][step]))
                assert support[token] > 0 and abs(sum(support.values()) - 1) < 1e-6
            else:
                assert dists[b][step] == ([], []) and token == (logits[b].argmax() if vocab is None
                                                                else vocab[logits[b].argmax()])
        logits, h = runner.step([Row(r.slot, r.start + len(r.tokens) + step, [tokens[b][step]])
                                 for b, r in enumerate(rows)], [h[b : b + 1] for b in range(len(rows))])
    assert len({tuple(t) for t in tokens}) > 1


@pytest.mark.parametrize("draft_vocab", [None, sorted(range(3, VOCAB, 2))], ids=["full-head", "reduced-head"])
def test_forced_context_tokens_are_fed_on_the_device_before_drafting(draft_vocab):
    """`draft(forced=...)`: a row's guessed context tokens (a proactive draft's) are fed first, one pass each,
    and its drafts start after them; rows with fewer or none wait out the longest. The same tokens and declared
    distributions as stepping each row alone from the host, feeding the forced tokens and then its picks."""
    from specdec.sampling import draft_picks

    model = _model(draft_vocab)
    vocab = model.draft_vocab
    seqs = [torch.randint(0, VOCAB, (n,)).tolist() for n in (3, 9, 6)]
    feats = [torch.randn(len(s), 64) for s in seqs]
    rows = [Row(slot, 0, s) for slot, s in enumerate(seqs)]
    forced = [torch.randint(0, VOCAB, (n,)).tolist() for n in (2, 0, 1)]
    temperatures, steps = [0.7, 0.0, 1.3], 3
    uniforms = torch.rand(3, 2 + steps, dtype=torch.float64)
    tokens, dists = FeatureRunner(model, "cpu", torch.float32, num_slots=3, max_len=64).draft(
        rows, feats, steps, temperatures, uniforms, top_n=8, forced=forced)

    for b, row in enumerate(rows):
        runner = FeatureRunner(model, "cpu", torch.float32, num_slots=3, max_len=64)
        logits, h = runner.step([row], [feats[b]])
        expected, declared = [], []
        for i in range(len(forced[b]) + steps):
            if i < len(forced[b]):
                token = forced[b][i]
            else:
                pick, ids, probs = draft_picks(logits, torch.tensor([temperatures[b]]), uniforms[b, i : i + 1], 8)
                token = int(pick[0] if vocab is None else vocab[pick[0]])
                expected.append(token)
                declared.append(((ids[0] if vocab is None else vocab[ids[0]]).tolist(), probs[0].tolist()))
            logits, h = runner.step([Row(row.slot, len(row.tokens) + i, [token])], [h])
        assert tokens[b] == expected
        if temperatures[b]:
            assert [d[0] for d in dists[b]] == [d[0] for d in declared]
            for got, want in zip(dists[b], declared):  # (batched passes against a row's own: float32 rounding)
                assert got[1] == pytest.approx(want[1], abs=1e-5)
        else:
            assert dists[b] == [([], [])] * steps
    assert len({tuple(t) for t in tokens}) > 1


def test_draft_picks_draw_each_token_with_its_declared_probability():
    """Inverse-CDF draws over a grid of uniforms land on each declared token in proportion to its declared
    probability (within one grid step), never on one declared with probability 0; temperature 0 is the argmax."""
    from specdec.sampling import draft_picks

    logits = torch.tensor([[2.0, 0.5, -1.0, 1.2, -80.0, 0.0]])
    grid = (torch.arange(10_000, dtype=torch.float64) + 0.5) / 10_000
    picks, ids, probs = draft_picks(logits.expand(len(grid), -1), torch.full((len(grid),), 0.9), grid, 5)
    declared = dict(zip(ids[0].tolist(), probs[0].tolist()))
    counts = torch.bincount(picks, minlength=6).double() / len(grid)
    for token, p in declared.items():
        assert abs(counts[token] - p) <= 1e-4 + 1e-6
    assert counts[4] == 0 and 4 not in declared  # outside the top 5: never drawn
    greedy, _, _ = draft_picks(logits, torch.zeros(1), torch.tensor([0.99], dtype=torch.float64), 5)
    assert greedy.tolist() == [0]


def test_tree_drafts_keep_greedy_decoding_and_a_chain_shaped_tree_is_the_chain(engine, eos, tokenizer):
    """eval-drafter --tree (draft_tree, a tree-attention pass of the target, the greedy walk, the path's KV moved):
    it commits greedy decoding's tokens, and a one-branch tree measures what the chain loop measures (same drafts,
    same verdicts)."""
    from specdec.draft_tree import TreeShape
    from specdec import models
    from specdec.eval_drafter import _FeatureDrafter, measure, measure_tree
    from specdec.sampling import SamplingConfig

    model = load_feature_drafter("drafters/smollm2-135m-instruct-fused", models.DEFAULT_TARGET)
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
               for text in ("Name three colors.", "What is a hash table?")]
    new = 12
    reference = []
    for prompt in prompts:  # plain greedy decoding on the same engine
        cache = engine.new_cache(1, len(prompt) + new + 2)
        first = int(engine.forward(cache, [Row(0, 0, prompt)])[0][-1].argmax())
        tokens = [first, *engine.decode_greedy(cache, [Row(0, len(prompt), [first])], new - 1)[0]]
        reference.append(next((tokens[: i + 1] for i, t in enumerate(tokens) if t in eos), tokens))
    greedy = SamplingConfig(temperature=0.0)

    def drafter():
        return _FeatureDrafter(model, len(prompts), max(map(len, prompts)) + new + 40, "cpu", torch.float32)

    tree = measure_tree(engine, drafter(), prompts, 3, TreeShape(2, 2), greedy, new, eos, 0)
    assert tree["outputs"] == reference and tree["max_nodes"] == 2 + 2 * 2 * 2 and tree["tau"] >= 1.0
    chain_shaped = measure_tree(engine, drafter(), prompts, 3, TreeShape(1, 1), greedy, new, eos, 0)
    chain = measure(engine, drafter(), prompts, 3, greedy, new, eos, 0, "cpu")
    assert chain_shaped["outputs"] == reference
    assert chain_shaped["tau"] == pytest.approx(chain["tau"], abs=1e-6)
