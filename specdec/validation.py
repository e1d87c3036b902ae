"""Checks on a session's inputs, shared by the router (first line) and the verifier (which trusts no caller).

Every failure is an InvalidInput whose message says what to change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from specdec.errors import InvalidInput

DEFAULT_MAX_NEW_TOKENS_LIMIT = 4096


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, limit: int) -> None:
    if max_new_tokens == 0:
        raise InvalidInput("sampling.max_new_tokens is 0: ask for at least 1 token")
    if max_new_tokens > limit:
        raise InvalidInput(f"sampling.max_new_tokens is {max_new_tokens}, over this server's limit of {limit}")
    if math.isnan(temperature) or temperature < 0:
        raise InvalidInput(f"sampling.temperature is {temperature}: use 0 for greedy or a positive number")
    if math.isinf(temperature):
        raise InvalidInput("sampling.temperature is infinite: use a finite positive number")
    if math.isnan(top_p) or not 0.0 <= top_p <= 1.0:
        raise InvalidInput(f"sampling.top_p is {top_p}: it must lie in [0, 1] (0 means 1.0, no truncation)")


def check_prompt_ids(ids: Sequence[int], vocab_size: int, max_sequence_length: int) -> None:
    if not ids:
        raise InvalidInput("the prompt is empty: send at least one token of input")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise InvalidInput(
            f"{len(bad)} prompt token id(s) outside the vocabulary [0, {vocab_size}), first {bad[0]}"
        )
    if len(ids) >= max_sequence_length:
        raise InvalidInput(
            f"the prompt is {len(ids)} tokens; this server's context is {max_sequence_length} tokens "
            f"(prompt plus at least one generated token): shorten the prompt"
        )
