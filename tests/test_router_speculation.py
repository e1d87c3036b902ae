"""The router's choice to attach a drafter and of k, and the advice verifiers give it: speculation yields to a
saturated verifier, except where the output would depend on it (seeded sampling)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from router.pool import Pool
from router.service import RouterServicer
from specdec.proto import generation_pb2


def servicer(limit: int) -> RouterServicer:
    return RouterServicer(None, Pool([]), Pool([]), speculation_max_sessions=limit)


def sampling(temperature: float = 0.0, seed: int | None = None) -> generation_pb2.SamplingParams:
    params = generation_pb2.SamplingParams(max_new_tokens=8, temperature=temperature)
    if seed is not None:
        params.seed = seed
    return params


@pytest.mark.parametrize("in_flight, expected", [(0, True), (3, True), (4, False), (40, False)])
def test_saturated_verifier_decodes_new_greedy_sessions_alone(in_flight, expected):
    verifier = SimpleNamespace(in_flight=in_flight)
    assert servicer(4)._speculate(5, sampling(), verifier) is expected
    assert servicer(4)._speculate(5, sampling(0.7), verifier) is expected  # unseeded sampling: any draw is fine


def test_seeded_sampling_keeps_speculating_under_load():
    # same seed, same output: whether a draft was attached must not depend on the verifier's load
    verifier = SimpleNamespace(in_flight=100)
    assert servicer(4)._speculate(5, sampling(0.7, seed=3), verifier)


def test_no_limit_and_no_drafts():
    verifier = SimpleNamespace(in_flight=1000)
    assert servicer(0)._speculate(5, sampling(), verifier)
    assert not servicer(0)._speculate(0, sampling(), SimpleNamespace(in_flight=0))


def test_by_default_the_verifiers_advice_sets_the_limit():
    from specdec.proto import verifier_pb2

    router = servicer(-1)
    assert router._speculate(5, sampling(), SimpleNamespace(in_flight=50))  # no advice heard yet: no limit
    router._info = verifier_pb2.GetModelInfoResponse(speculation_max_sessions=2)
    assert router._speculate(5, sampling(), SimpleNamespace(in_flight=1))
    assert not router._speculate(5, sampling(), SimpleNamespace(in_flight=2))
    router._info = verifier_pb2.GetModelInfoResponse()  # a verifier that gives none
    assert router._speculate(5, sampling(), SimpleNamespace(in_flight=50))


def test_draft_length_follows_the_request_then_the_router_then_the_verifiers_advice():
    from specdec.proto import verifier_pb2

    info = verifier_pb2.GetModelInfoResponse(max_draft_tokens=16, draft_tokens=3)
    asked = generation_pb2.GenerateRequest(speculation=generation_pb2.SpeculationParams(max_draft_tokens=7))
    unset = generation_pb2.GenerateRequest()
    assert servicer(4)._draft_tokens(asked, info) == 7  # the request's own k
    assert servicer(4)._draft_tokens(generation_pb2.GenerateRequest(
        speculation=generation_pb2.SpeculationParams(max_draft_tokens=40)), info) == 16  # capped by the verifier
    by_router = RouterServicer(None, Pool([]), Pool([]), default_draft_tokens=6)
    assert by_router._draft_tokens(unset, info) == 6
    assert servicer(4)._draft_tokens(unset, info) == 3  # default: the verifiers' advice for their device
    assert servicer(4)._draft_tokens(unset, verifier_pb2.GetModelInfoResponse(max_draft_tokens=16)) == 5  # none


def test_the_verifiers_advice_is_its_devices_measured_default_unless_an_operator_sets_it():
    import asyncio

    from specdec.proto import verifier_pb2
    from verifier_service.service import VerifierServicer

    def info(device: str, **advice) -> verifier_pb2.GetModelInfoResponse:
        scheduler = SimpleNamespace(engine=SimpleNamespace(device=SimpleNamespace(type=device)), vocab_size=10,
                                    max_sequence_length=64, max_draft_tokens=16, eos_ids={2},
                                    max_tree_nodes=128)
        servicer = VerifierServicer(scheduler, "m", **advice)
        return asyncio.run(servicer.GetModelInfo(verifier_pb2.GetModelInfoRequest(), None))

    assert (info("cpu").speculation_max_sessions, info("cpu").draft_tokens) == (1, 3)
    assert (info("cuda").speculation_max_sessions, info("cuda").draft_tokens) == (8, 5)
    tuned = info("cuda", speculation_max_sessions=32, draft_tokens=40)  # an operator's own crossover
    assert (tuned.speculation_max_sessions, tuned.draft_tokens) == (32, 16)  # k capped by the longest block
    assert info("cpu", speculation_max_sessions=0, draft_tokens=0).draft_tokens == 0  # no advice
