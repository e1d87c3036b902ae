"""Trained drafter artifacts: the file format, the target check and the loader.

A drafter trained by `specdec train-drafter` is a small Llama-style model that borrows its target's frozen token
embeddings and LM head, so its artifact holds only what it owns. An artifact is a directory with:

- `config.json`: `format` (ARTIFACT_FORMAT), `kind` ("layers", the default when absent, or "feature": a
  specdec.feature_drafter that reads the target's hidden states), `target` (the target's SPEC name, for people), `target_hash` (see
  `target_hash`), `llama` (the drafter's own Llama config: hidden size, heads, its `num_hidden_layers`, ...),
  `draft_vocab` (null, or the sorted full-vocabulary ids of the reduced draft head) and `training` (how it was
  made: command, data, steps; informational).
- `model.safetensors`: the drafter's decoder layers and final norm (`model.layers.*`, `model.norm.weight`), fp16.

Reduced draft head (FR-Spec, EAGLE-3). For a small target the shared LM head is most of a drafter's cost, so a
drafter may score only `draft_vocab` (the ids the target says most often). Its logits are then
[n, len(draft_vocab)]; draft id j means full-vocabulary id `draft_vocab[j]`. The drafter service maps ids back
with `to_target_ids` and declares `draft_probs` over the full vocabulary with `to_target_probs` (zero mass outside
`draft_vocab`). Verification is lossless for any declared draft distribution, so this costs acceptance only where
the target says a token outside `draft_vocab`, never correctness.

`load_drafter` returns a transformers LlamaForCausalLM (what `specdec.engine.LlamaEngine` and transformers'
assisted generation take) and refuses, with DrafterMismatch, a target whose embeddings or LM head differ from those
the drafter was trained against. This module does not own training (specdec.train_drafter), evaluation
(specdec.eval_drafter) or running a drafter (specdec.engine).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from specdec import models

ARTIFACT_FORMAT = "specdec-drafter/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_EMBED_KEY = "model.embed_tokens.weight"
_LM_HEAD_KEY = "lm_head.weight"
# config keys that describe a checkpoint, not the drafter's shape
CHECKPOINT_ONLY_KEYS = (
    "architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "_model_name_or_path",
    "quantization_config",
)


class DrafterMismatch(ValueError):
    """A drafter artifact that does not belong to the target it is being loaded against."""


def is_drafter_artifact(path) -> bool:
    """True for a directory written by `save_drafter` (a plain Hugging Face model directory is not one)."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == ARTIFACT_FORMAT
    except (OSError, ValueError):
        return False


def _safetensors_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for single-file and sharded checkpoints."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    from safetensors import safe_open

    single = directory / "model.safetensors"
    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}


def target_head_weights(target_spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's token embeddings and LM head, [vocab, hidden] each, read alone (not the whole model)."""
    from safetensors import safe_open

    directory = models.local_directory(models.resolve(target_spec))
    files = _safetensors_files(directory)

    def read(name: str) -> torch.Tensor:
        with safe_open(files[name], "pt") as f:
            return f.get_tensor(name)

    embed = read(_EMBED_KEY)
    # Tied embeddings (SmolLM2, Qwen small models) store no lm_head: the head is the embedding matrix.
    lm_head = read(_LM_HEAD_KEY) if _LM_HEAD_KEY in files else embed
    return embed, lm_head


def target_hash(embed: torch.Tensor, lm_head: torch.Tensor) -> str:
    """sha256 over the target's embeddings and LM head as float32: the part of the target a drafter is bound to.

    Cheap (two matrices, not the whole model) and deterministic: the bytes of the same weights are the same on
    every machine, whatever dtype the target is later run in.
    """
    digest = hashlib.sha256()
    for tensor in (embed, lm_head):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def feature_layers(spec: str | None) -> list[int] | None:
    """The target layers whose hidden states a drafter SPEC reads (a fused drafter's `taps`: what a verifier can
    capture graphs for before serving), or None (no drafter, ngram, a token drafter, a feature drafter of the last
    layer only, or a SPEC that is no artifact here)."""
    if not spec or spec == "ngram":
        return None
    try:
        path, _ = models.resolve_drafter(spec)
    except models.ModelNotFound:  # (an alias whose files are missing: make_drafter says so)
        return None
    if not is_drafter_artifact(path):
        return None
    taps = read_config(path).get("taps")
    return [int(i) for i in taps] if taps else None


def read_config(artifact_dir) -> dict:
    if not is_drafter_artifact(artifact_dir):
        raise models.ModelNotFound(
            f"{artifact_dir!s} is not a drafter artifact (no {CONFIG_FILE} of format {ARTIFACT_FORMAT})"
        )
    return json.loads((Path(artifact_dir) / CONFIG_FILE).read_text())


def save_drafter(
    out_dir,
    model,
    *,
    target: str,
    target_hash_hex: str,
    draft_vocab: list[int] | None,
    training: dict,
    dtype: torch.dtype = torch.float16,
    kind: str = "layers",
    state: dict[str, torch.Tensor] | None = None,
    taps: list[int] | None = None,
) -> Path:
    """Writes the drafter's own weights (layers and final norm, or `state` when given) and its config; the shared
    matrices stay out. kind: "layers" (a LlamaForCausalLM drafter) or "feature" (specdec.feature_drafter)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = {k: v for k, v in model.state_dict().items() if k.startswith("model.layers.") or k == "model.norm.weight"}
    own = {name: tensor.detach().to("cpu", dtype).contiguous() for name, tensor in state.items()}
    llama = model.config.to_dict()
    for key in CHECKPOINT_ONLY_KEYS:
        llama.pop(key, None)
    config = {
        "format": ARTIFACT_FORMAT,
        "kind": kind,
        "target": target,
        "target_hash": target_hash_hex,
        "llama": llama,
        "draft_vocab": draft_vocab,
        "training": training,
    }
    if taps:  # a feature drafter reading several target layers' outputs (specdec.feature_drafter)
        config["taps"] = list(taps)
    partial = out / (WEIGHTS_FILE + ".partial")
    save_file(own, str(partial))
    partial.rename(out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return out


def build_drafter(llama_config: dict, embed: torch.Tensor, lm_head: torch.Tensor, draft_vocab: list[int] | None):
    """A LlamaForCausalLM with the given config, the target's embeddings, and its LM head (rows `draft_vocab`).

    The layers are left as constructed (random); callers load or initialize them.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**llama_config, "tie_word_embeddings": False, "vocab_size": embed.shape[0]})
    model = LlamaForCausalLM(config)
    head = lm_head if draft_vocab is None else lm_head[torch.tensor(draft_vocab, dtype=torch.long)]
    model.model.embed_tokens.weight = torch.nn.Parameter(embed.detach().float().clone(), requires_grad=False)
    model.lm_head = torch.nn.Linear(config.hidden_size, head.shape[0], bias=False)
    model.lm_head.weight = torch.nn.Parameter(head.detach().float().clone(), requires_grad=False)
    # `draft_vocab` rides on the model so whoever runs it (engine, service) can map draft ids back.
    model.draft_vocab = None if draft_vocab is None else torch.tensor(draft_vocab, dtype=torch.long)
    return model


def checked_artifact(artifact_dir, target_spec: str):
    """(config, target embeddings, target LM head, the artifact's own tensors) after checking that `target_spec` is
    the target the drafter was trained against (DrafterMismatch otherwise)."""
    from safetensors.torch import load_file

    config = read_config(artifact_dir)
    embed, lm_head = target_head_weights(target_spec)
    found = target_hash(embed, lm_head)
    if found != config["target_hash"]:
        raise DrafterMismatch(
            f"drafter {str(artifact_dir)!r} was trained for target {config['target']!r} (hash "
            f"{config['target_hash'][:12]}), but {target_spec!r} has hash {found[:12]}: train one for this target "
            "with `specdec train-drafter`"
        )
    return config, embed, lm_head, load_file(str(Path(artifact_dir) / WEIGHTS_FILE))


def load_own_weights(model, own: dict[str, torch.Tensor], artifact_dir) -> None:
    """Loads an artifact's layers and norm into a model from `build_drafter`; DrafterMismatch if they do not fit."""
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in own.items()}, strict=False)
    missing = [k for k in missing if k not in (_EMBED_KEY, _LM_HEAD_KEY)]
    if missing or unexpected:
        raise DrafterMismatch(
            f"drafter {str(artifact_dir)!r}: weights do not fit its config: missing {missing}, unexpected {unexpected}"
        )


def load_drafter(artifact_dir, target_spec: str, device="cpu", dtype=torch.float32):
    """The drafter of `artifact_dir` as a LlamaForCausalLM on `device`, with `target_spec`'s frozen embeddings.

    Raises DrafterMismatch when `target_spec`'s embeddings or LM head are not the ones the drafter was trained
    against. The returned model has `draft_vocab`: None (full vocabulary) or a long tensor [draft_vocab_size] of
    full-vocabulary ids, one per logit. Feature drafters (`kind: "feature"`) load with
    specdec.feature_drafter.load_feature_drafter instead.
    """
    config, embed, lm_head, own = checked_artifact(artifact_dir, target_spec)
    if config.get("kind", "layers") != "layers":
        raise DrafterMismatch(f"drafter {str(artifact_dir)!r} is of kind {config['kind']!r}, not a layer drafter")
    model = build_drafter(config["llama"], embed, lm_head, config["draft_vocab"])
    load_own_weights(model, own, artifact_dir)
    return model.to(device=device, dtype=dtype).eval()


def to_target_ids(draft_ids: torch.Tensor, draft_vocab: torch.Tensor | None) -> torch.Tensor:
    """Draft-head ids [...] -> full-vocabulary ids [...]."""
    return draft_ids if draft_vocab is None else draft_vocab.to(draft_ids.device)[draft_ids]


def to_target_probs(draft_probs: torch.Tensor, draft_vocab: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Draft-head probabilities [..., draft_vocab_size] -> full-vocabulary probabilities [..., vocab_size]."""
    if draft_vocab is None:
        return draft_probs
    full = draft_probs.new_zeros(*draft_probs.shape[:-1], vocab_size)
    return full.index_copy_(-1, draft_vocab.to(draft_probs.device), draft_probs)
