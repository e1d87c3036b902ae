"""Builds a verifier pod: the target model, its engine and scheduler, and the gRPC server around them."""

from __future__ import annotations

import logging

import torch

from specdec import compute, models
from specdec.engine import LlamaEngine
from specdec.proto import verifier_pb2, verifier_pb2_grpc
from specdec.server import GrpcServer
from verifier_service.scheduler import Scheduler
from verifier_service.service import VerifierServicer

log = logging.getLogger(__name__)


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def eos_ids_of(hf_model) -> frozenset[int]:
    ids: set[int] = set()
    for value in (hf_model.config.eos_token_id, getattr(hf_model.generation_config, "eos_token_id", None)):
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return frozenset(ids)


def build_scheduler(model: str, device: str, max_sessions: int, max_sequence_length: int, max_draft_tokens: int):
    hf_model = models.load_hf_model(model)
    engine = LlamaEngine(hf_model, device=device, dtype=default_dtype(device))
    scheduler = Scheduler(engine, eos_ids_of(hf_model), max_sessions, max_sequence_length, max_draft_tokens)
    del hf_model  # the engine holds its own copies of the weights
    return scheduler


async def start_verifier(
    host: str,
    port: int,
    model: str = models.DEFAULT_TARGET,
    device: str = "cpu",
    max_sessions: int = 8,
    max_sequence_length: int = 2048,
    max_draft_tokens: int = 16,
    grace: float = 30.0,
) -> GrpcServer:
    scheduler = compute.call(build_scheduler, model, device, max_sessions, max_sequence_length, max_draft_tokens)
    scheduler.start()
    server = GrpcServer("verifier", host, port, grace)

    def on_drain():
        scheduler.draining = True

    server.add(
        verifier_pb2_grpc.add_VerifierServiceServicer_to_server,
        VerifierServicer(scheduler, model),
        verifier_pb2.DESCRIPTOR.services_by_name["VerifierService"].full_name,
        on_drain,
        in_flight=lambda: len(scheduler.sessions),
    )
    return server
