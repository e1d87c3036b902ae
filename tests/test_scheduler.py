"""The verifier's scheduler with the real target: batching, the greedy ladder, seeds and malformed blocks."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from specdec.engine import Row
from specdec.errors import Exhausted, InvalidInput
from specdec.sampling import SamplingConfig
from verifier_service.scheduler import DraftDistribution, Scheduler
from verifier_service.session import FINISH_NONE, SessionSettings

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]
GREEDY = SamplingConfig()


@pytest.fixture(scope="module")
def references(hf_target, tokenizer):
    """transformers' greedy continuation of each prompt (20 tokens, EOS suppressed by length)."""
    out = {}
    for text in PROMPTS:
        ids = tokenizer.encode(text)
        generated = hf_target.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):]
        out[text] = (ids, generated.tolist())
    return out


def run(coro):
    return asyncio.run(coro)


async def _generate(scheduler, settings, drafter):
    """Drives one session: `drafter(context)` returns a list of draft tokens for the committed context."""
    result = await scheduler.open(settings)
    out = list(result.tokens)
    while result.session.finish == FINISH_NONE:
        tokens = list(result.session.tokens)
        result = await scheduler.step(settings.session_id, len(tokens), drafter(tokens))
        out.extend(result.tokens)
    scheduler.close(settings.session_id)
    return out, result.session.stats


def _scheduler(engine, eos, **kw):
    s = Scheduler(engine, eos, **kw)
    s.start()
    return s


def test_greedy_ladder_with_the_real_target(engine, eos, references):
    ids, expected = references[PROMPTS[0]]
    full = ids + expected

    def right(ctx):
        return full[len(ctx) : len(ctx) + 5]

    def wrong(ctx):
        return [(t + 1) % 49152 for t in right(ctx)]

    def planted(j):
        def draft(ctx):
            block = right(ctx)
            if len(block) > j:
                block[j] = (block[j] + 1) % 49152
            return block

        return draft

    async def main():
        s = _scheduler(engine, eos)
        results = {}
        for name, drafter in [("right", right), ("wrong", wrong)] + [(f"j={j}", planted(j)) for j in range(5)]:
            settings = SessionSettings(name, ids, 20, GREEDY)
            results[name] = await _generate(s, settings, drafter)
        await s.stop()
        return results

    results = run(main())
    for name, (tokens, stats) in results.items():
        assert tokens == expected, name
    assert results["wrong"][1].accepted_draft_tokens == 0
    assert results["right"][1].verify_steps <= 4  # 1 prefill token + 6 per step covers 20 tokens in 4 steps


def test_batched_sessions_equal_each_alone(engine, eos, references):
    async def main(concurrent: bool):
        s = _scheduler(engine, eos, max_sessions=4)
        jobs = [
            _generate(s, SessionSettings(text, references[text][0], 20, GREEDY),
                      lambda ctx, t=text: _ngram_like(ctx, references[t]))
            for text in PROMPTS
        ]
        if concurrent:
            out = await asyncio.gather(*jobs)
            ticks = s.ticks
        else:
            out = [await j for j in jobs]
            ticks = s.ticks
        await s.stop()
        return [tokens for tokens, _ in out], ticks

    together, ticks_together = run(main(True))
    alone, ticks_alone = run(main(False))
    assert together == alone
    assert together == [references[t][1] for t in PROMPTS]
    assert ticks_together < ticks_alone  # the sessions really shared forward passes


def _ngram_like(ctx, reference):
    """Right for two tokens, then wrong: exercises partial acceptance in every step."""
    ids, expected = reference
    full = ids + expected
    block = full[len(ctx) : len(ctx) + 4]
    return block[:2] + [(t + 3) % 49152 for t in block[2:]]


def test_same_seed_same_sampled_output(engine, eos, references):
    ids, _ = references[PROMPTS[2]]
    sampling = SamplingConfig(temperature=0.9, top_p=0.95)

    async def main(seed):
        s = _scheduler(engine, eos)
        out, _ = await _generate(s, SessionSettings("x", ids, 16, sampling, seed=seed), lambda ctx: [])
        await s.stop()
        return out

    assert run(main(42)) == run(main(42))
    assert run(main(42)) != run(main(43))


def test_malformed_blocks_fail_their_session_only(engine, eos, references):
    ids, expected = references[PROMPTS[0]]

    async def main():
        s = _scheduler(engine, eos, max_draft_tokens=4)
        good = asyncio.create_task(_generate(s, SessionSettings("good", ids, 20, GREEDY), lambda ctx: []))
        errors = []
        cases = [
            ("out of vocabulary", lambda n: (n, [49152])),
            ("position mismatch", lambda n: (n - 1, [1])),
            ("too long", lambda n: (n, [1] * 5)),
        ]
        for i, (name, make) in enumerate(cases):
            r = await s.open(SessionSettings(f"bad{i}", ids, 20, GREEDY))
            length, tokens = make(len(r.session.tokens))
            with pytest.raises(InvalidInput) as info:
                await s.step(f"bad{i}", length, tokens)
            errors.append(str(info.value))
            assert f"bad{i}" not in s.sessions  # its KV slot is freed
        r = await s.open(SessionSettings("baddist", ids, 20, GREEDY))
        with pytest.raises(InvalidInput, match="sums to"):
            await s.step("baddist", len(r.session.tokens), [5], [DraftDistribution([5, 6], [0.5, 0.9])])
        tokens, _ = await good
        await s.stop()
        return errors, tokens

    errors, tokens = run(main())
    assert "outside the vocabulary" in errors[0]
    assert "roll back" in errors[1]
    assert "at most 4" in errors[2]
    assert tokens == expected


def test_full_verifier_answers_resource_exhausted(engine, eos, references):
    ids, _ = references[PROMPTS[0]]

    async def main():
        s = _scheduler(engine, eos, max_sessions=1)
        await s.open(SessionSettings("a", ids, 5, GREEDY))
        with pytest.raises(Exhausted, match="retry later"):
            await s.open(SessionSettings("b", ids, 5, GREEDY))
        s.close("a")
        await s.open(SessionSettings("b", ids, 5, GREEDY))  # a freed slot is reused
        await s.stop()

    run(main())


def test_chunked_decode_gives_the_same_tokens_in_fewer_ticks(engine, eos, references):
    """Speculation off with decode_chunk_ms: several steps per tick, same tokens (greedy) and same draws (seeded
    sampling) as one step per tick; a tick that also holds a speculative block stays one step."""
    ids, expected = references[PROMPTS[1]]

    async def decode(chunk_ms, sampling, seed=None, with_block=False):
        scheduler = _scheduler(engine, eos, max_sessions=2, max_sequence_length=128)
        scheduler.decode_chunk_ms = chunk_ms
        result = await scheduler.open(SessionSettings("d", ids, 20, sampling, seed))
        other = await scheduler.open(SessionSettings("o", ids, 20, GREEDY)) if with_block else None
        tokens, updates = list(result.tokens), 0
        while result.session.finish == FINISH_NONE:
            step = scheduler.step("d", len(result.session.tokens), [], chunk=True)
            if other is not None and other.session.finish == FINISH_NONE:
                block = scheduler.step("o", len(other.session.tokens), [1, 2])
                result, other = await asyncio.gather(step, block)
            else:
                result = await step
            tokens += result.tokens
            updates += 1
        await scheduler.stop()
        return tokens, updates

    one_by_one, updates = run(decode(0, GREEDY))
    assert one_by_one == expected and updates == 19
    chunked, chunked_updates = run(decode(60_000, GREEDY))
    assert chunked == expected and chunked_updates < 5
    mixed, mixed_updates = run(decode(60_000, GREEDY, with_block=True))
    assert mixed == expected and mixed_updates > 10  # the other session's blocks share its ticks
    sampled = SamplingConfig(temperature=0.8)
    assert run(decode(0, sampled, seed=3))[0] == run(decode(60_000, sampled, seed=3))[0]


def test_greedy_chunk_stops_at_eos_and_length(engine, eos, references):
    """A greedy chunk decodes past a session's end on the device; what it commits stops at the EOS (not sent) or
    at max_new_tokens, exactly where one step per tick stops."""
    from verifier_service.session import FINISH_EOS, FINISH_LENGTH

    ids, expected = references[PROMPTS[2]]
    stop_at = next(i for i in range(4, len(expected)) if expected[i] not in expected[:i])

    async def decode(eos_ids, max_new_tokens):
        scheduler = _scheduler(engine, frozenset(eos_ids), max_sessions=1, max_sequence_length=128)
        scheduler.decode_chunk_ms = 60_000
        result = await scheduler.open(SessionSettings("d", ids, max_new_tokens, GREEDY))
        tokens = list(result.tokens)
        while result.session.finish == FINISH_NONE:
            result = await scheduler.step("d", len(result.session.tokens), [], chunk=True)
            tokens += result.tokens
        await scheduler.stop()
        return tokens, result.session.finish, len(result.session.tokens)

    assert run(decode({expected[stop_at]}, 20)) == (expected[:stop_at], FINISH_EOS, len(ids) + stop_at + 1)
    assert run(decode(eos, 13)) == (expected[:13], FINISH_LENGTH, len(ids) + 13)


def test_steps_queued_ahead_between_chunks_keep_the_tokens(engine, eos, references):
    """With decode_ahead_steps, each greedy chunk queues two more steps behind its own, which the
    next chunk takes up: the same tokens as without, stopping at the same EOS and length; the queued steps are
    really taken up (not dropped each time)."""
    from verifier_service.session import FINISH_EOS, FINISH_LENGTH

    ids, expected = references[PROMPTS[2]]
    stop_at = next(i for i in range(6, len(expected)) if expected[i] not in expected[:i])

    async def decode(ahead, eos_ids, max_new_tokens):
        scheduler = _scheduler(engine, frozenset(eos_ids), max_sessions=1, max_sequence_length=128,
                               decode_ahead_steps=ahead, decode_chunk_ms=40)
        taken = []
        take = scheduler.cache.take_ahead
        scheduler.cache.take_ahead = lambda rows: taken.append(take(rows)) or taken[-1]
        result = await scheduler.open(SessionSettings("d", ids, max_new_tokens, GREEDY))
        tokens, updates = list(result.tokens), 0
        while result.session.finish == FINISH_NONE:
            result = await scheduler.step("d", len(result.session.tokens), [], chunk=True)
            tokens += result.tokens
            updates += 1
        await scheduler.stop()
        return (tokens, result.session.finish, len(result.session.tokens)), updates, sum(t is not None for t in taken)

    plain, _, used = run(decode(0, eos, 20))
    assert plain == (expected[:20], FINISH_LENGTH, len(ids) + 20) and used == 0
    ahead, updates, used = run(decode(2, eos, 20))
    assert ahead == plain and used >= max(1, updates - 2)
    assert run(decode(2, {expected[stop_at]}, 20))[0] == (expected[:stop_at], FINISH_EOS, len(ids) + stop_at + 1)
    assert run(decode(2, eos, 13))[0] == (expected[:13], FINISH_LENGTH, len(ids) + 13)


def test_greedy_chunks_bound_their_steps_by_the_pace_so_far(engine, eos, references, monkeypatch):
    """A chunk's step bound picks the KV-length bucket a GPU attends over: the first chunk may take any room, later
    ones about what fits in decode_chunk_ms at the last chunk's pace (+2), and the tokens stay the same."""
    ids, expected = references[PROMPTS[1]]
    asked = []
    decode_greedy = engine.decode_greedy
    monkeypatch.setattr(engine, "decode_greedy", lambda cache, rows, steps, more=None, **kw: asked.append(steps)
                        or decode_greedy(cache, rows, steps, more, **kw))

    async def main():
        scheduler = _scheduler(engine, eos, max_sessions=1, max_sequence_length=128, decode_chunk_ms=100)
        result = await scheduler.open(SessionSettings("d", ids, 20, GREEDY))
        tokens = list(result.tokens)
        while result.session.finish == FINISH_NONE:
            result = await scheduler.step("d", len(result.session.tokens), [], chunk=True)
            tokens += result.tokens
        pace = scheduler._chunk_step_ms
        await scheduler.stop()
        return tokens, pace

    tokens, pace = run(main())
    assert tokens == expected[:20]
    assert asked[0] == 19 and len(asked) > 2  # the first chunk: all the room left; then several more
    assert all(steps <= int(100 / (0.5 * pace)) + 2 for steps in asked[1:-1])  # (the pace varies between chunks)
    assert max(asked[1:]) < 19


def test_greedy_chunk_yields_to_queued_work(engine, eos, references):
    """A greedy decode chunk ends within a step or two of other work being queued (here a new session's prompt),
    so a long chunk never makes a newcomer wait for it; what it committed is still the greedy continuation."""
    ids, expected = references[PROMPTS[0]]

    async def main():
        scheduler = _scheduler(engine, eos, max_sessions=2, max_sequence_length=128)
        scheduler.decode_chunk_ms = 60_000
        first = await scheduler.open(SessionSettings("a", ids, 20, GREEDY))
        chunk = asyncio.ensure_future(scheduler.step("a", len(first.session.tokens), [], chunk=True))
        await asyncio.sleep(0.15)  # the chunk is running on the torch thread (a step here takes ~20-40 ms)
        newcomer = await scheduler.open(SessionSettings("b", ids, 5, GREEDY))
        result = await chunk
        await scheduler.stop()
        return first.tokens + result.tokens, newcomer.tokens

    tokens, newcomer = run(main())
    # with 60 s of budget and 19 tokens of room, only the queued prompt could end the chunk this early
    assert 2 < len(tokens) < 20 and tokens == expected[: len(tokens)]
    assert newcomer == expected[:1]


def test_chunks_only_when_every_open_session_is_in_the_tick(engine, eos, references):
    """Under load, the sessions of a tick are some of those decoding (the rest ask a moment later): a chunk for
    them would keep the rest out of its passes, so it runs one step; with every open session in, it chunks."""
    ids, expected = references[PROMPTS[1]]

    async def main():
        scheduler = _scheduler(engine, eos, max_sessions=2, max_sequence_length=128)
        scheduler.decode_chunk_ms = 60_000
        a = await scheduler.open(SessionSettings("a", ids, 20, GREEDY))
        b = await scheduler.open(SessionSettings("b", ids, 20, GREEDY))
        alone = await scheduler.step("a", len(a.session.tokens), [], chunk=True)  # b is open but not asking
        both = await asyncio.gather(scheduler.step("a", len(alone.session.tokens), [], chunk=True),
                                    scheduler.step("b", len(b.session.tokens), [], chunk=True))
        await scheduler.stop()
        return a.tokens + alone.tokens, [r.tokens for r in both], b.tokens

    a_first, (a_more, b_more), b_first = run(main())
    assert a_first == expected[:2]  # one step while b was out of the tick
    assert len(a_more) > 1 and a_first + a_more == expected[: 2 + len(a_more)]
    assert len(b_more) > 1 and b_first + b_more == expected[: 1 + len(b_more)]


async def _generate_trees(scheduler, settings, drafter):
    """Drives one session with draft trees: `drafter(context)` returns (tokens, parents) for the context."""
    result = await scheduler.open(settings)
    out = list(result.tokens)
    while result.session.finish == FINISH_NONE:
        tokens = list(result.session.tokens)
        draft, parents = drafter(tokens)
        result = await scheduler.step(settings.session_id, len(tokens), draft, draft_parents=parents)
        out.extend(result.tokens)
    scheduler.close(settings.session_id)
    return out, result.session.stats


def test_draft_trees_commit_greedy_decodings_tokens_whichever_branch_is_right(engine, eos, references):
    """Greedy draft trees whose right path sits on a later sibling at every depth (so the accepted nodes' KV is
    moved into place every step), in one batch with chain sessions: every session's tokens are transformers'
    greedy output, and the right path is accepted whole."""
    ids, expected = references[PROMPTS[1]]
    full = ids + expected

    def tree(ctx):
        # depth 1: wrong, right; under each, a wrong then the right next token; a leaf under the right-right
        right = full[len(ctx) : len(ctx) + 3]
        if len(right) < 3:
            return right, list(range(-1, len(right) - 1))
        wrong = [(t + 7) % 49152 for t in right]
        tokens = [wrong[0], right[0], wrong[1], right[1], wrong[1], right[1], right[2]]
        return tokens, [-1, -1, 0, 0, 1, 1, 5]

    async def main():
        s = _scheduler(engine, eos, max_sessions=4)
        jobs = [_generate_trees(s, SessionSettings("tree", ids, 20, GREEDY), tree)]
        jobs += [_generate(s, SessionSettings(t, references[t][0], 20, GREEDY),
                           lambda ctx, t=t: _ngram_like(ctx, references[t])) for t in (PROMPTS[0], PROMPTS[2])]
        out = await asyncio.gather(*jobs)
        await s.stop()
        return out

    (tokens, stats), *chains = run(main())
    assert tokens == expected
    assert [c[0] for c in chains] == [references[PROMPTS[0]][1], references[PROMPTS[2]][1]]
    assert stats.accepted_draft_tokens >= 3 * (stats.verify_steps - 2)  # 3 accepted a step, but near the end
    assert stats.drafted_by_position[:3] == [stats.verify_steps] * 3 or stats.verify_steps <= 6


def test_a_seeded_sampled_tree_session_replays_and_keeps_its_committed_kv_right(engine, eos, references):
    """A sampled session verifying draft trees (siblings drawn without replacement from the target's own tempered
    distribution, as a good drafter would) gives the same tokens for the same seed; and every token it committed
    is scored afterwards exactly as a fresh prefill of its sequence scores it (the moved KV is the path's)."""
    ids, _ = references[PROMPTS[2]]
    sampling = SamplingConfig(temperature=0.8)

    async def main(seed):
        s = _scheduler(engine, eos)
        result = await s.open(SessionSettings("t", ids, 24, sampling, seed=seed))
        generator = torch.Generator().manual_seed(seed)
        while result.session.finish == FINISH_NONE:
            tokens = list(result.session.tokens)
            logits = engine.forward(s.cache, [engine_row(result.session)])[0][-1]
            probs = torch.softmax(logits.double() / 0.8, -1)
            picks, declared = draw(probs, generator)
            dists = [DraftDistribution(torch.nonzero(d).flatten().tolist(), d[d > 0].tolist()) for d in declared]
            result = await s.step("t", len(tokens), picks, dists, draft_parents=[-1, -1, -1])
        out, session = list(result.session.tokens), result.session
        kept = engine.forward(s.cache, [engine_row(session)])[0][-1]  # reads the KV of every committed token
        fresh_cache = engine.new_cache(1, 128)
        fresh = engine.forward(fresh_cache, [Row(0, 0, out)])[0][-1]
        s.close("t")
        await s.stop()
        return out, session.stats, (kept - fresh).abs().max().item()

    first, stats, kv_error = run(main(5))
    assert run(main(5))[0] == first
    assert stats.accepted_draft_tokens > 0 and stats.draft_tokens <= 3 * stats.verify_steps
    assert kv_error <= 1e-4


def engine_row(session):
    return Row(session.slot, session.kv_length, [session.tokens[-1]])


def draw(probs, generator):
    from specdec.sampling import draw_without_replacement

    top = probs.topk(64)
    picks, declared = draw_without_replacement(top.values[None], torch.rand(1, 3, generator=generator,
                                                                            dtype=torch.float64))
    full = torch.zeros(3, probs.shape[0], dtype=torch.float64)
    full[:, top.indices] = declared[0]
    return top.indices[picks[0]].tolist(), full


def test_malformed_draft_trees_fail_their_session_with_a_reason(engine, eos, references):
    ids, _ = references[PROMPTS[0]]

    async def main():
        s = _scheduler(engine, eos, max_draft_tokens=2, max_tree_nodes=4)
        reasons = []
        for i, (tokens, parents) in enumerate([([1, 2], [-1]), ([1, 2], [-1, 1]), ([1, 2, 3, 4], [-1, 0, 1, -1]),
                                               ([1, 2, 3, 4, 5], [-1, -1, -1, -1, -1])]):
            r = await s.open(SessionSettings(f"bad{i}", ids, 20, GREEDY))
            with pytest.raises(InvalidInput) as info:
                await s.step(f"bad{i}", len(r.session.tokens), tokens, draft_parents=parents)
            reasons.append(str(info.value))
        await s.stop()
        return reasons

    reasons = run(main())
    assert "2 draft tokens" in reasons[0] and "earlier token" in reasons[1]
    assert "3 tokens deep" in reasons[2] and "at most 4" in reasons[3]


def test_draft_trees_verify_in_passes_of_their_own_of_at_most_four_rows(engine, eos):
    """A tree row is ~70 tokens wide: chains padded to it would pay for it, and only few-row tree passes replay
    as CUDA graphs."""
    from verifier_service.scheduler import _Work

    s = Scheduler(engine, eos)
    works = ([_Work(None, None, [1, 2])] + [_Work(None, None, [1, 2], draft_parents=[-1, -1]) for _ in range(5)]
             + [_Work(None, None, [])])
    passes = [[i for i, _ in group] for group in s._passes(list(enumerate(works)))]
    assert passes == [[6], [0], [1, 2, 3, 4], [5]]  # (on the CPU plain decode rows and chain blocks run apart)


def test_on_a_gpu_trees_that_fit_the_chains_graphs_verify_in_the_ticks_one_pass(engine, eos):
    """On a GPU a tree of at most LlamaEngine.graph_width tokens (a 2x2 tree 4 deep: 15) goes in the tick's one
    pass with the chains, whatever the number of rows (the chains' graphs take it); wider trees keep passes of their
    own of at most four rows."""
    from types import SimpleNamespace

    from verifier_service.scheduler import _Work

    s = Scheduler(engine, eos)
    s.engine = SimpleNamespace(device=torch.device("cuda"), graph_width=16)  # what _passes reads of a GPU engine
    small = [_Work(None, None, list(range(14)), draft_parents=[-1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6])] * 5
    wide = _Work(None, None, list(range(16)), draft_parents=[-1] + list(range(15)))
    works = [_Work(None, None, [1, 2]), *small, _Work(None, None, []), wide]
    passes = [[i for i, _ in group] for group in s._passes(list(enumerate(works)))]
    assert passes == [[0, 1, 2, 3, 4, 5, 6], [7]]
    s.engine = SimpleNamespace(device=torch.device("cuda"), graph_width=0)  # no graphs: trees apart, as before
    passes = [[i for i, _ in group] for group in s._passes(list(enumerate(works)))]
    assert passes == [[0, 6], [1, 2, 3, 4], [5, 7]]


def test_an_unexpected_error_fails_its_session_instead_of_hanging_it(engine, eos, references, caplog):
    """A bug or a failing device inside a pass (here a TypeError in the prefill) reaches the drafter as an INTERNAL
    error on that session (logged with its traceback), and the stream goes on serving other sessions: before, only
    specdec's own errors were answered, and the drafter waited for a reply that never came."""
    import grpc

    from specdec.proto import session_pb2, verifier_pb2
    from verifier_service.service import VerifierServicer

    ids, expected = references[PROMPTS[0]]

    async def main():
        scheduler = _scheduler(engine, eos, max_sessions=2, max_sequence_length=128)
        prefill = scheduler._prefill

        def failing(works, deliver=None):
            if any(w.session.id == "broken" for w in works):
                raise TypeError("object of type 'int' has no len()")
            return prefill(works, deliver)

        scheduler._prefill = failing

        async def requests():
            for sid in ("broken", "fine"):
                yield verifier_pb2.VerifyRequest(open=session_pb2.SessionSpec(session_id=sid, prompt_ids=ids,
                                                                              max_new_tokens=4))
                await asyncio.sleep(0.3)  # one prefill at a time

        replies = {}
        async for reply in VerifierServicer(scheduler, "m").Verify(requests(), None):
            replies[reply.session_id] = reply
        await scheduler.stop()
        return replies, scheduler.sessions

    with caplog.at_level(logging.ERROR, logger="verifier_service.service"):
        replies, sessions = run(asyncio.wait_for(main(), 60))
    assert replies["broken"].error.code == grpc.StatusCode.INTERNAL.value[0]
    assert "TypeError" in replies["broken"].error.message and "broken" in caplog.text
    assert not replies["fine"].HasField("error") and list(replies["fine"].update.token_ids) == expected[:1]
    assert "broken" not in sessions
