"""One session on the verifier: its committed tokens, KV slot, sampling settings and random stream.

Knows nothing about gRPC or scheduling; `commit` decides EOS and length.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from specdec.sampling import SamplingConfig

# FinishReason values of specdec.v1 (kept as ints so this module needs no generated code)
FINISH_NONE, FINISH_LENGTH, FINISH_STOP, FINISH_EOS = 0, 1, 2, 3


@dataclass
class Stats:
    cached_prompt_tokens: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    verify_steps: int = 0
    drafted_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)

    def record_block(self, drafted: int, accepted: int, depth: int | None = None) -> None:
        """depth: a draft tree's depth (its positions), where `drafted` counts its tokens; None for a chain."""
        self.draft_tokens += drafted
        self.accepted_draft_tokens += accepted
        self.verify_steps += 1
        for counts, n in ((self.drafted_by_position, drafted if depth is None else depth),
                          (self.accepted_by_position, accepted)):
            counts.extend([0] * (n - len(counts)))
            for i in range(n):
                counts[i] += 1


@dataclass
class SessionSettings:
    session_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    seed: int | None = None
    return_features: bool = False  # send the target's hidden states with each verdict (feature-level drafters)
    # with return_features: the target layers whose outputs the features carry side by side, increasing, the last
    # layer last (a fused drafter's); () = the last layer only
    feature_layers: tuple[int, ...] = ()


@dataclass
class Session:
    settings: SessionSettings
    slot: int
    max_length: int  # prompt plus generated tokens this session may reach (context and max_new_tokens)
    eos_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)  # prompt + committed
    finish: int = FINISH_NONE
    stats: Stats = field(default_factory=Stats)
    generator: torch.Generator = field(default_factory=torch.Generator)
    # with settings.return_features: the hidden states sent so far (float16, host; its feature_layers' side by side),
    # kept for the prefix cache
    features: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self):
        self.tokens = list(self.settings.prompt_ids)
        seed = self.settings.seed if self.settings.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)

    @property
    def id(self) -> str:
        return self.settings.session_id

    @property
    def prompt_length(self) -> int:
        return len(self.settings.prompt_ids)

    @property
    def kv_length(self) -> int:
        """Tokens whose KV is valid: all committed but the last, which is the next step's input."""
        return len(self.tokens) - 1

    @property
    def draft_room(self) -> int:
        """Most draft tokens worth verifying: beyond this the step would pass max_length anyway."""
        return max(0, self.max_length - len(self.tokens) - 1)

    def uniforms(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-session randomness, drawn in a fixed order so the same seed replays the same output."""
        accept = torch.rand(n, generator=self.generator, dtype=torch.float64)
        sample = torch.rand(1, generator=self.generator, dtype=torch.float64)
        return accept, sample

    def commit(self, new_tokens: list[int]) -> list[int]:
        """Appends tokens up to EOS or max_length; returns those that reach the client (EOS is not sent)."""
        out = []
        for token in new_tokens:
            if token in self.eos_ids:
                self.tokens.append(token)
                self.finish = FINISH_EOS
                break
            self.tokens.append(token)
            out.append(token)
            if len(self.tokens) >= self.max_length:
                self.finish = FINISH_LENGTH
                break
        return out
