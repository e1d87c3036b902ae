"""Shared fixtures: the real default target (loaded once), free ports, and real server processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from specdec import launch
from specdec.launch import free_port, wait_serving  # noqa: F401  (tests import them from here)

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SPECDEC_CACHE_DIR", str(ROOT / ".cache"))
# Verifiers advise chains in the suite: the measured advice (verifier_service.tree_advice) depends on the machine's
# speed, and a test's assertions must not; tests of trees ask for them by name, tests of the advice set it.
os.environ["SPECDEC_ADVISE_DRAFT_TREE"] = "off"
PROMPTS = ROOT / "bench" / "prompts" / "chat.jsonl"  # a copy of ../shared/prompts/chat.jsonl (measurement only)


class ServerProcess(launch.ServerProcess):
    """A tier in its own process, its log under .cache/ for when a test fails."""

    def __init__(self, role: str, *args: str, port: int | None = None):
        port = port or free_port()
        logs = ROOT / ".cache"
        logs.mkdir(exist_ok=True)
        super().__init__(role, *args, port=port, log=logs / f"test-{role}-{port}.log")


@pytest.fixture(scope="session")
def hf_target():
    from specdec import models

    return models.load_hf_model(models.DEFAULT_TARGET)


@pytest.fixture(scope="session")
def engine(hf_target):
    """The Llama engine over the real target (fp32, CPU)."""
    from specdec.engine import LlamaEngine

    return LlamaEngine(hf_target)


@pytest.fixture(scope="session")
def eos(hf_target):
    from verifier_service.app import eos_ids_of

    return eos_ids_of(hf_target)


@pytest.fixture(scope="session")
def tokenizer():
    from specdec import models

    return models.load_tokenizer(models.DEFAULT_TARGET)


@pytest.fixture(scope="session")
def chat_prompts():
    import json

    return [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
