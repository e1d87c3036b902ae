"""Tree verification: a chain is `verify`, greedy is the fast path, and the output distribution is the target's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from specdec.sampling import sample
from specdec.verification import TreeVerdict, tree_children, verify, verify_tree, verify_tree_greedy


def _dist(rng, shape, peaked=False):
    logits = rng.normal(size=shape) * (4 if peaked else 1)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _one_hot(tokens, vocab):
    return np.eye(vocab)[np.asarray(tokens, dtype=np.int64)].reshape(len(tokens), vocab)


def test_tree_children_lists_each_nodes_children_in_block_order():
    assert tree_children([]) == [[]]
    assert tree_children([-1, 0, 1]) == [[0], [1], [2], []]
    # row 0 is the root, row i + 1 is node i; children need not be contiguous in the block
    assert tree_children([-1, -1, 0, -1, 0, 1, 3, 3]) == [[0, 1, 3], [2, 4], [5], [], [6, 7], [], [], [], []]


@pytest.mark.parametrize("seed", range(4))
def test_a_chain_gives_verifys_verdict_with_the_same_uniforms(seed):
    rng = np.random.default_rng(seed)
    vocab, seen = 7, set()
    for case in range(150):
        n = int(rng.integers(0, 7))
        point_mass = case % 3 == 0
        target = _dist(rng, (n + 1, vocab), peaked=case % 2 == 0)
        if point_mass:
            # a deterministic drafter's tokens, taken from the target so that acceptances happen
            tokens = np.array([rng.choice(vocab, p=target[i]) for i in range(n)], dtype=np.int64)
            draft = _one_hot(tokens, vocab)
        else:
            draft = _dist(rng, (n, vocab), peaked=case % 4 == 1)
            tokens = np.array([rng.choice(vocab, p=draft[i]) for i in range(n)], dtype=np.int64)
        accept_u, sample_u = rng.random(n), rng.random()

        batched = verify(
            torch.tensor(target)[None], torch.tensor(tokens).reshape(1, n), torch.tensor(draft).reshape(1, n, vocab),
            torch.tensor([n]), torch.tensor(accept_u).reshape(1, n), torch.tensor([sample_u]),
        )
        declared = [torch.tensor(draft).reshape(n, vocab)] + ([None] if point_mass else [])
        for draft_probs in declared:
            tree = verify_tree(
                torch.tensor(target), tokens.tolist(), list(range(-1, n - 1)), draft_probs,
                torch.tensor(accept_u), torch.tensor(sample_u),
            )
            accepted = int(batched.num_accepted[0])
            assert tree.path == list(range(accepted)), (seed, case)
            assert tree.next_token == int(batched.next_tokens[0]), (seed, case)
        seen.add((accepted == 0, accepted == n))
    # both ends occur: a rejection at the first node, and a full chain with its bonus token
    assert {(True, False), (False, True)} <= seen


def _random_tree(rng, n):
    return [int(rng.integers(-1, i)) for i in range(n)]  # -1 (the root) or an earlier node


@pytest.mark.parametrize("seed", range(4))
def test_greedy_tree_fast_path_equals_verify_tree_with_point_masses(seed):
    rng = np.random.default_rng(100 + seed)
    vocab, lengths = 3, set()  # a small vocabulary, so siblings often repeat a token and often match the argmax
    edge_uniforms = [0.0, float(np.nextafter(1.0, 0.0))]
    for case in range(150):
        n = int(rng.integers(0, 10))
        parents, tokens = _random_tree(rng, n), rng.integers(0, vocab, size=n).tolist()
        argmax = rng.integers(0, vocab, size=n + 1).tolist()
        target = torch.tensor(_one_hot(argmax, vocab))
        fast = verify_tree_greedy(argmax, tokens, parents)
        uniforms = [(torch.tensor(rng.random(n)), torch.tensor(rng.random()))]
        for u in edge_uniforms:
            uniforms.append((torch.full((n,), u, dtype=torch.float64), torch.tensor(u, dtype=torch.float64)))
        for accept_u, sample_u in uniforms:
            slow = verify_tree(target, tokens, parents, None, accept_u, sample_u)
            assert (slow.path, slow.next_token) == (fast.path, fast.next_token), (seed, case, parents, tokens, argmax)
        # the fast path is greedy decoding: every accepted node is its parent row's argmax, and none beyond
        row = 0
        for node in fast.path:
            assert parents[node] + 1 == row and tokens[node] == argmax[row]
            row = node + 1
        assert fast.next_token == argmax[row]
        assert all(tokens[child] != argmax[row] for child in tree_children(parents)[row])
        lengths.add(len(fast.path))
    assert {0, 1, 2} <= lengths


@pytest.mark.parametrize("seed", range(2))
def test_point_mass_drafts_may_be_declared_as_none(seed):
    rng = np.random.default_rng(200 + seed)
    vocab = 4
    for case in range(100):
        n = int(rng.integers(0, 9))
        parents = _random_tree(rng, n)
        target = _dist(rng, (n + 1, vocab), peaked=case % 2 == 0)
        tokens = rng.integers(0, vocab, size=n).tolist()
        accept_u, sample_u = torch.tensor(rng.random(n)), torch.tensor(rng.random())
        explicit = verify_tree(torch.tensor(target), tokens, parents, torch.tensor(_one_hot(tokens, vocab)),
                               accept_u, sample_u)
        implicit = verify_tree(torch.tensor(target), tokens, parents, None, accept_u, sample_u)
        assert (explicit.path, explicit.next_token) == (implicit.path, implicit.next_token)


def reference_verify_tree(target_probs, draft_tokens, parents, draft_probs, accept_u, sample_u):
    """Multi-draft recursive rejection written as a plain loop in float64 (numpy), one tree: each child is tested
    against the current target distribution, which after a rejection is the normalized residual."""
    children = [[node for node in range(len(parents)) if parents[node] == row - 1] for row in range(len(parents) + 1)]
    row, path, target = 0, [], target_probs[0]
    while True:
        for node in children[row]:
            x = draft_tokens[node]
            draft = draft_probs[node] if draft_probs is not None else np.eye(len(target))[x]
            if accept_u[node] < target[x] / draft[x]:
                path.append(node)
                row, target = node + 1, target_probs[node + 1]
                break
            residual = np.maximum(target - draft, 0)
            if residual.sum() > 0:
                target = residual / residual.sum()
        else:
            cdf = np.cumsum(target)
            return path, int(min(np.searchsorted(cdf, sample_u * cdf[-1], side="right"), len(target) - 1))


@pytest.mark.parametrize("seed", range(4))
def test_verify_tree_matches_float64_reference(seed):
    rng = np.random.default_rng(300 + seed)
    vocab, lengths = 6, set()
    for case in range(150):
        n = int(rng.integers(0, 9))
        parents = _random_tree(rng, n)
        target = _dist(rng, (n + 1, vocab), peaked=case % 2 == 0)
        if case % 3 == 0:
            tokens, draft = rng.integers(0, vocab, size=n), None  # point-mass drafts
        else:
            draft = _dist(rng, (n, vocab), peaked=case % 4 == 1)
            tokens = np.array([rng.choice(vocab, p=draft[i]) for i in range(n)], dtype=np.int64)
        accept_u, sample_u = rng.random(n), rng.random()
        expected = reference_verify_tree(target, tokens.tolist(), parents, draft, accept_u, sample_u)
        declared = None if draft is None else torch.tensor(draft)
        got = verify_tree(torch.tensor(target), tokens.tolist(), parents, declared, torch.tensor(accept_u),
                          torch.tensor(sample_u))
        assert (got.path, got.next_token) == expected, (seed, case, parents, tokens.tolist(), accept_u, sample_u)
        lengths.add(len(got.path))
    assert {0, 1, 2} <= lengths


def test_a_second_sibling_is_tested_against_the_normalized_residual():
    """Root children 0 (token 0, drawn from q) and 1 (token 1, drawn from q without token 0). After child 0 is
    rejected the target is norm(max(0, p - q)) = [0, 0.75, 0.25], so child 1 is accepted with probability
    min(1, 0.75 / 0.5) = 1: any uniform accepts it. Testing against the unnormalized residual [0, 0.3, 0.1] would
    accept it only when u < 0.6."""
    target = torch.tensor([[0.2, 0.5, 0.3], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.2, 0.7]], dtype=torch.float64)
    draft = torch.tensor([[0.6, 0.2, 0.2], [0.0, 0.5, 0.5]], dtype=torch.float64)
    verdict = verify_tree(target, [0, 1], [-1, -1], draft, torch.tensor([0.5, 0.7], dtype=torch.float64),
                          torch.tensor(0.5, dtype=torch.float64))
    assert (verdict.path, verdict.next_token) == ([1], 2)


# ---- the output distribution ------------------------------------------------------------------------------------
#
# A depth-2 target over 5 tokens: TARGET_ROOT after the root, TARGET_AFTER[a] after the token a, TARGET_AFTER_TWO
# after two tokens (only used as rows; the third token is not checked). The drafter's DRAFT_* tables differ from the
# target's, and include a token the target never emits (4 at the root) and one the drafter never proposes (4 after 2),
# so the residual carries real mass and zero-probability rejections occur.

VOCAB = 5
TARGET_ROOT = np.array([0.4, 0.3, 0.2, 0.1, 0.0])
TARGET_AFTER = np.array([
    [0.1, 0.2, 0.3, 0.25, 0.15],
    [0.5, 0.1, 0.1, 0.1, 0.2],
    [0.05, 0.05, 0.3, 0.3, 0.3],
    [0.2, 0.2, 0.2, 0.2, 0.2],
    [0.6, 0.1, 0.1, 0.1, 0.1],
])
TARGET_AFTER_TWO = _dist(np.random.default_rng(5), (VOCAB, VOCAB, VOCAB))
DRAFT_ROOT = np.array([0.1, 0.15, 0.2, 0.25, 0.3])
DRAFT_AFTER = np.array([
    [0.4, 0.3, 0.1, 0.1, 0.1],
    [0.1, 0.5, 0.2, 0.1, 0.1],
    [0.3, 0.3, 0.2, 0.2, 0.0],
    [0.2, 0.1, 0.4, 0.2, 0.1],
    [0.1, 0.1, 0.1, 0.1, 0.6],
])
# Three first-level nodes (0, 1, 3) with 2, 1 and 2 children; siblings are not contiguous in the block.
PARENTS = [-1, -1, 0, -1, 0, 1, 3, 3]
FIRST_LEVEL = [0, 1, 3]
CHILDREN_OF = {0: [2, 4], 1: [5], 3: [6, 7]}
TRIALS = 30_000


def _sample_rows(probs, u):
    """Inverse-CDF sampling of each row of probs [N, vocab] (need not be normalized) with u [N]."""
    cdf = probs.cumsum(-1)
    return np.minimum((cdf <= (u * cdf[:, -1])[:, None]).sum(-1), probs.shape[-1] - 1)


def _draw_siblings(draft, u, with_replacement):
    """Siblings from draft [N, vocab], one per column of u [N, k]: without replacement, sibling j is drawn from draft
    with the earlier siblings' tokens removed and renormalized. Returns tokens [N, k] and the distribution each
    token was drawn from [N, k, vocab]."""
    remaining, tokens, declared = draft.copy(), [], []
    rows = np.arange(len(draft))
    for j in range(u.shape[1]):
        declared.append(remaining / remaining.sum(-1, keepdims=True))
        tokens.append(_sample_rows(declared[-1], u[:, j]))
        if not with_replacement:
            remaining[rows, tokens[-1]] = 0.0
    return np.stack(tokens, 1), np.stack(declared, 1)


def _draft_trees(rng, trials, with_replacement):
    """Trees of shape PARENTS drawn from the drafter, with each node's target row: tokens [N, n] and target_probs
    [N, n + 1, vocab] and draft_probs [N, n, vocab]."""
    n = len(PARENTS)
    tokens = np.zeros((trials, n), dtype=np.int64)
    draft_probs = np.zeros((trials, n, VOCAB))
    target_probs = np.zeros((trials, n + 1, VOCAB))
    target_probs[:, 0] = TARGET_ROOT
    first, declared = _draw_siblings(np.tile(DRAFT_ROOT, (trials, 1)), rng.random((trials, 3)), with_replacement)
    tokens[:, FIRST_LEVEL], draft_probs[:, FIRST_LEVEL] = first, declared
    for node in FIRST_LEVEL:
        a = tokens[:, node]
        target_probs[:, node + 1] = TARGET_AFTER[a]
        kids = CHILDREN_OF[node]
        second, declared = _draw_siblings(DRAFT_AFTER[a], rng.random((trials, len(kids))), with_replacement)
        tokens[:, kids], draft_probs[:, kids] = second, declared
        for j, kid in enumerate(kids):
            target_probs[:, kid + 1] = TARGET_AFTER_TWO[a, second[:, j]]
    return tokens, target_probs, draft_probs


def _first_two_tokens(verifier, seed, trials=TRIALS, with_replacement=False, declare_undrawn=False):
    """Runs `verifier` on `trials` drafted trees and returns the first two emitted tokens of each [N, 2] and the
    path lengths [N]. When the path is shorter than two, the token after next_token is what the target would sample
    next, so the test draws it from the known table (TARGET_AFTER)."""
    rng = np.random.default_rng(seed)
    tokens, target_probs, draft_probs = _draft_trees(rng, trials, with_replacement)
    if declare_undrawn:
        # declare the undrawn-from q for every sibling, although later siblings came from q without the earlier ones
        draft_probs[:, FIRST_LEVEL] = DRAFT_ROOT
    accept_u, sample_u = torch.tensor(rng.random((trials, len(PARENTS)))), torch.tensor(rng.random(trials))
    target_t, draft_t, token_lists = torch.tensor(target_probs), torch.tensor(draft_probs), tokens.tolist()
    emitted, lengths = np.zeros((trials, 2), dtype=np.int64), np.zeros(trials, dtype=np.int64)
    for t in range(trials):
        verdict = verifier(target_t[t], token_lists[t], PARENTS, draft_t[t], accept_u[t], sample_u[t])
        out = [token_lists[t][node] for node in verdict.path[:2]] + [verdict.next_token]
        emitted[t, : min(len(out), 2)] = out[:2]
        lengths[t] = len(verdict.path)
    short = lengths == 0
    emitted[short, 1] = _sample_rows(TARGET_AFTER[emitted[short, 0]], rng.random(short.sum()))
    return emitted, lengths


def _chi_square_pvalue(emitted):
    """Chi-square of the first two tokens' joint counts against the target's joint TARGET_ROOT[a] * TARGET_AFTER[a, b].
    Cells of zero target mass must be empty; the test runs on the others."""
    counts = np.bincount(emitted[:, 0] * VOCAB + emitted[:, 1], minlength=VOCAB * VOCAB)
    expected = (TARGET_ROOT[:, None] * TARGET_AFTER).reshape(-1) * len(emitted)
    possible = expected > 0
    if counts[~possible].any():
        return 0.0
    return stats.chisquare(counts[possible], expected[possible]).pvalue


# The bound: the joint of the first two tokens has 20 cells of nonzero mass (19 degrees of freedom), so a correct
# verifier gives a p-value below 1e-4 with probability 1e-4; the seed is fixed, so the test is deterministic. The
# negative controls below show the same check rejects plausible wrong verifiers by a wide margin.
PVALUE_BOUND = 1e-4


@pytest.mark.parametrize("with_replacement", [False, True], ids=["siblings_without_replacement", "iid_siblings"])
def test_tree_output_follows_the_target_distribution(with_replacement):
    emitted, lengths = _first_two_tokens(verify_tree, seed=2024 + with_replacement, with_replacement=with_replacement)
    # the trials exercise every case: rejection at the root, acceptance at one and at two levels
    assert np.bincount(lengths, minlength=3)[:3].min() > TRIALS // 20
    assert _chi_square_pvalue(emitted) > PVALUE_BOUND


def _accept_every_first_child(target_probs, draft_tokens, parents, draft_probs, accept_uniforms, sample_uniform):
    """A deliberately wrong verifier: it follows the first child of each node without a test."""
    children, row, path = tree_children(parents), 0, []
    while children[row]:
        path.append(children[row][0])
        row = path[-1] + 1
    return TreeVerdict(path, int(sample(target_probs[row], sample_uniform)))


def test_the_distribution_check_rejects_a_verifier_that_accepts_every_first_child():
    emitted, _ = _first_two_tokens(_accept_every_first_child, seed=7, trials=5_000)
    assert _chi_square_pvalue(emitted) < PVALUE_BOUND


def test_the_distribution_check_rejects_siblings_declared_with_the_undrawn_from_distribution():
    """Siblings drawn without replacement but declared as drawn from the drafter's full distribution: the residual
    after a rejection is then wrong, and the check must see it."""
    emitted, _ = _first_two_tokens(verify_tree, seed=11, declare_undrawn=True)
    assert _chi_square_pvalue(emitted) < PVALUE_BOUND
