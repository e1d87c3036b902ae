"""Lossless verification of draft blocks: a pure function over tensors (no model, socket or cache).

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023). For draft position i (0-based) the drafter
sampled token x_i from its declared distribution draft_probs[i]; the target's distribution there is
target_probs[i]. Draft token i is *accepted* with probability min(1, target(x_i) / draft(x_i)), in order, until
the first rejection. At a rejection the *recovered* token is sampled from norm(max(0, target - draft)) at that
position; if every draft token is accepted the *bonus* token is sampled from target_probs[draft_len]. Either way a
verify step commits accepted + 1 tokens, so it is never worse than plain decoding.

Greedy needs no special case: target_probs is the point mass on the argmax, and a deterministic drafter (greedy
or n-gram) declares the point mass on its token; then acceptance is "equals the argmax" and the recovered token
is the argmax.

Randomness is an argument (uniforms), so a verification can be replayed anywhere. The caller appends the output
and rolls back its KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.sampling import sample


@dataclass
class Verdict:
    num_accepted: torch.Tensor  # [batch] long: accepted draft tokens, 0..draft_len
    next_tokens: torch.Tensor  # [batch] long: the recovered token, or the bonus token when all were accepted


def verify(
    target_probs: torch.Tensor,  # [batch, k + 1, vocab]: row b is valid for positions 0..draft_lens[b]
    draft_tokens: torch.Tensor,  # [batch, k] long, padded past draft_lens[b]
    draft_probs: torch.Tensor,  # [batch, k, vocab]: the distribution each draft token was sampled from
    draft_lens: torch.Tensor,  # [batch] long, 0..k
    accept_uniforms: torch.Tensor,  # [batch, k] in [0, 1)
    sample_uniforms: torch.Tensor,  # [batch] in [0, 1)
) -> Verdict:
    batch, k = draft_tokens.shape
    positions = torch.arange(k, device=draft_tokens.device)
    if k:
        target_at = target_probs[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)  # [batch, k]
        draft_at = draft_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)  # [batch, k]
        # u < p/q  <=>  u * q < p, which avoids dividing by q and accepts nothing where p = 0
        accepted = (accept_uniforms * draft_at < target_at) & (positions < draft_lens[:, None])
        # accepted prefix length = index of the first False (or draft_len when all are True)
        num_accepted = torch.where(accepted, 0, 1).cumsum(-1).eq(0).sum(-1)
    else:
        num_accepted = torch.zeros(batch, dtype=torch.long, device=draft_tokens.device)

    rows = torch.arange(batch, device=draft_tokens.device)
    target_next = target_probs[rows, num_accepted]  # [batch, vocab]
    rejected = num_accepted < draft_lens
    if k:
        draft_next = draft_probs[rows, num_accepted.clamp(max=k - 1)]  # [batch, vocab]
        residual = (target_next - draft_next).clamp_(min=0)
        # If the residual has no mass, p <= q everywhere, so p = q and the rejection had probability 0:
        # fall back to p (only reachable through rounding).
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, target_next)
        next_probs = torch.where(rejected[:, None], residual, target_next)
    else:
        next_probs = target_next
    return Verdict(num_accepted=num_accepted, next_tokens=sample(next_probs, sample_uniforms))


def verify_greedy(
    target_argmax: torch.Tensor,  # [batch, k + 1] long: the target's argmax at each position
    draft_tokens: torch.Tensor,  # [batch, k] long, padded past draft_lens[b]
    draft_lens: torch.Tensor,  # [batch] long, 0..k
) -> Verdict:
    """`verify` for greedy rows with point-mass drafts, without dense distributions: a draft token is accepted
    iff it equals the target's argmax, and the next token is the argmax after the accepted prefix. Identical
    verdicts (tested), at the cost of k + 1 integers per row instead of (2k + 1) * vocab probabilities."""
    batch, k = draft_tokens.shape
    positions = torch.arange(k, device=draft_tokens.device)
    accepted = (draft_tokens == target_argmax[:, :k]) & (positions < draft_lens[:, None])
    num_accepted = torch.where(accepted, 0, 1).cumsum(-1).eq(0).sum(-1) if k else torch.zeros_like(draft_lens)
    rows = torch.arange(batch, device=draft_tokens.device)
    return Verdict(num_accepted=num_accepted, next_tokens=target_argmax[rows, num_accepted])


@dataclass
class TreeVerdict:
    path: list[int]  # the accepted draft nodes from the root down (indices into the block's tokens)
    next_token: int  # the recovered token after the path, or the bonus token when the path ends at a leaf


def tree_depths(parents: list[int]) -> list[int]:
    """Each node's depth (1 = a child of the root), for parents listed before their children."""
    depths: list[int] = []
    for parent in parents:
        depths.append(1 if parent < 0 else depths[parent] + 1)
    return depths


def tree_children(parents: list[int]) -> list[list[int]]:
    """Per row (0 = the root, i + 1 = node i): the nodes whose parent it is, in block order. parents[i] is node i's
    parent, an earlier node's index or -1 for the root (the newest committed token)."""
    children: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, parent in enumerate(parents):
        children[parent + 1].append(i)
    return children


def verify_tree(
    target_probs: torch.Tensor,  # [n + 1, vocab]: row 0 after the root, row i + 1 after node i (path included)
    draft_tokens: list[int],  # [n]
    parents: list[int],  # [n]: -1 (the root) or an earlier node
    draft_probs: torch.Tensor | None,  # [n, vocab]: the distribution node i was drawn from; None = point masses
    accept_uniforms: torch.Tensor,  # [n] in [0, 1): node i's test uses entry i
    sample_uniform: torch.Tensor,  # [] or [1] in [0, 1)
) -> TreeVerdict:
    """Speculative sampling over a draft tree: multi-draft recursive rejection (SpecInfer, Miao et al. 2024; with
    siblings drawn without replacement as in Recursive Speculative Decoding, Jeon et al. 2024). From the root, a
    node's children are tested in block order: child c (token x, declared q_c) is accepted with probability
    min(1, p(x) / q_c(x)); on a rejection p becomes the residual norm(max(0, p - q_c)) and the next sibling is
    tested against it. The first accepted child becomes the node, and the walk goes on with its own target
    distribution; when every child of a node is rejected (or it has none), the next token is drawn from the current
    p. Each step reproduces the single-draft lemma with the current p as target, so the output is distributed
    exactly as the target's for any q_c, provided node c was drawn from q_c given its elder siblings (and the
    siblings kept do not depend on the values drawn: a prefix of the draws). A chain gives `verify`'s verdict with
    the same uniforms (tested); point masses with a greedy p give greedy decoding's tokens."""
    children = tree_children(parents)
    row, path = 0, []
    probs = target_probs[0]
    while True:
        for node in children[row]:
            token = draft_tokens[node]
            declared = draft_probs[node] if draft_probs is not None else _point_mass(probs, token)
            if accept_uniforms[node] * declared[token] < probs[token]:
                path.append(node)
                row = node + 1
                probs = target_probs[row]
                break
            residual = (probs - declared).clamp_(min=0)
            mass = residual.sum()
            # the next sibling is tested against the normalized residual; no mass left means p <= q everywhere, so
            # p = q and this rejection had probability 0: keep p (reachable only through rounding)
            probs = residual / mass if mass > 0 else probs
        else:
            return TreeVerdict(path, int(sample(probs, sample_uniform.reshape(()))))


def verify_tree_greedy(
    target_argmax: list[int],  # [n + 1]: the target's argmax after the root and after each node
    draft_tokens: list[int],  # [n]
    parents: list[int],  # [n]
) -> TreeVerdict:
    """`verify_tree` for a greedy target with point-mass drafts: follow the child equal to the target's argmax
    (the first, if siblings repeat a token) while there is one. Greedy decoding's tokens, on the host."""
    children = tree_children(parents)
    row, path = 0, []
    while True:
        match = next((node for node in children[row] if draft_tokens[node] == target_argmax[row]), None)
        if match is None:
            return TreeVerdict(path, target_argmax[row])
        path.append(match)
        row = match + 1


def _point_mass(like: torch.Tensor, token: int) -> torch.Tensor:
    mass = torch.zeros_like(like)
    mass[token] = 1.0
    return mass
