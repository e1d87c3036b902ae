"""The CUDA-graph runner's own logic (buckets, padding, static buffers, wide tree passes, the capture check) run on
the CPU: a stand-in "graph" re-runs the captured pass and rewrites its outputs in place, as a replay does, so every
other line of engine._GraphRunner is the one a GPU runs. CI has no GPU; the real capture is checked on the H200 by
bench/gpu_engine.py."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from specdec.engine import LlamaEngine, Row, _GraphRunner, tree_visibility
from tests.test_engine import _decode_one_step_at_a_time, tiny_model


class _Replayed:
    def __init__(self, step, outputs):
        self.step, self.outputs = step, outputs

    def replay(self):
        for output, new in zip(self.outputs, self.step()):
            output.copy_(new)


class CpuGraphRunner(_GraphRunner):
    broken = False  # capture graphs that replay nothing (what the capture check is for)

    def _new_pool(self):
        return None

    def _on_device(self):
        return contextlib.nullcontext()

    def _record(self, step):
        # a captured graph has run nothing yet: its outputs hold garbage until a replay writes them
        outputs = tuple(torch.full_like(output, float("nan") if output.is_floating_point() else -1)
                        for output in step())
        graph = _Replayed(step, outputs)
        if self.broken:
            graph.replay = lambda: None
        return graph, outputs


def _engines(seed=3, broken=False, kind="qwen2"):
    model = tiny_model(kind, seed=seed)
    eager, graphed = LlamaEngine(model), LlamaEngine(model)
    graphed._graphs = CpuGraphRunner(graphed, max_batch=8, max_width=4)
    graphed._graphs.broken = broken
    return eager, graphed


def _prefill(engines, prompts, max_len=64):
    caches = []
    for engine in engines:
        cache = engine.new_cache(len(prompts) + 1, max_len)
        engine.forward(cache, [Row(i, 0, p) for i, p in enumerate(prompts)])
        caches.append(cache)
    return caches


PROMPTS = [list(range(5, 14)), list(range(20, 41)), [7, 8, 9]]


def test_graphed_passes_equal_eager_ones_across_buckets():
    """Ragged rows padded to a batch bucket (3 -> 4), widths 1 and 3 (-> 4), KV lengths in a 64 bucket: the same
    logits and hidden states as the eager pass, and the same KV in the real slots; a bucket's graph is reused."""
    eager, graphed = _engines()
    caches = _prefill((eager, graphed), PROMPTS)
    for width in (1, 3):
        rows = [Row(i, len(p), list(range(60, 60 + width)), all_logits=True) for i, p in enumerate(PROMPTS)]
        (want, _, want_hidden), (got, _, got_hidden) = (
            e.forward_flat(c, rows, hidden=[1, 2]) for e, c in zip((eager, graphed), caches))
        assert torch.allclose(got, want, atol=1e-5) and torch.equal(got.argmax(-1), want.argmax(-1))
        assert torch.allclose(got_hidden, want_hidden, atol=1e-5)
        for layer in range(3):
            for i, p in enumerate(PROMPTS):
                n = len(p) + width
                assert torch.allclose(caches[1].keys[layer][i, :, :n], caches[0].keys[layer][i, :, :n], atol=1e-6)
    # the prompts' prefill (3 rows, up to 21 tokens: a wide bucket), then (batch 4, width 1) and (4, 4), taps [1]
    assert sorted(key[1:3] for key in graphed._graphs.graphs) == [(4, 1), (4, 4), (4, 32)]
    again = [Row(0, len(PROMPTS[0]) + 3, [1])]
    assert torch.allclose(graphed.forward(caches[1], again)[0], eager.forward(caches[0], again)[0], atol=1e-5)


def test_graphed_decode_greedy_equals_eager():
    """decode_greedy on the graph's own buffers (the inputs copied in once, the argmax fed back in place) gives
    the tokens of eager single steps, for a ragged batch and one row, and a stop asked for stops it."""
    eager, graphed = _engines(seed=7, kind="qwen3")
    for prompts in (PROMPTS, PROMPTS[1:2]):
        caches = _prefill((eager, graphed), prompts)
        rows = [Row(i, len(p), [p[-1] + 1]) for i, p in enumerate(prompts)]
        want = _decode_one_step_at_a_time(eager, caches[0], rows, 9)
        assert graphed.decode_greedy(caches[1], rows, 9) == want
        assert len({t for tokens in want for t in tokens}) > 3
        stopped = graphed.decode_greedy(_prefill((graphed,), prompts)[0], rows, 9, more=lambda i: i < 4)
        assert stopped == [tokens[:4] for tokens in want]


def test_graphed_steps_queued_ahead_go_on_from_the_graphs_own_buffers(monkeypatch):
    """With ahead, the next chunk goes on from the graph's buffers where the queued steps left them (no inputs
    packed in again) while its bucket holds the positions, and packs afresh on a larger bucket when not; the tokens
    are the single steps' either way."""
    from specdec import engine as engine_module

    eager, graphed = _engines(seed=7, kind="qwen3")
    caches = _prefill((eager, graphed), PROMPTS, max_len=256)
    rows = [Row(i, len(p), [p[-1] + 1]) for i, p in enumerate(PROMPTS)]
    want = _decode_one_step_at_a_time(eager, caches[0], rows, 150)
    packs = []
    pack = engine_module._pack
    monkeypatch.setattr(engine_module, "_pack", lambda *a, **k: packs.append(len(a[0])) or pack(*a, **k))
    made, got = 0, [[] for _ in rows]
    for asked in (5, 8, 8, 8, 60, 61):
        ask_rows = rows if not made else [Row(r.slot, r.start + made, [w[made - 1]]) for r, w in zip(rows, want)]
        for tokens, new in zip(got, graphed.decode_greedy(caches[1], ask_rows, asked, ahead=2)):
            tokens += new
        made += asked
    assert got == [w[:made] for w in want]
    # packed for the first chunk (positions up to 28: the 128-key bucket), which held the next four (up to 112);
    # the last one (up to 173) needed the 256-key bucket, packed afresh
    assert len([n for n in packs if n]) == 2


def test_wide_draft_tree_passes_run_on_their_own_graphs():
    """A draft tree wider than the chain graphs (here 6 nodes > 4) verifies on a tree bucket of few rows, with each
    node's logits those of the eager pass."""
    eager, graphed = _engines(seed=6)
    caches = _prefill((eager, graphed), PROMPTS[:2])
    parents = [-1, -1, 0, 0, 1, 2]
    visible = tree_visibility(parents)
    start = len(PROMPTS[0]) - 1  # the tree's root is the newest committed token, whose KV this pass writes
    tree = Row(0, start, [PROMPTS[0][-1], 50, 51, 52, 53, 54, 55], all_logits=True, tree_base=start, visible=visible)
    chain = Row(1, len(PROMPTS[1]), [61, 62], all_logits=True)
    want = eager.forward(caches[0], [tree, chain])
    got = graphed.forward(caches[1], [tree, chain])
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
    assert any(key[2] > 4 for key in graphed._graphs.graphs)  # a tree bucket was captured


def test_narrow_draft_trees_verify_in_the_chains_graph_with_them():
    """Trees no wider than the chain graphs (here 4 tokens, the graphs' max width) and chains in one pass of several
    rows (what a GPU verifier's tick makes of them: Scheduler._passes) replay one chain bucket's graph, with each
    node's logits and each chain's those of the eager pass."""
    eager, graphed = _engines(seed=6)
    assert graphed.graph_width == 4
    prompts = [*PROMPTS, list(range(70, 80))]
    caches = _prefill((eager, graphed), prompts)
    rows = []
    for slot, prompt in enumerate(prompts):
        start = len(prompt) - 1
        if slot % 2:  # a 2x1 tree two deep: the root, its two children, one grandchild
            rows.append(Row(slot, start, [prompt[-1], 50 + slot, 60 + slot, 70 + slot], all_logits=True,
                            tree_base=start, visible=tree_visibility([-1, -1, 0])))
        else:
            rows.append(Row(slot, len(prompt), [61, 62, 63], all_logits=True))
    before, eager_before = set(graphed._graphs.graphs), graphed.passes["eager"]  # (the prefills' graphs)
    want = eager.forward(caches[0], rows)
    got = graphed.forward(caches[1], rows)
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
    assert set(graphed._graphs.graphs) - before == {(id(caches[1]), 4, 4, 64, (), False)}  # a chain bucket, 4 rows
    assert graphed.passes["eager"] == eager_before


def test_prefills_of_a_few_prompts_run_on_wide_graphs():
    """Prompts longer than the chain graphs' width (here 40 and 20 tokens > 4) prefill in one replay of a wide
    bucket when they are few, with the eager pass's logits and KV; more rows than a wide bucket holds run eagerly."""
    eager, graphed = _engines(seed=9)
    caches = [engine.new_cache(6, 64) for engine in (eager, graphed)]
    prompts = [list(range(5, 45)), list(range(50, 70))]
    rows = [Row(i, 0, p) for i, p in enumerate(prompts)]
    want, got = eager.forward(caches[0], rows), graphed.forward(caches[1], rows)
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
    for layer in range(3):
        for i, p in enumerate(prompts):
            assert torch.allclose(caches[1].keys[layer][i, :, : len(p)], caches[0].keys[layer][i, :, : len(p)],
                                  atol=1e-6)
    assert [key[1:3] for key in graphed._graphs.graphs] == [(2, 64)]
    many = [Row(i, 0, list(range(7 + i, 27 + i))) for i in range(5)]  # 5 rows > WIDE_BATCH
    want, got = eager.forward(caches[0], many), graphed.forward(caches[1], many)
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
    assert len(graphed._graphs.graphs) == 1
    assert {k: v for k, v in graphed.passes.items() if k != "capture_s"} == {"graphed": 1, "eager": 1, "captures": 1}


def test_graphs_warmed_before_serving_are_the_ones_replayed(monkeypatch, caplog):
    """warm_cuda_graphs captures the greedy decode steps' and the verify passes' buckets up front, saying how far it
    has got while it takes long (a compiled verifier's took ~5 min on an H200): decoding and verifying afterwards
    capture nothing on the token path, and give the eager engine's tokens and logits."""
    eager, graphed = _engines(seed=10)
    caches = _prefill((eager, graphed), PROMPTS)
    monkeypatch.setattr(type(graphed._graphs), "PROGRESS_EVERY_S", 0.0)  # every capture counts as a long while
    # batches 1, 2, 4 (up to 3 rows) x (a greedy step, a 2-token pass) x the one KV bucket of a 64-token cache
    with caplog.at_level(logging.INFO, logger="specdec.engine"):
        assert graphed.warm_cuda_graphs(caches[1], max_rows=3, widths=(2,), max_kv=64) == 6
        assert graphed.warm_cuda_graphs(caches[1], max_rows=3, widths=(2,), max_kv=64) == 0  # all there already
    progress = [r.getMessage().partition(" (")[0] for r in caplog.records if "CUDA graphs (" in r.getMessage()]
    assert progress == [f"captured {n} of 6 CUDA graphs" for n in range(1, 6)]
    captures = graphed.passes["captures"]
    rows = [Row(i, len(p), [7]) for i, p in enumerate(PROMPTS)]
    assert graphed.decode_greedy(caches[1], rows, 5) == eager.decode_greedy(caches[0], rows, 5)
    blocks = [Row(i, len(p) + 5, [11, 12], all_logits=True) for i, p in enumerate(PROMPTS[:2])]
    want, got = eager.forward(caches[0], blocks), graphed.forward(caches[1], blocks)
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
    assert graphed.passes["captures"] == captures


def test_prefills_warmed_before_serving_are_replayed_for_a_few_rows_only():
    """Wide widths (prefills of a few prompts) are warmed for batches up to WIDE_BATCH rows, the passes that can
    replay them: a prefill of two 20-token prompts afterwards captures nothing and gives the eager logits."""
    eager, graphed = _engines(seed=12)
    caches = [e.new_cache(8, 64) for e in (eager, graphed)]
    # batches 1, 2, 4, 8: a greedy step each, a 2-token pass each, a 32-token pass for 1, 2 and 4 rows
    assert graphed.warm_cuda_graphs(caches[1], max_rows=8, widths=(2, 32), max_kv=64) == 4 + 4 + 3
    captures = graphed.passes["captures"]
    prompts = [Row(i, 0, list(range(3 + i, 23 + i))) for i in range(2)]
    want, got = eager.forward(caches[0], prompts), graphed.forward(caches[1], prompts)
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
    assert graphed.passes["captures"] == captures and graphed.passes["graphed"] == 1


def test_a_fused_drafters_layers_warmed_before_serving_are_replayed_when_its_sessions_verify():
    """warm_cuda_graphs(feature_layers=...) also captures the verify passes that return those layers' hidden states
    (a fused drafter's sessions ask for them): verifying with them afterwards captures nothing and gives the eager
    engine's logits and hidden states; a list the model cannot serve is refused before any capture."""
    eager, graphed = _engines(seed=11)
    caches = _prefill((eager, graphed), PROMPTS)
    # batches 1, 2, 4 x (a greedy step, a 2-token pass, a 2-token pass returning layers 0 and 2) x one KV bucket
    assert graphed.warm_cuda_graphs(caches[1], max_rows=3, widths=(2,), max_kv=64, feature_layers=[[0, 2]]) == 9
    captures = graphed.passes["captures"]
    blocks = [Row(i, len(p), [11, 12], all_logits=True) for i, p in enumerate(PROMPTS[:2])]
    want = eager.forward_flat(caches[0], blocks, hidden=[0, 2])
    got = graphed.forward_flat(caches[1], blocks, hidden=[0, 2])
    assert torch.allclose(got[0], want[0], atol=1e-5) and got[1] == want[1]
    assert torch.allclose(got[2], want[2], atol=1e-5)
    assert graphed.passes["captures"] == captures
    with pytest.raises(ValueError, match="must be layers of this model"):
        graphed.warm_cuda_graphs(caches[1], max_rows=3, widths=(2,), max_kv=64, feature_layers=[[0, 7]])


def test_a_graph_that_does_not_replay_the_pass_is_refused(caplog):
    """The capture check: a chain bucket whose graph does not reproduce the eager pass is an error (stale logits
    would be served silently otherwise); a wide tree bucket's falls back to eager passes with a warning."""
    eager, graphed = _engines(seed=7, broken=True)
    caches = _prefill((eager, graphed), PROMPTS[:1])
    with pytest.raises(RuntimeError, match="does not match the eager pass"):
        graphed.forward(caches[1], [Row(0, len(PROMPTS[0]), [3])])
    start = len(PROMPTS[0]) - 1
    tree = Row(0, start, [PROMPTS[0][-1], 50, 51, 52, 53, 54], all_logits=True, tree_base=start,
               visible=tree_visibility([-1, -1, 0, 1, 2]))
    with caplog.at_level(logging.WARNING, logger="specdec.engine"):
        got = graphed.forward(caches[1], [tree])[0]
    assert "running such wide passes" in caplog.text
    assert torch.allclose(got, eager.forward(caches[0], [tree])[0], atol=1e-5)


def test_compiled_graphs_decode_and_verify_as_the_eager_engine(monkeypatch):
    """The compiled path (SPECDEC_COMPILE, what met the 800 bar on the H200) on the stand-in graphs: torch.compile'd
    passes in buckets of at least 2 rows and 2 tokens, the greedy step's input updates compiled with it, each graph
    through the capture check; greedy decode gives the eager engine's tokens and a verify pass its logits. (It
    stopped starting on the H200 once, unnoticed here: fifteenth session. ~1 min of compiling on 2 cores.)"""
    monkeypatch.setenv("SPECDEC_CPU_PACKED_WEIGHTS", "no")  # dynamo traces F.linear, not oneDNN's packed op
    model = tiny_model("qwen3", seed=7)
    eager, graphed = LlamaEngine(model), LlamaEngine(model)
    graphed._graphs = CpuGraphRunner(graphed, max_batch=8, max_width=4, compile=True)
    caches = _prefill((eager, graphed), PROMPTS)
    rows = [Row(i, len(p), [p[-1] + 1]) for i, p in enumerate(PROMPTS)]
    assert graphed.decode_greedy(caches[1], rows, 9) == _decode_one_step_at_a_time(eager, caches[0], rows, 9)
    caches = _prefill((eager, graphed), PROMPTS)
    chains = [Row(i, len(p), [60, 61, 62], all_logits=True) for i, p in enumerate(PROMPTS)]
    want, got = eager.forward(caches[0], chains), graphed.forward(caches[1], chains)
    assert all(torch.allclose(g, w, atol=1e-4) for g, w in zip(got, want))
    assert graphed._graphs.floor == 2 and all(key[1] >= 2 and key[2] >= 2 for key in graphed._graphs.graphs)


def test_the_capture_check_compares_passes_whose_scratch_writes_agree():
    """The check's two runs (the replay and the eager pass) of a compiled engine's greedy step, two tokens a row:
    every token that writes a given entry of the scratch slot is the same token at the same position, so on a GPU,
    where such writes land in no set order, both runs compute the same thing. (A greedy step's warm-ups leave an
    argmax in each row's first token; its second token is padding too, and the two raced for the scratch slot's
    first entry, which the attention reads: the compiled verifier refused to start on the H200.)"""
    _, graphed = _engines(seed=7, kind="qwen3")
    runner = graphed._graphs
    runner.floor = 2  # a compiled runner's buckets (the step itself stays eager here)
    cache = _prefill((graphed,), PROMPTS, max_len=128)[0]
    seen = []
    step = runner.step

    def spy(cache, tokens, positions, write_slots, write_pos, *rest):
        seen.append([t.clone() for t in (tokens, positions, write_slots, write_pos)])
        return step(cache, tokens, positions, write_slots, write_pos, *rest)

    runner.step = spy
    with torch.inference_mode():  # as the engine's own entry points run
        runner._graph(cache, 2, 2, 128, (), greedy=True)
    assert len(seen) == 3  # the stand-in capture's own run, then the check's two
    for tokens, positions, write_slots, write_pos in seen[1:]:
        writers = {}
        for target in zip(write_slots.flatten().tolist(), write_pos.flatten().tolist(),
                          tokens.flatten().tolist(), positions.flatten().tolist()):
            writers.setdefault(target[:2], set()).add(target[2:])
        assert all(len(w) == 1 for w in writers.values()), writers
    assert torch.equal(seen[1][0], seen[2][0]) and torch.equal(seen[1][1], seen[2][1])


def test_prefills_of_many_prompts_go_a_graphs_rows_at_a_time():
    """The verifier's prefill groups (similar lengths): with graphs, prompts the wide graphs take go at most
    WIDE_BATCH a pass, so each pass replays one; longer prompts and engines without graphs keep one pass a group."""
    from verifier_service.scheduler import _length_groups

    eager, graphed = _engines(seed=13)
    assert eager.graphed_prefill is None and graphed.graphed_prefill == (4, 128)
    lengths = [20, 22, 21, 25, 30, 24, 23, 300, 310, 305, 301, 302]
    assert _length_groups(lengths) == [[0, 2, 1, 6, 5, 3, 4], [7, 10, 11, 9, 8]]
    assert _length_groups(lengths, graphed.graphed_prefill) == [[0, 2, 1, 6], [5, 3, 4], [7, 10, 11, 9, 8]]
    caches = [e.new_cache(8, 64) for e in (eager, graphed)]
    prompts = [Row(i, 0, list(range(3 + i, 20 + 2 * i))) for i in range(6)]
    for group in _length_groups([len(r.tokens) for r in prompts], graphed.graphed_prefill):
        rows = [prompts[i] for i in group]
        want, got = eager.forward(caches[0], rows), graphed.forward(caches[1], rows)
        assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
    assert graphed.passes["eager"] == 0 and graphed.passes["graphed"] == 2
