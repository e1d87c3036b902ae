"""Builds a router pod: the target's tokenizer, the pools of drafters and verifiers, the verifier choice
(policy, weights, locality store) and the gRPC server."""

from __future__ import annotations

import asyncio

from router.discovery import KubeDiscovery
from router.pool import Pool
from router.scoring import Chooser, Locator, Weights
from router.service import RouterServicer
from specdec import models, telemetry
from specdec.proto import generation_pb2, generation_pb2_grpc
from specdec.server import GrpcServer
from specdec.validation import DEFAULT_MAX_NEW_TOKENS_LIMIT


def open_store_factory(redis_url: str | None, store=None, ttl: float = 30.0, timeout: float = 0.05):
    """namespace -> store: Redis when a URL is given, else the given in-process store, else None."""
    if redis_url:
        from specdec.locality import RedisStore

        return lambda namespace: RedisStore(redis_url, namespace, ttl=ttl, timeout=timeout)
    if store is not None:
        return lambda namespace: store
    return None


async def start_router(
    host: str,
    port: int,
    verifiers: list[str],
    drafters: list[str],
    model: str = models.DEFAULT_TARGET,
    max_draft_tokens: int = -1,
    max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT,
    grace: float = 30.0,
    redis_url: str | None = None,
    store=None,
    routing: str = "locality",
    weights: Weights = Weights(),
    locality_ttl: float = 30.0,
    redis_timeout: float = 0.05,
    discovery: KubeDiscovery | None = None,
    speculation_max_sessions: int = -1,
) -> GrpcServer:
    """`discovery` None: the static `verifiers` and `drafters` lists. Given: the pools follow the Services' ready
    endpoints (a pool may be empty for a while; requests then get UNAVAILABLE), `drafters` stays the drafter list
    when no drafter Service is named."""
    if not verifiers and discovery is None:
        raise ValueError("the router needs at least one --verifier address")
    tokenizer = models.load_tokenizer(model)
    verifier_pool = Pool(verifiers if discovery is None else [], name="verifier", origin="the --verifier addresses")
    drafter_pool = Pool(drafters, name="drafter", origin="the --drafter addresses")
    locator = Locator(open_store_factory(redis_url, store, locality_ttl, redis_timeout), reap_interval=locality_ttl / 3)
    servicer = RouterServicer(tokenizer, verifier_pool, drafter_pool, max_draft_tokens, max_new_tokens_limit,
                              locator, Chooser(routing, weights), speculation_max_sessions)
    servicer.metrics = telemetry.instrument_router(servicer)  # None unless this process serves /metrics
    server = GrpcServer("router", host, port, grace)
    watcher = asyncio.get_running_loop().create_task(verifier_pool.watch(), name="verifier-health")
    if discovery is not None:
        discovery.start(verifier_pool, drafter_pool)

    async def on_stop():
        watcher.cancel()
        if discovery is not None:
            await discovery.aclose()  # first: no pool changes while the pools close
        await locator.aclose()
        await verifier_pool.aclose()
        await drafter_pool.aclose()

    def on_drain():
        servicer.draining = True

    server.add(
        generation_pb2_grpc.add_GenerationServicer_to_server,
        servicer,
        generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
        on_drain,
        in_flight=lambda: servicer.in_flight,
        on_stop=on_stop,
    )
    return server
