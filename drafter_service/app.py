"""Builds a drafter pod: the drafter (n-gram or model), its batcher, and the gRPC server around them."""

from __future__ import annotations

from drafter_service.drafters import TreeShape, make_drafter
from drafter_service.service import DraftBatcher, DrafterServicer
from specdec import compute, telemetry
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
    tree: TreeShape | None = None,
) -> GrpcServer:
    """proactive: draft ahead while blocks are verified (default: on when the drafter has a CUDA device).
    prefix_cache_blocks: the model drafter's prefix cache in 16-token KV blocks (0 = off). tree: draft trees of
    this shape (feature drafters, verifiers that take them); None = chains."""
    batcher = DraftBatcher(compute.call(make_drafter, model, device, max_sessions, 2048, target, prefix_cache_blocks))
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
