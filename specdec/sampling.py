"""The target's distribution p for a request: temperature, top-k and top-p applied to logits.

Greedy (temperature 0) is the point mass on the argmax, so greedy and sampled verification are one code path.
This module does not own verification (specdec.verification) or randomness (callers pass uniforms).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1.0 = off
    top_k: int = 0  # 0 = off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def output_depends_on_drafts(temperature: float, seeded: bool) -> bool:
    """Whether drafting decisions may change a session's output: a seeded sampled session's tokens depend on which
    random draws verification makes, and those depend on its blocks. Its output must be the same whatever the
    load, so load-based choices (attaching a drafter, limiting drafts) leave it alone; greedy output never depends
    on drafts, and unseeded sampling has no fixed output to keep."""
    return temperature > 0 and seeded


def probs_from_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """logits [..., vocab] -> probabilities [..., vocab] of the same dtype as logits."""
    if config.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    scaled = logits / config.temperature
    if config.top_k and config.top_k < scaled.shape[-1]:
        kth = scaled.topk(config.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= config.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [..., vocab] (need not be normalized), uniforms [...] in [0, 1) -> ids [...]."""
    cdf = probs.cumsum(-1)
    threshold = (uniforms * cdf[..., -1]).unsqueeze(-1)
    # the first id whose cumulative mass exceeds the threshold; ids of zero mass can never be picked
    ids = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)
    return ids.clamp_(max=probs.shape[-1] - 1)


def draft_picks(logits: torch.Tensor, temperatures: torch.Tensor, uniforms: torch.Tensor, top_n: int):
    """A drafter's picks for a batch of rows, on the logits' device. Greedy rows (temperature 0) take the argmax;
    sampled rows draw once (inverse CDF with `uniforms`) from their tempered distribution truncated to its top_n
    tokens and renormalized in float32: exactly the values the drafter declares (float32 on the wire), so the q
    the verifier is told is the q the draw came from.

    logits [batch, vocab]; temperatures [batch] (0 = greedy); uniforms [batch] in [0, 1). Returns picks [batch]
    (indices into the last dimension of logits), and the declared distributions' indices [batch, top_n] and
    probabilities [batch, top_n] float32 (meaningless on greedy rows)."""
    temps = temperatures.to(logits.device, torch.float64)
    scaled = logits.double() / torch.where(temps > 0, temps, 1.0)[:, None]
    top = scaled.topk(min(top_n, logits.shape[-1]), dim=-1)
    probs = top.values.softmax(-1).float()
    probs = probs / probs.sum(-1, keepdim=True)
    drawn = top.indices.gather(-1, sample(probs.double(), uniforms.to(logits.device, torch.float64))[:, None])[:, 0]
    return torch.where(temps > 0, drawn, logits.argmax(-1)), top.indices, probs


def draw_without_replacement(probs: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """m draws without replacement per row, in order: the first from probs, each next from probs with the tokens
    already drawn removed and renormalized (a draft tree's siblings, which specdec.verification.verify_tree tests
    one after another). probs [rows, n] (float64; need not be normalized), uniforms [rows, m] in [0, 1). Returns
    the picks [rows, m] (indices into the last dimension) and, for each, the normalized distribution it was drawn
    from [rows, m, n]: what the drafter declares for that sibling. A row with fewer than m tokens of positive
    mass repeats its last pick (its declared mass there is then 0: the caller drops such picks)."""
    remaining = probs.clone()
    picks, declared = [], []
    for j in range(uniforms.shape[1]):
        total = remaining.sum(-1, keepdim=True)
        normalized = torch.where(total > 0, remaining / total.clamp(min=torch.finfo(remaining.dtype).tiny), 0.0)
        # drawn from what is declared: float32 on the wire, renormalized by the verifier
        normalized = normalized.float().double()
        normalized = normalized / normalized.sum(-1, keepdim=True).clamp(min=torch.finfo(normalized.dtype).tiny)
        pick = sample(normalized, uniforms[:, j])
        picks.append(pick)
        declared.append(normalized)
        remaining = remaining.scatter(-1, pick[:, None], 0.0)
    return torch.stack(picks, dim=1), torch.stack(declared, dim=1)
