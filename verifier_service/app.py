"""Builds a verifier pod: the target model, its engine, prefix cache and scheduler, the locality publisher
(Redis, an in-process store, or none), and the gRPC server around them."""

from __future__ import annotations

import logging
import socket
import time

import torch

from specdec import compute, models, settings, telemetry
from specdec.hf_engine import make_engine
from specdec.locality import Publisher
from specdec.prefix_hash import model_namespace, model_seed
from specdec.proto import verifier_pb2, verifier_pb2_grpc
from specdec.server import GrpcServer
from verifier_service import tree_advice
from verifier_service.prefix_cache import PrefixCache
from verifier_service.scheduler import Scheduler
from verifier_service.service import VerifierServicer

log = logging.getLogger(__name__)


def default_dtype(device: str) -> torch.dtype:
    """The engines' dtype: SPECDEC_DTYPE when set, else bfloat16 on CUDA and float32 on a CPU (settings.dtype_name)."""
    return getattr(torch, settings.dtype_name(device))


def eos_ids_of(hf_model) -> frozenset[int]:
    ids: set[int] = set()
    for value in (hf_model.config.eos_token_id, getattr(hf_model.generation_config, "eos_token_id", None)):
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return frozenset(ids)


# Greedy steps a decode chunk queues for the next on a GPU: one user's tokens/s through the whole stack 697 -> 797
# with 2 on an H200 (docs/benchmarks.md, ninth session); on a CPU queued steps delay the tokens instead.
DECODE_AHEAD_STEPS_ON_GPU = 2
# Verify passes' width buckets captured before serving: blocks of 2, 3-4 and 5-8 tokens (drafts of 1 to 7 tokens,
# the adaptive lengths around the GPU's advised 5)
WARM_VERIFY_WIDTHS = (2, 4, 8)
# and the wide passes' buckets that prefills of up to TREE_PASS_ROWS prompts of 17-128 tokens replay (captured
# mid-serving, each held a tick for ~100-200 ms: the verifier's tick p99 at 64 users, docs/benchmarks.md, eleventh
# session)
WARM_PREFILL_WIDTHS = (32, 64, 128)


def build_scheduler(model: str, device: str, max_sessions: int, max_sequence_length: int, max_draft_tokens: int,
                    prefix_cache_blocks: int = 0, on_change=None, decode_chunk_ms: float = 10.0,
                    decode_ahead_steps: int = -1, graph_warmup_tokens: int = 0,
                    graph_warmup_feature_layers: list[list[int]] | None = None):
    """decode_ahead_steps: -1 = the measured default for the device (DECODE_AHEAD_STEPS_ON_GPU, 0 on a CPU).
    graph_warmup_tokens: on CUDA, capture the decode steps' and verify passes' graphs of every batch bucket up to
    max_sessions and KV lengths up to this many tokens before serving (0: each on first use, mid-serving), and
    the verify passes that return the hidden states of each layer list in graph_warmup_feature_layers (the fused
    drafters' layers this verifier will serve)."""
    hf_model = models.load_hf_model(model)
    engine = make_engine(hf_model, device=device, dtype=default_dtype(device))
    if decode_ahead_steps < 0:
        decode_ahead_steps = DECODE_AHEAD_STEPS_ON_GPU if engine.device.type == "cuda" else 0
    prefix_cache = None
    if prefix_cache_blocks > 0 and engine.supports_prefix_cache:
        prefix_cache = PrefixCache(engine.shape, prefix_cache_blocks, engine.device, engine.dtype, model_seed(model),
                                   on_change, features=True)
    scheduler = Scheduler(engine, eos_ids_of(hf_model), max_sessions, max_sequence_length, max_draft_tokens,
                          prefix_cache, decode_chunk_ms,
                          decode_ahead_steps=decode_ahead_steps)
    del hf_model  # the engine holds its own copies of the weights
    warm_graphs(scheduler, max_sessions, WARM_VERIFY_WIDTHS, graph_warmup_tokens, graph_warmup_feature_layers)
    return scheduler


def warm_graphs(scheduler: Scheduler, max_sessions: int, verify_widths: tuple[int, ...], tokens: int,
                feature_layers: list[list[int]] | None, prefills: bool = True) -> None:
    """build_scheduler's capture before serving (see there), of these verify widths and, with prefills, the wide
    passes' (WARM_PREFILL_WIDTHS); nothing unless on CUDA with tokens > 0. Graphs already captured are kept."""
    engine = scheduler.engine
    warm = getattr(engine, "warm_cuda_graphs", None)
    if tokens <= 0 or warm is None or engine.device.type != "cuda":
        return
    prefill_widths = WARM_PREFILL_WIDTHS if prefills else ()
    began = time.perf_counter()
    try:
        captured = warm(scheduler.cache, max_sessions, verify_widths + prefill_widths, tokens,
                        feature_layers or ())
    except ValueError:  # a layer list this model cannot serve, refused before any capture: the error says which
        raise
    except Exception as exc:  # (out of memory, say): fail at start-up, not mid-serving, and say what to change
        raise RuntimeError(f"capturing CUDA graphs before serving failed ({exc}); --graph-warmup-tokens 0 "
                           "captures each on first use instead, a lower --max-sessions captures fewer") from exc
    prefill_text = f" and {'/'.join(map(str, prefill_widths))}-token prefills" if prefill_widths else ""
    log.info("captured %d CUDA graphs (greedy decode steps, %s-token verify passes%s%s, up to %d rows and %d tokens "
             "of context) in %.1f s", captured, "/".join(map(str, verify_widths)), prefill_text,
             "".join(f", with layers {layers}" for layers in feature_layers or ()), max_sessions, tokens,
             time.perf_counter() - began)


def warm_advised_trees(scheduler: Scheduler, max_sessions: int, draft_tree: str, tokens: int,
                       feature_layers: list[list[int]] | None) -> None:
    """Where this verifier advises draft trees and has CUDA graphs: capture the chains' widest verify graphs too
    (LlamaEngine.graph_width), since the trees that fit them verify in the chains' pass (Scheduler._passes); the
    drafters' first trees then wait on no capture mid-serving."""
    width = getattr(scheduler.engine, "graph_width", 0)
    if draft_tree and width:
        warm_graphs(scheduler, max_sessions, (width,), tokens, feature_layers, prefills=False)


async def start_verifier(
    host: str,
    port: int,
    model: str = models.DEFAULT_TARGET,
    device: str = "cpu",
    max_sessions: int = 8,
    max_sequence_length: int = 2048,
    max_draft_tokens: int = 16,
    grace: float = 30.0,
    prefix_cache_blocks: int = 256,
    redis_url: str | None = None,
    advertise: str | None = None,
    store=None,
    locality_ttl: float = 30.0,
    redis_timeout: float = 0.05,
    decode_chunk_ms: float = 10.0,
    decode_ahead_steps: int = -1,
    advise: tuple[int, int] = (-1, -1),
    advise_draft_tree: str = "auto",
    graph_warmup_tokens: int = 0,
    graph_warmup_feature_layers: list[list[int]] | None = None,
) -> GrpcServer:
    """`store`: an in-process locality store (all-in-one); `redis_url` makes a Redis one; neither: no hints.
    `advise`: (speculation_max_sessions, draft_tokens) advised to routers and drafters; -1 = measured device default.
    advise_draft_tree: "auto" (measured: verifier_service.tree_advice), "off" (chains) or a BRANCHxBEAM shape."""
    server = GrpcServer("verifier", host, port, grace)
    if redis_url:
        from specdec.locality import RedisStore

        # Off the token path, so a longer timeout than the router's lookups is fine.
        store = RedisStore(redis_url, model_namespace(model), ttl=locality_ttl, timeout=max(redis_timeout, 0.2))
    publisher = None
    if store is not None and prefix_cache_blocks > 0:
        pod = advertise or (server.address if not server.address.startswith("0.0.0.0:")
                            else f"{socket.gethostname()}:{server.port}")
        publisher = Publisher(store, pod, ttl=locality_ttl)
    scheduler = compute.call(build_scheduler, model, device, max_sessions, max_sequence_length, max_draft_tokens,
                             prefix_cache_blocks, publisher.changed if publisher else None, decode_chunk_ms,
                             decode_ahead_steps, graph_warmup_tokens, graph_warmup_feature_layers)
    scheduler.metrics = telemetry.instrument_verifier(scheduler)  # None unless this process serves /metrics
    servicer = VerifierServicer(scheduler, model, speculation_max_sessions=None if advise[0] < 0 else advise[0],
                                draft_tokens=None if advise[1] < 0 else advise[1])
    # measured before the scheduler starts, so its passes have the engine to themselves
    servicer.draft_tree = compute.call(tree_advice.advise_draft_tree, scheduler.engine, servicer.draft_tokens,
                                       scheduler.max_tree_nodes, advise_draft_tree)
    compute.call(warm_advised_trees, scheduler, max_sessions, servicer.draft_tree, graph_warmup_tokens,
                 graph_warmup_feature_layers)
    scheduler.start()
    if publisher is not None:
        await publisher.start()

    async def on_stop():
        passes = getattr(scheduler.engine, "passes", None)
        if passes:
            scheduler.phases.count("cuda_graphs_captured", passes["captures"])
            scheduler.phases.count("eager_passes", passes["eager"])
            log.info("engine: %d graphed and %d eager passes, %d greedy decode steps; %d CUDA graphs captured in "
                     "%.1f s", passes["graphed"], passes["eager"], passes["greedy_steps"], passes["captures"],
                     passes["capture_s"])
        log.info(scheduler.phases.summary_line("verifier"))
        if publisher is not None:
            await publisher.stop()  # this pod's blocks leave the store at once, not after the TTL
        if store is not None:
            await store.aclose()

    def on_drain():
        scheduler.draining = True

    server.add(
        verifier_pb2_grpc.add_VerifierServiceServicer_to_server,
        servicer,
        verifier_pb2.DESCRIPTOR.services_by_name["VerifierService"].full_name,
        on_drain,
        in_flight=lambda: len(scheduler.sessions),
        on_stop=on_stop,
    )
    return server
