"""Environment settings read in more than one place (the engines, the launcher, the command line), parsed here once
and free of torch, so the launcher and the command line import them without loading a model stack.

SPECDEC_COMPILE (yes|no): torch.compile the graphed passes on CUDA. SPECDEC_DTYPE (auto, float32, bfloat16 or
float16): the engines' number format; auto is bfloat16 on CUDA and float32 on a CPU.
"""

from __future__ import annotations

import os

YES = ("1", "yes", "true", "on")
NO = ("0", "no", "false", "off")
DTYPES = ("float32", "bfloat16", "float16")


def yes_no(value: str) -> bool:
    """'yes' / 'no' and their usual spellings; ValueError for anything else."""
    word = value.strip().lower()
    if word in YES:
        return True
    if word in NO:
        return False
    raise ValueError(f"expected yes or no, got {value!r}")


def compiling() -> bool:
    """SPECDEC_COMPILE: whether engines torch.compile their graphed passes (unset: no)."""
    return os.environ.get("SPECDEC_COMPILE", "no").strip().lower() in YES


def dtype_name(device: str) -> str:
    """The engines' dtype for `device`: SPECDEC_DTYPE when it names one, else bfloat16 on CUDA and float32 on a CPU.

    On a GPU, bfloat16 rounds a verify pass (several tokens a row) and a decode step (one) differently, so greedy
    output with speculation on can part from speculation off's at a near-tie; float32 gives it token for token
    (measured on an H200, docs/benchmarks.md, seventeenth session). Every tier of a deployment should agree: a
    drafter's features and q are read as the target made them."""
    name = os.environ.get("SPECDEC_DTYPE", "").strip().lower()
    if name and name != "auto":
        if name not in DTYPES:
            raise ValueError(f"SPECDEC_DTYPE={name!r}: use auto or one of {', '.join(DTYPES)}")
        return name
    return "bfloat16" if device.startswith("cuda") else "float32"
