"""Drafter artifacts: the shipped drafter loads against the default target, a foreign one is refused, and a tiny
CPU training run writes an artifact that loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from specdec import cli, drafter_model, models
from specdec.engine import LlamaEngine, Row

SHIPPED = Path(__file__).resolve().parent.parent / "drafters" / models.DEFAULT_TARGET
SHIPPED_FEATURE = SHIPPED.parent / f"{models.DEFAULT_TARGET}-feature"
SHIPPED_FUSED = SHIPPED.parent / f"{models.DEFAULT_TARGET}-fused"


@pytest.mark.parametrize("artifact", [SHIPPED, SHIPPED_FEATURE, SHIPPED_FUSED], ids=["token", "feature", "fused"])
def test_shipped_drafters_are_artifacts_within_size_budget(artifact):
    assert drafter_model.is_drafter_artifact(artifact)
    assert (artifact / drafter_model.WEIGHTS_FILE).stat().st_size <= 30 * 1024 * 1024
    assert drafter_model.read_config(artifact)["target"] == models.DEFAULT_TARGET


def test_the_default_drafter_is_the_shipped_fused_drafter():
    from specdec.feature_drafter import is_feature_drafter, load_feature_drafter

    path, target = models.resolve_drafter(models.DEFAULT_DRAFTER)
    assert Path(path).resolve() == SHIPPED_FUSED.resolve() and target == models.DEFAULT_TARGET
    assert is_feature_drafter(path) and load_feature_drafter(path, target).taps == [2, 15, 29]
    path, _ = models.resolve_drafter(models.FEATURE_DRAFTER)
    assert Path(path).resolve() == SHIPPED_FEATURE.resolve()


@pytest.mark.parametrize("artifact", [SHIPPED_FEATURE, SHIPPED_FUSED], ids=["feature", "fused"])
def test_shipped_feature_drafters_load_and_draft_from_the_targets_hidden_states(engine, artifact):
    from specdec.feature_drafter import FeatureRunner, load_feature_drafter

    model = load_feature_drafter(artifact, models.DEFAULT_TARGET)
    runner = FeatureRunner(model, "cpu", torch.float32, 1, 64)
    tokens = [1, 504, 3458, 314, 253, 2, 1, 9690, 198]
    _, _, hidden = engine.forward_flat(engine.new_cache(1, 64), [Row(0, 0, tokens[:-1])], hidden=model.taps or True)
    assert hidden.shape == (len(tokens) - 1, model.feature_width)
    logits, predicted = runner.step([Row(0, 0, tokens[1:])], [hidden])
    assert logits.shape == (1, model.draft_vocab.shape[0]) and torch.isfinite(logits).all()
    # the features matter: the same tokens with the hidden states zeroed draft from different logits
    runner_zero = FeatureRunner(model, "cpu", torch.float32, 1, 64)
    zeroed, _ = runner_zero.step([Row(0, 0, tokens[1:])], [torch.zeros_like(hidden)])
    assert (logits - zeroed).abs().max() > 1.0
    if model.taps:  # and a fused drafter reads the inner layers too, not the last alone
        inner_zeroed = hidden.clone()
        inner_zeroed[:, : -model.config.hidden_size] = 0
        runner_inner = FeatureRunner(model, "cpu", torch.float32, 1, 64)
        assert (logits - runner_inner.step([Row(0, 0, tokens[1:])], [inner_zeroed])[0]).abs().max() > 0.1


def test_plain_model_directory_is_not_a_drafter_artifact(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not drafter_model.is_drafter_artifact(tmp_path)
    assert not drafter_model.is_drafter_artifact(tmp_path / "missing")


def test_shipped_drafter_loads_and_runs_on_the_engine():
    model = drafter_model.load_drafter(SHIPPED, models.DEFAULT_TARGET)
    draft_vocab = model.draft_vocab  # [draft_vocab_size] full-vocabulary ids
    assert model.lm_head.weight.shape[0] == draft_vocab.shape[0]
    assert model.model.embed_tokens.weight.shape[0] == model.config.vocab_size
    tokens = [1, 504, 3458, 314, 253, 2]
    with torch.no_grad():
        reference = model(torch.tensor([tokens])).logits[0]  # [len(tokens), draft_vocab_size]
    engine = LlamaEngine(model)
    logits = engine.forward(engine.new_cache(1, 16), [Row(0, 0, tokens, all_logits=True)])[0]
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_drafter_for_another_target_is_refused(tmp_path):
    foreign = tmp_path / "foreign"
    shutil.copytree(SHIPPED, foreign)
    config = json.loads((foreign / "config.json").read_text())
    config["target_hash"] = "0" * 64  # what a drafter trained against different embeddings carries
    (foreign / "config.json").write_text(json.dumps(config))
    with pytest.raises(drafter_model.DrafterMismatch, match="trained for target"):
        drafter_model.load_drafter(foreign, models.DEFAULT_TARGET)


def test_feature_drafter_for_another_target_is_refused(tmp_path):
    from specdec.feature_drafter import load_feature_drafter

    foreign = tmp_path / "foreign"
    shutil.copytree(SHIPPED_FEATURE, foreign)
    config = json.loads((foreign / "config.json").read_text())
    config["target_hash"] = "f" * 64
    (foreign / "config.json").write_text(json.dumps(config))
    with pytest.raises(drafter_model.DrafterMismatch, match="trained for target"):
        load_feature_drafter(foreign, models.DEFAULT_TARGET)


def test_draft_ids_and_probs_map_back_to_the_full_vocabulary():
    draft_vocab = torch.tensor([3, 7, 11])
    draft_probs = torch.tensor([[0.2, 0.5, 0.3]])  # [1, draft_vocab_size]
    full = drafter_model.to_target_probs(draft_probs, draft_vocab, vocab_size=12)  # [1, 12]
    assert full.shape == (1, 12)
    assert full[0, [3, 7, 11]].tolist() == pytest.approx([0.2, 0.5, 0.3])
    assert full.sum().item() == pytest.approx(1.0)
    assert drafter_model.to_target_ids(torch.tensor([2, 0]), draft_vocab).tolist() == [11, 3]
    assert drafter_model.to_target_ids(torch.tensor([5]), None).tolist() == [5]


def test_tiny_cpu_training_run_writes_an_artifact_that_loads(tmp_path):
    out = tmp_path / "drafter"
    code = cli.main(
        [
            "train-drafter", "--out", str(out), "--layers", "1,feature2", "--steps", "2", "--batch-size", "2",
            "--data-prompts", "4", "--gen-tokens", "4", "--gen-batch-size", "4", "--draft-vocab", "256",
            "--max-len", "48", "--warmup", "1", "--device", "cpu", "--gen-devices", "cpu,cpu",
        ]
    )
    assert code == 0
    from specdec.feature_drafter import load_feature_drafter

    layers, feature = out / "L1", out / "feature2"  # two kinds trained side by side on the same batches
    for artifact in (layers, feature):
        config = drafter_model.read_config(artifact)
        assert config["training"]["steps"] == 2 and config["training"]["final"]
    model = drafter_model.load_drafter(layers, models.DEFAULT_TARGET)
    assert model.config.num_hidden_layers == 1
    assert model.draft_vocab.shape == (256,)
    drafter = load_feature_drafter(feature, models.DEFAULT_TARGET)
    assert drafter.draft_vocab.shape == (256,) and drafter_model.read_config(feature)["kind"] == "feature"
    assert len(drafter.lm.model.layers) == 2
    # two generating processes (--gen-devices cpu,cpu) wrote the data: 2 prompts each
    assert len(torch.load(out / "train-state" / "data.pt")) == 4
    # a checkpoint to resume from was written beside the artifact's training state
    assert (out / "train-state" / "checkpoint.pt").is_file()


def test_fused_drafter_trains_from_a_feature_drafter_and_starts_as_it(tmp_path):
    """`--layers feature,fused --init-from DIR`: both start from the artifact's weights; the fused drafter reads
    three target layers and starts out passing the last one's state through, so before any step it drafts exactly
    what the artifact does; after training it loads with its taps."""
    from specdec.feature_drafter import load_feature_drafter
    from specdec.train_drafter import fuse_layers

    base = "drafters/smollm2-135m-instruct-feature"
    common = ["--data-prompts", "2", "--gen-tokens", "4", "--gen-batch-size", "2", "--draft-vocab", "256",
              "--batch-size", "2", "--max-len", "48", "--warmup", "1", "--device", "cpu", "--init-from", base,
              "--layers", "feature,fused"]
    assert cli.main(["train-drafter", "--out", str(tmp_path / "s0"), "--steps", "0", *common]) == 0
    shipped = load_feature_drafter(base, models.DEFAULT_TARGET)
    taps = fuse_layers("auto", 30)
    assert taps == [2, 15, 29]
    fused = load_feature_drafter(tmp_path / "s0" / "fused", models.DEFAULT_TARGET)
    assert fused.taps == taps and drafter_model.read_config(tmp_path / "s0" / "fused")["taps"] == taps
    ids, feats = torch.randint(0, 49152, (1, 12)), torch.randn(1, 12, 3 * 576) * 3
    with torch.no_grad():
        expected = shipped.unrolled(ids, feats[..., -576:], 2)
        for a, b in zip(fused.unrolled(ids, feats, 2), expected):
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    assert cli.main(["train-drafter", "--out", str(tmp_path / "s2"), "--steps", "2", *common]) == 0
    trained = load_feature_drafter(tmp_path / "s2" / "fused", models.DEFAULT_TARGET)
    assert not torch.equal(trained.fuse.weight, fused.fuse.weight)  # it trained
    # a fused artifact starts a fused drafter with its own fuse; a last-layer drafter cannot start from it
    again = ["--init-from", str(tmp_path / "s2" / "fused"), "--steps", "0"]
    assert cli.main(["train-drafter", "--out", str(tmp_path / "s3"), *common, *again, "--layers", "fused"]) == 0
    restarted = load_feature_drafter(tmp_path / "s3", models.DEFAULT_TARGET)
    assert torch.equal(restarted.fuse.weight, trained.fuse.weight)
    with pytest.raises(SystemExit, match="reads"):
        cli.main(["train-drafter", "--out", str(tmp_path / "s4"), *common, *again, "--layers", "feature"])
    with pytest.raises(SystemExit, match="last"):
        fuse_layers("2,15", 30)
