"""Builds a drafter pod: the drafter (n-gram or model), its batcher, and the gRPC server around them."""

from __future__ import annotations

import os

from drafter_service.drafters import make_drafter
from drafter_service.service import DraftBatcher, DrafterServicer
from specdec import compute, telemetry
from specdec.draft_tree import FOLLOW_VERIFIER, TreeShape
from specdec.proto import drafter_pb2, drafter_pb2_grpc
from specdec.server import GrpcServer

DEFAULT_DRAFTER = "ngram"


async def start_drafter(
    host: str,
    port: int,
    model: str = DEFAULT_DRAFTER,
    device: str = "cpu",
    max_draft_tokens: int = 5,
    max_sessions: int = 64,
    grace: float = 30.0,
    proactive: bool | None = None,
    target: str | None = None,
    prefix_cache_blocks: int = 256,
    tree: TreeShape | str | None = FOLLOW_VERIFIER,
) -> GrpcServer:
    """proactive: draft ahead while blocks are verified (default: on when the drafter has a CUDA device).
    prefix_cache_blocks: the model drafter's prefix cache in 16-token KV blocks (0 = off). tree: draft trees of
    this shape (feature drafters, verifiers that take them); None = chains; FOLLOW_VERIFIER (the default) = the
    shape the verifier advises (GetModelInfo.draft_tree)."""
    batcher = DraftBatcher(compute.call(make_drafter, model, device, max_sessions, 2048, target, prefix_cache_blocks),
                           gather_s=draft_gather_s(device))
    batcher.start()
    if proactive is None:
        proactive = device.startswith("cuda")
    servicer = DrafterServicer(batcher, max_draft_tokens, proactive, tree)
    telemetry.instrument_drafter(servicer)  # gauges on /metrics, when this process serves it
    server = GrpcServer("drafter", host, port, grace)

    def on_drain():
        servicer.draining = True

    server.add(
        drafter_pb2_grpc.add_DrafterServiceServicer_to_server,
        servicer,
        drafter_pb2.DESCRIPTOR.services_by_name["DrafterService"].full_name,
        on_drain,
        in_flight=lambda: servicer.sessions_in_flight,
        on_stop=servicer.aclose,  # ends the Verify streams cleanly instead of leaving verifiers to cancel them
    )
    return server


GPU_DRAFT_GATHER_MS = 3.0  # H200 x2, 64 users: +10.3% and +6.3% speculating tokens/s against 0 (docs/benchmarks.md)


def draft_gather_s(device: str) -> float:
    """How long a batch of drafts may wait for half of the open sessions (DraftBatcher._gather):
    SPECDEC_DRAFT_GATHER_MS, else 3 ms on a CUDA device (fewer, fuller batches under load; one session never waits)
    and 0 on a CPU (not measured there)."""
    value = os.environ.get("SPECDEC_DRAFT_GATHER_MS")
    if value is not None:
        return float(value) / 1000
    return GPU_DRAFT_GATHER_MS / 1000 if device.startswith("cuda") else 0.0
