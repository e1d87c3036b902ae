"""The drafter tier's service pieces: a session opened right after another closed gets the slot the close gives back;
feature sessions ask for hidden states only while the prompt's fit one verdict."""

from __future__ import annotations

import asyncio
import time

import pytest

from drafter_service.service import DraftBatcher
from specdec.errors import Exhausted


class OneSlotDrafter:
    """A drafter with one KV slot whose close takes a while on the torch thread (it saves prefix blocks)."""

    def __init__(self):
        self.holder = None

    def open(self, session_id):
        if self.holder is not None:
            raise Exhausted("all 1 drafter KV slots are in use")
        self.holder = session_id

    def close(self, session_id):
        time.sleep(0.2)
        if self.holder == session_id:
            self.holder = None


class RecordingDrafter:
    """Records the sessions of each propose call; drafts one token each."""

    def __init__(self):
        self.calls = []

    def open(self, session_id):
        pass

    def close(self, session_id):
        pass

    def propose(self, requests):
        from drafter_service.drafters import Draft

        self.calls.append(sorted(r.session_id for r in requests))
        return [Draft([1]) for _ in requests]


def test_open_waits_for_closes_under_way():
    async def main():
        batcher = DraftBatcher(OneSlotDrafter())
        await batcher.open("a")
        batcher.close("a")  # never waits: the slot comes back when the torch thread is done
        await batcher.open("b")  # failed with "all 1 drafter KV slots are in use" when open did not wait
        return batcher.drafter.holder

    assert asyncio.run(main()) == "b"


def test_feature_sessions_ask_for_hidden_states_only_while_the_prompts_fit_one_verdict():
    """The open verdict carries every prompt token's hidden state: past half gRPC's message limit a session drafts
    nothing instead of sending a verdict too large for the stream all sessions of the pair share."""
    from types import SimpleNamespace

    from drafter_service.service import MAX_FEATURE_BYTES, wants_features
    from specdec.server import MAX_MESSAGE_BYTES

    assert MAX_FEATURE_BYTES < MAX_MESSAGE_BYTES
    eight_b = SimpleNamespace(wants_features=True, feature_width=4096)  # 8 KB per token in float16
    assert wants_features(eight_b, 4000)
    assert not wants_features(eight_b, 5000)  # 41 MB
    default = SimpleNamespace(wants_features=True, feature_width=576)
    assert wants_features(default, 16384)  # the default target's longest sessions always fit
    assert not wants_features(SimpleNamespace(wants_features=False, feature_width=576), 10)
    fused = SimpleNamespace(wants_features=True, feature_width=3 * 4096)  # a fused drafter reading three layers
    assert wants_features(fused, 1300)
    assert not wants_features(fused, 1400)  # 34 MB: each token's three layers count


def test_a_sessions_features_staged_on_the_event_loop_become_rows_on_the_torch_thread_up_to_the_asked_count():
    """_Features: verdicts' bytes are staged without torch work and folded when a draft reads them; a draft asked
    for before a later verdict sees only the rows it was asked with (the later ones are the committed tokens a
    proactive draft guessed at)."""
    from types import SimpleNamespace

    import torch

    from drafter_service.service import _Features
    from specdec import compute

    features = _Features(SimpleNamespace(feature_width=3))
    states = torch.randn(7, 3).to(torch.float16)
    features.stage(SimpleNamespace(features=states[:4].numpy().tobytes()))  # the open: the prompt's rows
    features.stage(SimpleNamespace(features=b""))  # a verdict without new rows
    asked = features.upto(features.count)
    features.stage(SimpleNamespace(features=states[4:7].numpy().tobytes()))  # the next verdict, before drafting
    assert features.count == 7
    assert torch.equal(compute.call(asked), states[:4])
    assert torch.equal(compute.call(features.upto(features.count)), states)
    features.stage(SimpleNamespace(features=torch.randn(300, 3).to(torch.float16).numpy().tobytes()))  # grows
    assert compute.call(features.upto(features.count)).shape == (307, 3)
    assert torch.equal(compute.call(features.upto(7)), states)


def test_the_batcher_is_idle_only_with_nothing_queued_and_no_batch_drafting():
    """Drafting ahead (DrafterServicer's proactive drafts) waits for an idle batcher: what it reads."""
    import threading

    from drafter_service.drafters import Draft, DraftRequest
    from specdec.sampling import SamplingConfig

    release = threading.Event()

    class SlowDrafter:
        def propose(self, requests):
            release.wait(5)
            return [Draft([1]) for _ in requests]

    async def main():
        batcher = DraftBatcher(SlowDrafter())
        seen = [batcher.idle]
        batcher.start()
        request = DraftRequest("a", [1, 2], 1, SamplingConfig(), None, None)
        drafting = asyncio.ensure_future(batcher.propose(request))
        await asyncio.sleep(0)
        seen.append(batcher.idle)  # queued
        await asyncio.sleep(0.1)
        seen.append(batcher.idle)  # drafting on the torch thread
        release.set()
        draft = await drafting
        await asyncio.sleep(0)
        seen.append(batcher.idle)
        return seen, draft.tokens

    assert asyncio.run(main()) == ([True, False, False, True], [1])


@pytest.mark.parametrize("gather_s, expected", [(0.0, [1, 1]), (2.0, [2])])
def test_a_batch_waits_for_half_the_open_sessions_only_within_its_gather_window(gather_s, expected):
    """SPECDEC_DRAFT_GATHER_MS: with a window, a session's draft waits (up to it) for half of the open sessions to
    ask, and they are drafted in one batch; without one, each is drafted as soon as it asks."""
    from drafter_service.drafters import DraftRequest
    from specdec.sampling import SamplingConfig

    async def main():
        batcher = DraftBatcher(RecordingDrafter(), gather_s=gather_s)
        for session in "abcd":
            await batcher.open(session)
        batcher.start()
        first = asyncio.ensure_future(batcher.propose(DraftRequest("a", [1, 2], 1, SamplingConfig(), None, None)))
        await asyncio.sleep(0.2)  # "b" asks later, while "a" waits (with a window) or after it was drafted
        second = asyncio.ensure_future(batcher.propose(DraftRequest("b", [1, 2], 1, SamplingConfig(), None, None)))
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        return [len(call) for call in batcher.drafter.calls]

    assert asyncio.run(main()) == expected


def test_running_sessions_are_drafted_before_and_apart_from_a_new_sessions_first_draft():
    """A session's first draft carries its whole prompt: queued together with running sessions' drafts, it goes in a
    call of its own after theirs, so they never wait for its wide pass."""
    from drafter_service.drafters import DraftRequest
    from specdec.sampling import SamplingConfig

    def ask(batcher, session):
        return asyncio.ensure_future(batcher.propose(DraftRequest(session, [1, 2], 1, SamplingConfig(), None, None)))

    async def main():
        batcher = DraftBatcher(RecordingDrafter())
        for session in "abc":
            await batcher.open(session)
        batcher.start()
        await asyncio.wait_for(ask(batcher, "a"), 5)  # alone: one call
        await asyncio.wait_for(asyncio.gather(ask(batcher, "a"), ask(batcher, "b")), 5)  # "a" runs, "b" is new
        await asyncio.wait_for(asyncio.gather(ask(batcher, "c"), ask(batcher, "b")), 5)  # "b" runs now
        return batcher.drafter.calls

    assert asyncio.run(main()) == [["a"], ["a"], ["b"], ["b"], ["c"]]


def test_drafts_ahead_only_on_an_idle_drafter_but_always_for_a_session_whose_output_depends_on_them():
    """A seeded sampled session's drafts ahead take draws from its generator: whether it drafts ahead must not
    depend on the load, or the same request would give other tokens on a busier drafter."""
    from types import SimpleNamespace

    from drafter_service.drafters import Draft
    from drafter_service.service import DrafterServicer

    batcher = SimpleNamespace(idle=True)
    servicer = DrafterServicer(batcher, proactive=True)
    chain, tree = Draft([5, 6]), Draft([5, 6], parents=[-1, 0])
    assert servicer._drafts_ahead(chain, 2, fixed_output=False)
    assert not servicer._drafts_ahead(tree, 2, fixed_output=False)  # trees keep their depth: nothing ahead
    assert not servicer._drafts_ahead(Draft([]), 2, fixed_output=False)
    batcher.idle = False
    assert not servicer._drafts_ahead(chain, 2, fixed_output=False)
    assert servicer._drafts_ahead(chain, 2, fixed_output=True)
    assert not DrafterServicer(batcher, proactive=False)._drafts_ahead(chain, 2, fixed_output=True)


def test_a_torch_thread_call_timed_splits_its_wait_its_work_and_the_event_loops_resumption():
    """compute.run_timed (the drafter's batches, the verifier's ticks): a call queued behind another waits for it,
    and its own work is timed apart from that wait; where a round's time goes rests on this split."""
    from specdec import compute
    from specdec.phases import PhaseTimes

    phases = PhaseTimes()

    async def main():
        first = asyncio.ensure_future(compute.run_timed(phases, "a", time.sleep, 0.2))
        await asyncio.sleep(0.01)  # "b" is submitted while "a" holds the torch thread
        return await asyncio.gather(first, compute.run_timed(phases, "b", lambda: time.sleep(0.05) or "done"))

    assert asyncio.run(main()) == [None, "done"]
    summary = phases.summary()
    assert summary["a_thread"]["mean_ms"] >= 200 and summary["a_wait"]["mean_ms"] < 100
    assert summary["b_wait"]["mean_ms"] >= 150  # behind "a"
    assert 50 <= summary["b_thread"]["mean_ms"] < 150
    assert set(summary) == {f"{call}_{part}" for call in "ab" for part in ("wait", "thread", "resume")}


def test_the_gather_window_defaults_to_3_ms_on_a_gpu_drafter_and_off_on_a_cpu_one(monkeypatch):
    from drafter_service.app import draft_gather_s

    monkeypatch.delenv("SPECDEC_DRAFT_GATHER_MS", raising=False)
    assert draft_gather_s("cuda:0") == 0.003
    assert draft_gather_s("cpu") == 0.0
    monkeypatch.setenv("SPECDEC_DRAFT_GATHER_MS", "0")  # the operator's setting wins on any device
    assert draft_gather_s("cuda:0") == 0.0
    monkeypatch.setenv("SPECDEC_DRAFT_GATHER_MS", "5")
    assert draft_gather_s("cpu") == 0.005
