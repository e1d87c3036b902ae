"""OpenTelemetry for one specdec process: metrics on a Prometheus endpoint, traces across the tiers.

Owns the process's providers (one MeterProvider and one TracerProvider, also in the all-in-one mode where three
tiers share a process), the instruments every tier records into, and W3C trace-context propagation helpers.
It does not decide what a tier measures or when; the tiers call in here at a few points per request or per
verify pass, never per token.

Metrics (docs/telemetry.md lists every series): `setup(..., metrics_port)` starts prometheus_client's HTTP server
on that port (path /metrics) with the opentelemetry-exporter-prometheus reader behind it. OTel names and units are
chosen so the exposed names are the documented ones: unit "s" appends `_seconds`, a counter gets `_total`, a
`{curly}` unit adds nothing. Gauges are observable: their callbacks read the live scheduler, batcher and router
state when Prometheus scrapes (on the HTTP server's thread; they only read ints and lengths).

Traces: a span exporter is configured only when asked for: OTLP when OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set and opentelemetry-exporter-otlp is installed, and/or JSON lines to the
file named by SPECDEC_TRACE_FILE (for debugging and tests: spans of separate processes in plain files).
The W3C `traceparent` rides in gRPC metadata on per-session RPCs (Generate, Draft, Decode); on the Verify stream,
which many sessions share, it rides in each session's SessionSpec.trace_context.

Off costs nothing: without `setup` (or with metrics port 0) `instrument_*` return None and the tiers skip their
one `if metrics is not None` check; without a span exporter `start_span` returns None.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Mapping, Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

TRACE_FILE_ENV = "SPECDEC_TRACE_FILE"
ROUTING_MODES = ("locality", "load-only", "round-robin", "random")

# Bucket boundaries, in seconds. The gen_ai ones are OpenTelemetry's semantic-convention advice: from a few ms on
# a GPU to tens of seconds for a long generation on a busy CPU.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92, 163.84)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

_PROPAGATOR = TraceContextTextMapPropagator()


class _Process:
    """What `setup` made; None everywhere until it runs (tests that build servers in-process never call it)."""

    meter = None
    tracer = None
    metrics_port = 0


_process = _Process()
_setup_lock = threading.Lock()


# -- setup ------------------------------------------------------------------------------------------------------------
def setup(service: str, metrics_port: int = 0, host: str = "0.0.0.0") -> int:
    """Sets up this process's telemetry once; returns the port /metrics is served on (0: metrics off).

    service: the OTel service.name (OTEL_SERVICE_NAME overrides it), e.g. "specdec-verifier".
    """
    with _setup_lock:
        if _process.meter is not None or _process.tracer is not None:
            raise RuntimeError("telemetry.setup runs once per process")
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return 0
        resource = _resource(service)
        _process.tracer = _tracer(resource)
        if metrics_port:
            _process.meter, _process.metrics_port = _meter(resource, metrics_port, host)
        return _process.metrics_port


def _resource(service: str):
    from opentelemetry.sdk.resources import Resource

    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME; an explicit name would override them.
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service}
    return Resource.create(attributes)


def _meter(resource, port: int, host: str):
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
    from prometheus_client import start_http_server

    views = [
        View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(buckets))
        for name, buckets in (
            ("gen_ai.server.time_to_first_token", TTFT_BUCKETS),
            ("gen_ai.server.time_per_output_token", TPOT_BUCKETS),
            ("gen_ai.server.request.duration", DURATION_BUCKETS),
            ("specdec.verifier.batch_size", BATCH_BUCKETS),
        )
    ]
    reader = PrometheusMetricReader()
    # No exemplars: they would cost a context lookup on every record for nothing Prometheus text shows.
    provider = MeterProvider(metric_readers=[reader], resource=resource, views=views,
                             exemplar_filter=AlwaysOffExemplarFilter())
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}): pass --metrics-port 0 (off) "
                      f"or a free port") from None
    return provider.get_meter("specdec"), server.server_port


def _tracer(resource):
    """A tracer when some exporter is configured, else None (spans are then not even created)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    processors = []
    path = os.environ.get(TRACE_FILE_ENV)
    if path:
        # Synchronous: a span is on disk when it ends, so a test can read it right after the request.
        processors.append(SimpleSpanProcessor(_SpanFile(path)))
    otlp = _otlp_exporter()
    if otlp is not None:
        processors.append(BatchSpanProcessor(otlp))
    if not processors:
        return None
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER (default: parent-based, all)
    for processor in processors:
        provider.add_span_processor(processor)
    return provider.get_tracer("specdec")


def _otlp_exporter():
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint or os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() != "otlp":
        return None
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is not installed "
                    "(pip install opentelemetry-exporter-otlp); traces are off")
        return None
    return OTLPSpanExporter()  # endpoint, headers, timeouts: from the OTEL_EXPORTER_OTLP_* variables


class _SpanFile(SpanExporter):
    """Finished spans as JSON lines appended to a file (one line per span, ids in W3C hex)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans):
        lines = "".join(json.dumps(_span_record(s)) + "\n" for s in spans)
        with self._lock, open(self.path, "a") as f:
            f.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing held open: every export opens and closes the file."""


def _span_record(span) -> dict:
    ctx, parent = span.get_span_context(), span.parent
    return {
        "name": span.name,
        "service": span.resource.attributes.get("service.name"),
        "kind": span.kind.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
    }


# -- traces -----------------------------------------------------------------------------------------------------------
def tracing() -> bool:
    return _process.tracer is not None


def metadata_carrier(context) -> dict[str, str]:
    """The incoming gRPC metadata of a servicer context, as a carrier for `start_span`."""
    if _process.tracer is None:
        return {}
    return {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}


def start_span(name: str, carrier: Mapping[str, str] | None = None, parent=None, kind: SpanKind = SpanKind.SERVER,
               attributes: dict | None = None):
    """A started span (the caller ends it with `end_span`), or None when tracing is off.

    Its parent is `parent` (a span) if given, else the W3C context in `carrier`, else none (a new trace). The span
    is never made "current": the servicers are async generators, whose context does not survive their yields.
    """
    tracer = _process.tracer
    if tracer is None:
        return None
    if parent is not None:
        context = trace.set_span_in_context(parent)
    else:
        context = _PROPAGATOR.extract(carrier) if carrier else None
    return tracer.start_span(name, context=context, kind=kind, attributes=attributes)


def trace_headers(span) -> dict[str, str]:
    """The W3C headers (traceparent, tracestate) that make `span` the parent on the other side; {} for None."""
    if span is None:
        return {}
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def end_span(span, error: BaseException | str | None = None, attributes: dict | None = None) -> None:
    if span is None:
        return
    if attributes:
        span.set_attributes(attributes)
    if error is not None:
        reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        span.set_status(Status(StatusCode.ERROR, reason))
    span.end()


# -- metrics: router --------------------------------------------------------------------------------------------------
def _observe(read):
    """An observable-gauge callback reporting read() (a number) with no attributes."""
    from opentelemetry.metrics import Observation

    def callback(_options):
        return [Observation(read())]

    return callback


def routing_mode(policy: str, locator) -> str:
    """The mode in use: the baseline policy, or for locality "load-only" while the shared store is out of reach."""
    if policy != "locality":
        return policy
    return "load-only" if locator.shared_store_down else "locality"


class RouterMetrics:
    """gen_ai.server.* per request, cached prefix blocks per choice, and the router's gauges."""

    def __init__(self, meter, servicer):
        from opentelemetry.metrics import Observation

        self.ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="Time from receiving a Generate request to sending its first tokens (successful requests)")
        self.tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s",
            description="Time per output token after the first, per successful request")
        self.duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s",
            description="Duration of Generate requests; failed ones carry error_type")
        self.cached_blocks = meter.create_counter(
            "specdec.router.cached_prefix_blocks", unit="{block}",
            description="16-token prompt blocks already cached on the verifier each session was routed to")

        def modes(_options):
            mode = routing_mode(servicer.chooser.policy, servicer.locator)
            return [Observation(int(m == mode), {"mode": m}) for m in ROUTING_MODES]

        meter.create_observable_gauge("specdec.router.routing_mode", [modes],
                                      description="1 for the routing mode in use, 0 for the others")
        meter.create_observable_gauge("specdec.router.sessions_in_flight", [_observe(lambda: servicer.in_flight)],
                                      description="Generate requests being served")

    def request_done(self, started: float, first: float | None, ended: float, completion_tokens: int,
                     error_type: str | None) -> None:
        """One call per request (times from time.perf_counter)."""
        if error_type is not None:
            self.duration.record(ended - started, {"error.type": error_type})
            return
        self.duration.record(ended - started)
        if first is not None:
            self.ttft.record(first - started)
            if completion_tokens > 1:
                self.tpot.record((ended - first) / (completion_tokens - 1))


def instrument_router(servicer) -> RouterMetrics | None:
    return RouterMetrics(_process.meter, servicer) if _process.meter is not None else None


# -- metrics: verifier ------------------------------------------------------------------------------------------------
class VerifierMetrics:
    """Speculation counters and batch sizes, recorded once per scheduler tick; queue and occupancy gauges."""

    def __init__(self, meter, scheduler):
        self.batch_size = meter.create_histogram(
            "specdec.verifier.batch_size", unit="{row}", description="Sessions (rows) per target forward pass")
        self.drafts = meter.create_counter(
            "specdec.speculation.drafts", unit="{block}", description="Draft blocks verified (at least one token)")
        self.draft_tokens = meter.create_counter(
            "specdec.speculation.draft_tokens", unit="{token}", description="Draft tokens verified")
        self.accepted_tokens = meter.create_counter(
            "specdec.speculation.accepted_tokens", unit="{token}", description="Draft tokens accepted")
        self.accepted_by_position = meter.create_counter(
            "specdec.speculation.accepted_by_position", unit="{token}",
            description="Draft tokens accepted, by position in the block (1 = first draft token)")
        self.drafted_by_position = meter.create_counter(
            "specdec.speculation.drafted_by_position", unit="{token}",
            description="Draft tokens verified, by position in the block (1 = first draft token)")
        self._positions: list[dict[str, str]] = []  # attribute dicts made once, not per record
        meter.create_observable_gauge(
            "specdec.verifier.queue_depth", [_observe(lambda: scheduler.queue_depth)],
            description="Prefills and draft blocks waiting for a forward pass")
        slots = scheduler.cache.num_slots
        meter.create_observable_gauge(
            "specdec.verifier.batch_occupancy_ratio", [_observe(lambda: len(scheduler.sessions) / slots)],
            unit="1", description="Open sessions / KV slots (--max-sessions)")

    def _position(self, i: int) -> dict[str, str]:
        while len(self._positions) <= i:
            self._positions.append({"position": str(len(self._positions) + 1)})
        return self._positions[i]

    def record_tick(self, prefill_rows: Sequence[int], blocks: Sequence[tuple[int, int]],
                    verify_passes: Sequence[int] | None = None) -> None:
        """One scheduler tick: its prefill passes and its verify passes.

        prefill_rows: for each session prefilled, the rows of the pass that prefilled it (a pass of n rows appears
        n times). blocks: per session verified, (draft tokens verified, accepted); (0, 0) is a plain decode step.
        verify_passes: the rows of each verify pass (default: one pass of all blocks).
        """
        for rows, sessions in Counter(prefill_rows).items():
            for _ in range(sessions // rows):
                self.batch_size.record(rows)
        for rows in verify_passes if verify_passes is not None else ([len(blocks)] if blocks else []):
            self.batch_size.record(rows)
        if not blocks:
            return
        drafted_at: list[int] = []
        accepted_at: list[int] = []
        drafts = drafted_total = accepted_total = 0
        for drafted, accepted in blocks:
            if not drafted:
                continue
            drafts += 1
            drafted_total += drafted
            accepted_total += accepted
            for counts, n in ((drafted_at, drafted), (accepted_at, accepted)):
                if len(counts) < n:
                    counts.extend([0] * (n - len(counts)))
                for i in range(n):
                    counts[i] += 1
        if not drafts:
            return
        self.drafts.add(drafts)
        self.draft_tokens.add(drafted_total)
        self.accepted_tokens.add(accepted_total)
        for i, n in enumerate(drafted_at):
            self.drafted_by_position.add(n, self._position(i))
        for i, n in enumerate(accepted_at):
            if n:
                self.accepted_by_position.add(n, self._position(i))


def instrument_verifier(scheduler) -> VerifierMetrics | None:
    return VerifierMetrics(_process.meter, scheduler) if _process.meter is not None else None


# -- metrics: drafter -------------------------------------------------------------------------------------------------
def instrument_drafter(servicer) -> bool:
    """The drafter's gauges (nothing is recorded on its token path); False when metrics are off."""
    meter = _process.meter
    if meter is None:
        return False
    meter.create_observable_gauge(
        "specdec.drafter.pending_work", [_observe(lambda: servicer.batcher.pending_work)],
        description="Draft tokens requested and not yet returned to their sessions")
    meter.create_observable_gauge(
        "specdec.drafter.sessions", [_observe(lambda: servicer.sessions_in_flight)],
        description="Sessions this drafter is drafting for")
    return True
