"""Builds a router pod: the target's tokenizer, the pools of drafters and verifiers, and the gRPC server."""

from __future__ import annotations

from router.pool import Pool
from router.service import RouterServicer
from specdec import models
from specdec.proto import generation_pb2, generation_pb2_grpc
from specdec.server import GrpcServer
from specdec.validation import DEFAULT_MAX_NEW_TOKENS_LIMIT


async def start_router(
    host: str,
    port: int,
    verifiers: list[str],
    drafters: list[str],
    model: str = models.DEFAULT_TARGET,
    max_draft_tokens: int = 5,
    max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT,
    grace: float = 30.0,
) -> GrpcServer:
    if not verifiers:
        raise ValueError("the router needs at least one --verifier address")
    tokenizer = models.load_tokenizer(model)
    servicer = RouterServicer(tokenizer, Pool(verifiers), Pool(drafters), max_draft_tokens, max_new_tokens_limit)
    server = GrpcServer("router", host, port, grace)

    def on_drain():
        servicer.draining = True

    server.add(
        generation_pb2_grpc.add_GenerationServicer_to_server,
        servicer,
        generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
        on_drain,
        in_flight=lambda: servicer.in_flight,
    )
    return server
