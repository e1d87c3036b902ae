"""The verification math: float64 reference, the greedy ladder, and the sampled output distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from specdec.sampling import SamplingConfig, probs_from_logits, sample
from specdec.verification import verify


def reference_verify(target_probs, draft_tokens, draft_probs, draft_len, accept_u, sample_u):
    """Leviathan et al. Algorithm 1 written as a plain loop in float64, one row."""
    for i in range(draft_len):
        x = draft_tokens[i]
        ratio = target_probs[i][x] / draft_probs[i][x]
        if not accept_u[i] < ratio:
            residual = np.maximum(target_probs[i] - draft_probs[i], 0)
            if residual.sum() == 0:
                residual = target_probs[i]
            return i, _inverse_cdf(residual, sample_u)
    return draft_len, _inverse_cdf(target_probs[draft_len], sample_u)


def _inverse_cdf(probs, u):
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(probs) - 1))


def _random_case(rng, batch, k, vocab, peaked=False):
    def dist(shape):
        logits = rng.normal(size=shape) * (4 if peaked else 1)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    target = dist((batch, k + 1, vocab))
    draft = dist((batch, k, vocab))
    tokens = np.array([[rng.choice(vocab, p=draft[b, i]) for i in range(k)] for b in range(batch)])
    lens = rng.integers(0, k + 1, size=batch)
    return target, draft, tokens, lens, rng.random((batch, k)), rng.random(batch)


@pytest.mark.parametrize("seed", range(5))
def test_verify_matches_float64_reference(seed):
    rng = np.random.default_rng(seed)
    target, draft, tokens, lens, accept_u, sample_u = _random_case(rng, 16, 5, 7, peaked=seed % 2 == 0)
    verdict = verify(
        torch.tensor(target), torch.tensor(tokens), torch.tensor(draft), torch.tensor(lens),
        torch.tensor(accept_u), torch.tensor(sample_u),
    )
    for b in range(16):
        n, token = reference_verify(target[b], tokens[b], draft[b], lens[b], accept_u[b], sample_u[b])
        assert int(verdict.num_accepted[b]) == n
        assert int(verdict.next_tokens[b]) == token


def _greedy_case(target_logits: torch.Tensor, draft_tokens: list[int]):
    """Greedy verification as the scheduler does it: point masses for the target's argmax and the drafts."""
    k, vocab = len(draft_tokens), target_logits.shape[-1]
    target = probs_from_logits(target_logits, SamplingConfig())[None]
    draft = torch.zeros(1, k, vocab, dtype=target.dtype)
    for i, t in enumerate(draft_tokens):
        draft[0, i, t] = 1.0
    tokens = torch.tensor([draft_tokens], dtype=torch.long).reshape(1, k)
    u = torch.rand(1, k, dtype=torch.float64)
    return verify(target, tokens, draft, torch.tensor([k]), u, torch.rand(1, dtype=torch.float64))


K, VOCAB = 6, 50


@pytest.fixture
def greedy_logits():
    torch.manual_seed(0)
    return torch.randn(K + 1, VOCAB, dtype=torch.float64)


def test_greedy_always_right_drafter_accepts_all_and_adds_bonus(greedy_logits):
    argmax = greedy_logits.argmax(-1).tolist()
    verdict = _greedy_case(greedy_logits, argmax[:K])
    assert int(verdict.num_accepted[0]) == K
    assert int(verdict.next_tokens[0]) == argmax[K]


def test_greedy_always_wrong_drafter_commits_the_targets_token(greedy_logits):
    argmax = greedy_logits.argmax(-1).tolist()
    wrong = [(t + 1) % VOCAB for t in argmax[:K]]
    verdict = _greedy_case(greedy_logits, wrong)
    assert int(verdict.num_accepted[0]) == 0
    assert int(verdict.next_tokens[0]) == argmax[0]


@pytest.mark.parametrize("j", range(K))
def test_greedy_drafter_wrong_at_position_j(greedy_logits, j):
    argmax = greedy_logits.argmax(-1).tolist()
    planted = argmax[:K]
    planted[j] = (planted[j] + 7) % VOCAB
    verdict = _greedy_case(greedy_logits, planted)
    assert int(verdict.num_accepted[0]) == j
    assert int(verdict.next_tokens[0]) == argmax[j]


def test_sampled_output_follows_the_target_distribution():
    """Tiny vocabulary, fixed p and q per position: emitted tokens follow p (chi-square, p-value > 1e-4).

    With 3 degrees of freedom, a correct implementation fails this bound with probability 1e-4 per position; the
    seed is fixed so the test is deterministic. A biased acceptance (e.g. accepting with q/p) moves the first
    position's distribution by > 0.05 in total variation, which at N = 40000 gives p-values below 1e-30.
    """
    rng = np.random.default_rng(1234)
    vocab, k, n = 4, 3, 40_000
    target = np.array([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    draft = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.6, 0.2, 0.1, 0.1]])
    tokens = np.stack([[rng.choice(vocab, p=draft[i]) for i in range(k)] for _ in range(n)])
    verdict = verify(
        torch.tensor(target).expand(n, -1, -1), torch.tensor(tokens), torch.tensor(draft).expand(n, -1, -1),
        torch.full((n,), k), torch.tensor(rng.random((n, k))), torch.tensor(rng.random(n)),
    )
    accepted, nxt = verdict.num_accepted.numpy(), verdict.next_tokens.numpy()
    for position in range(k + 1):
        # the token emitted at `position`, among rows that reached it
        reached = accepted >= position
        emitted = np.where(accepted[reached] > position, tokens[reached][:, min(position, k - 1)], nxt[reached])
        counts = np.bincount(emitted, minlength=vocab)
        result = stats.chisquare(counts, target[position] * counts.sum())
        assert result.pvalue > 1e-4, (position, counts, target[position])


def test_same_uniforms_same_verdict():
    rng = np.random.default_rng(7)
    target, draft, tokens, lens, accept_u, sample_u = (torch.tensor(x) for x in _random_case(rng, 8, 4, 11))
    case = (target, tokens, draft, lens, accept_u, sample_u)
    first, second = verify(*case), verify(*case)
    assert torch.equal(first.num_accepted, second.num_accepted)
    assert torch.equal(first.next_tokens, second.next_tokens)


def test_top_k_and_top_p_truncate_the_target_distribution():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64))
    top_k = probs_from_logits(logits, SamplingConfig(temperature=1.0, top_k=2))
    assert torch.allclose(top_k, torch.tensor([4 / 7, 3 / 7, 0, 0], dtype=torch.float64))
    top_p = probs_from_logits(logits, SamplingConfig(temperature=1.0, top_p=0.75))
    assert torch.allclose(top_p, torch.tensor([4 / 9, 3 / 9, 2 / 9, 0], dtype=torch.float64))
    greedy = probs_from_logits(logits, SamplingConfig())
    assert greedy.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_inverse_cdf_sampling_never_picks_a_zero_probability_token():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5], dtype=torch.float64)
    u = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.9999999], dtype=torch.float64)
    assert sample(probs.expand(5, -1), u).tolist() == [1, 1, 1, 3, 3]


@pytest.mark.parametrize("seed", range(4))
def test_greedy_fast_path_equals_verify_with_point_masses(seed):
    from specdec.verification import verify_greedy

    gen = torch.Generator().manual_seed(seed)
    batch, k, vocab = 32, 5, 9
    logits = torch.randn(batch, k + 1, vocab, generator=gen, dtype=torch.float64)
    argmax = logits.argmax(-1)
    # drafts right with probability ~1/2 per position, so every accepted-prefix length occurs
    guess = torch.where(torch.rand(batch, k, generator=gen) < 0.5, argmax[:, :k], torch.randint(0, vocab, (batch, k), generator=gen))
    lens = torch.randint(0, k + 1, (batch,), generator=gen)
    target = probs_from_logits(logits, SamplingConfig())
    draft = torch.zeros(batch, k, vocab, dtype=torch.float64).scatter_(-1, guess[..., None], 1.0)
    slow = verify(target, guess, draft, lens, torch.rand(batch, k, generator=gen, dtype=torch.float64),
                  torch.rand(batch, generator=gen, dtype=torch.float64))
    fast = verify_greedy(argmax, guess, lens)
    assert torch.equal(slow.num_accepted, fast.num_accepted)
    assert torch.equal(slow.next_tokens, fast.next_tokens)
    assert set(fast.num_accepted.tolist()) >= {0, 1}
