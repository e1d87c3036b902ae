"""The draft tree a verifier advises (verifier_service.tree_advice) and how drafters read it (tree_for)."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from drafter_service.service import tree_for
from specdec.draft_tree import FOLLOW_VERIFIER, TreeShape
from specdec.engine import LlamaEngine, Row
from tests.test_engine import tiny_model
from verifier_service import tree_advice


@pytest.fixture(scope="module")
def engine():
    return LlamaEngine(tiny_model("llama"))


def test_a_tree_is_advised_where_its_verify_pass_costs_little_more_than_a_step(engine, monkeypatch):
    ratios = []
    monkeypatch.setattr(tree_advice, "pass_cost_ratio", lambda engine, tokens: ratios.pop())
    ratios.append(1.1)  # the AVX-512 EPYC's 11 tokens: ~1.0-1.2x a step
    assert tree_advice.advise_draft_tree(engine, 3, 128) == "2x2"
    ratios.append(1.69)  # the AVX2 EPYC's
    assert tree_advice.advise_draft_tree(engine, 3, 128) == ""
    # no measuring where a tree cannot be served: too deep for the verifier's limit, no drafts, explicit settings
    assert tree_advice.advise_draft_tree(engine, 3, 9) == ""
    assert tree_advice.advise_draft_tree(engine, 0, 128) == ""
    assert tree_advice.advise_draft_tree(engine, 3, 128, "off") == ""
    assert tree_advice.advise_draft_tree(engine, 3, 128, "3X1") == "3x1"
    with pytest.raises(ValueError, match="BRANCHxBEAM"):
        tree_advice.advise_draft_tree(engine, 3, 128, "wide")
    assert ratios == []


def test_measuring_leaves_the_serving_cache_alone(engine):
    cache = engine.new_cache(2, 64)
    engine.forward(cache, [Row(0, 0, list(range(3, 20)))])
    before = [k.clone() for k in cache.keys]
    ratio = tree_advice.pass_cost_ratio(engine, 11, repeats=2)
    assert math.isfinite(ratio) and ratio > 0
    assert all(torch.equal(k, b) for k, b in zip(cache.keys, before))


def test_drafters_following_the_advice_draft_the_advised_tree_where_it_fits(caplog):
    feature = SimpleNamespace(can_draft_trees=True)
    info = SimpleNamespace(draft_tree="2x2", max_tree_nodes=128)
    assert tree_for(FOLLOW_VERIFIER, feature, info, 3) == TreeShape(2, 2)
    assert tree_for(FOLLOW_VERIFIER, SimpleNamespace(can_draft_trees=False), info, 3) is None  # n-gram, say
    assert tree_for(FOLLOW_VERIFIER, feature, SimpleNamespace(draft_tree="2x2", max_tree_nodes=9), 3) is None
    assert tree_for(FOLLOW_VERIFIER, feature, SimpleNamespace(draft_tree="", max_tree_nodes=128), 3) is None
    assert tree_for(None, feature, info, 3) is None  # --draft-tree off: chains whatever the advice
    assert tree_for(TreeShape(3, 1), feature, info, 3) == TreeShape(3, 1)  # a shape of its own
    with caplog.at_level(logging.WARNING, logger="drafter_service.service"):
        assert tree_for(FOLLOW_VERIFIER, feature, SimpleNamespace(draft_tree="2y2", max_tree_nodes=128), 3) is None
    assert "cannot read" in caplog.text


def test_a_gpu_verifier_advising_trees_captures_the_width_they_verify_in_before_serving():
    """Trees that fit the chains' CUDA graphs verify in the chains' pass (Scheduler._passes): a verifier advising
    trees captures that width's graphs before serving (and no prefill graphs again); advising chains, nothing."""
    from verifier_service.app import warm_advised_trees

    calls = []
    engine = SimpleNamespace(device=torch.device("cuda"), graph_width=16,
                             warm_cuda_graphs=lambda *args: calls.append(args) or 7)
    scheduler = SimpleNamespace(engine=engine, cache="cache")
    warm_advised_trees(scheduler, 64, "", 512, None)
    assert calls == []
    warm_advised_trees(scheduler, 64, "2x2", 512, [[29]])
    assert calls == [("cache", 64, (16,), 512, [[29]])]
    warm_advised_trees(SimpleNamespace(engine=SimpleNamespace(device=torch.device("cpu"), graph_width=0,
                                                              warm_cuda_graphs=calls.append), cache=None),
                       8, "2x2", 512, None)
    assert len(calls) == 1
