"""Telemetry end to end: router, n-gram drafter and verifier as separate processes, each serving /metrics on its
own port and writing its finished spans to its own JSON-lines file (SPECDEC_TRACE_FILE).

The metrics are checked against what the requests themselves report (Usage, the router's trailing metadata), so
a series that counts the wrong thing fails, not only a missing one. Nothing here is timed.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specdec import Client
from specdec.launch import ServerProcess, free_port
from specdec.proto import generation_pb2, generation_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
MAX_SESSIONS = 8
# Long enough for several full 16-token blocks, so a repeat of it finds them cached on the verifier.
PROMPT = ("Here is a list of the planets of the solar system in order from the sun, with one short fact about each "
          "of them, written for a curious child who has just started to read about space and the night sky:")


def _process(role: str, *args: str, metrics_port: int, trace_file: Path | None = None,
             device_traces: Path | None = None) -> ServerProcess:
    env = {"SPECDEC_TRACE_FILE": str(trace_file)} if trace_file else {}
    if device_traces:  # where SIGUSR1's device trace goes, and a short one
        env.update(SPECDEC_DEVICE_TRACE_DIR=str(device_traces), SPECDEC_DEVICE_TRACE_SECONDS="1")
    log = ROOT / ".cache" / f"test-telemetry-{role}-{metrics_port}.log"
    log.parent.mkdir(exist_ok=True)
    return ServerProcess(role, *args, "--metrics-port", str(metrics_port), log=log, env=env)


@pytest.fixture(scope="module")
def tiers(tmp_path_factory):
    traces = tmp_path_factory.mktemp("traces")
    device_traces = tmp_path_factory.mktemp("device-traces")
    ports = {role: free_port() for role in ("verifier", "drafter", "router")}
    verifier = _process("verifier", "--max-sessions", str(MAX_SESSIONS), "--max-sequence-length", "512",
                        metrics_port=ports["verifier"], trace_file=traces / "verifier.jsonl",
                        device_traces=device_traces)
    drafter = _process("drafter", "--model", "ngram", metrics_port=ports["drafter"],
                       trace_file=traces / "drafter.jsonl")
    # The one verifier process under two addresses: the router then has two candidates to choose between and
    # looks up cached prefixes (with a single candidate it skips the lookup), without loading a second model.
    router = _process("router", "--verifier", verifier.address, "--verifier", f"ipv4:{verifier.address}",
                      "--drafter", drafter.address, metrics_port=ports["router"], trace_file=traces / "router.jsonl")
    yield {"verifier": verifier, "drafter": drafter, "router": router, "ports": ports, "traces": traces,
           "device_traces": device_traces}
    for p in (router, drafter, verifier):
        p.stop()


# -- helpers ----------------------------------------------------------------------------------------------------------
def scrape(port: int) -> list:
    """Every sample of http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list, name: str, **labels) -> float:
    """The sum of the samples called `name` whose labels include `labels` ("": the label is absent or empty, as the
    exporter writes a label that other series of the family have); KeyError if there is none."""
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k, "") == v for k, v in labels.items())]
    if not found:
        raise KeyError(f"{name}{labels or ''} is not exposed")
    return sum(found)


def by_label(samples: list, name: str, label: str) -> dict[str, float]:
    return {s.labels[label]: s.value for s in samples if s.name == name}


def generate(address: str, prompt: str, max_new_tokens: int, max_draft_tokens: int | None = None,
             metadata: tuple = ()):
    """(responses, trailing metadata as a dict) of one Generate call."""
    request = generation_pb2.GenerateRequest(prompt=prompt,
                                             sampling=generation_pb2.SamplingParams(max_new_tokens=max_new_tokens))
    if max_draft_tokens is not None:
        request.speculation.max_draft_tokens = max_draft_tokens
    with grpc.insecure_channel(address) as channel:
        call = generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=120, metadata=metadata or None)
        responses = list(call)
        return responses, dict(call.trailing_metadata())


def eventually(check, timeout: float = 30.0):
    """check() until it returns something truthy; its last failure otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, KeyError):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"{check.__name__} never held")
        time.sleep(0.1)


def read_spans(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- metrics ----------------------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_each_tier_serves_its_documented_series_after_a_few_generations(tiers):
    router, ports = tiers["router"].address, tiers["ports"]
    before_verifier = scrape(ports["verifier"])  # the trace test may have run first: count from here
    before_router = scrape(ports["router"])
    runs = [
        generate(router, PROMPT, 24, max_draft_tokens=5),
        generate(router, PROMPT, 24, max_draft_tokens=5),  # same prompt: its blocks are cached now
        generate(router, "Count from one to twenty: one, two, three,", 16, max_draft_tokens=0),  # target alone
    ]
    usages = [responses[-1].usage for responses, _ in runs]
    assert all(responses[-1].finish_reason for responses, _ in runs)
    with pytest.raises(grpc.RpcError):  # a failed request counts in the duration only, labelled with its status
        generate(router, PROMPT, 0)

    # router: one TTFT, duration and TPOT sample per request; the cached blocks of the verifiers it chose. The
    # failed request's sample is recorded as its handler unwinds, which may be just after the client saw the error
    failed = "gen_ai_server_request_duration_seconds_count"
    r0, r = before_router, scrape(ports["router"])
    for _ in range(20):
        if _or0(r, failed, error_type="INVALID_ARGUMENT") > _or0(r0, failed, error_type="INVALID_ARGUMENT"):
            break
        time.sleep(0.1)
        r = scrape(ports["router"])
    for name in ("gen_ai_server_time_to_first_token_seconds", "gen_ai_server_request_duration_seconds",
                 "gen_ai_server_time_per_output_token_seconds"):
        assert value(r, name + "_count", error_type="") - _or0(r0, name + "_count", error_type="") == len(runs)
        assert value(r, name + "_bucket", le="+Inf", error_type="") == value(r, name + "_count", error_type="")
    assert value(r, failed, error_type="INVALID_ARGUMENT") - _or0(r0, failed, error_type="INVALID_ARGUMENT") == 1
    assert _or0(r, "gen_ai_server_time_to_first_token_seconds_count", error_type="INVALID_ARGUMENT") == 0
    ttft = value(r, "gen_ai_server_time_to_first_token_seconds_sum")
    assert 0 < ttft < value(r, "gen_ai_server_request_duration_seconds_sum", error_type="")
    assert by_label(r, "specdec_router_routing_mode", "mode") == {
        "locality": 1.0, "load-only": 0.0, "round-robin": 0.0, "random": 0.0}
    cached = sum(int(trailing["x-specdec-cached-blocks"]) for _, trailing in runs)
    assert int(runs[1][1]["x-specdec-cached-blocks"]) > 0  # the repeat went where its prompt's blocks were
    counted = value(r, "specdec_router_cached_prefix_blocks_total")
    assert counted - _or0(r0, "specdec_router_cached_prefix_blocks_total") == cached
    assert value(r, "specdec_router_sessions_in_flight") == 0

    # verifier: the speculation counters add up to what the requests' Usage says
    v0, v = before_verifier, scrape(ports["verifier"])

    def delta(name, **labels):
        return value(v, name, **labels) - _or0(v0, name, **labels)

    draft_tokens = delta("specdec_speculation_draft_tokens_total")
    accepted = delta("specdec_speculation_accepted_tokens_total")
    assert draft_tokens == sum(u.draft_tokens for u in usages) > 0
    assert accepted == sum(u.accepted_draft_tokens for u in usages)
    assert 0 < accepted <= draft_tokens
    drafts = delta("specdec_speculation_drafts_total")
    assert 0 < drafts <= sum(u.verify_steps for u in usages[:2])  # the target-alone request drafted nothing
    by_position = {p: delta("specdec_speculation_accepted_by_position_total", position=p)
                   for p in by_label(v, "specdec_speculation_accepted_by_position_total", "position")}
    assert sum(by_position.values()) == accepted
    ordered = [by_position.get(str(i), 0) for i in range(1, 6)]
    assert ordered == sorted(ordered, reverse=True)  # position i+1 is accepted only after position i
    assert delta("specdec_speculation_drafted_by_position_total", position="1") == drafts
    # one session at a time: every tick is one pass of one row (a prefill, or a block or plain decode step)
    passes = delta("specdec_verifier_batch_size_count")
    assert passes == sum(u.verify_steps for u in usages) + len(runs)
    assert delta("specdec_verifier_batch_size_sum") == passes

    def idle():
        v, d = scrape(ports["verifier"]), scrape(ports["drafter"])
        assert value(v, "specdec_verifier_queue_depth") == 0
        assert value(v, "specdec_verifier_batch_occupancy_ratio") == 0
        assert value(d, "specdec_drafter_pending_work") == 0
        assert value(d, "specdec_drafter_sessions") == 0
        return True

    eventually(idle)


def _or0(samples: list, name: str, **labels) -> float:
    try:
        return value(samples, name, **labels)
    except KeyError:
        return 0.0


@pytest.mark.e2e
def test_gauges_follow_a_session_in_flight(tiers):
    """While one long generation runs, each tier's gauge shows it; afterwards they are back to zero."""
    ports = tiers["ports"]
    seen = {"router": False, "drafter": False, "verifier": False}
    done = threading.Event()

    def run():
        try:
            with Client(tiers["router"].address) as client:
                client.complete(prompt="Count from 1 to 300: 1, 2, 3, 4,", max_new_tokens=160, max_draft_tokens=3)
        finally:
            done.set()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    while not done.is_set() and not all(seen.values()):
        seen["router"] |= value(scrape(ports["router"]), "specdec_router_sessions_in_flight") == 1
        seen["drafter"] |= value(scrape(ports["drafter"]), "specdec_drafter_sessions") == 1
        seen["verifier"] |= value(scrape(ports["verifier"]),
                                  "specdec_verifier_batch_occupancy_ratio") == 1 / MAX_SESSIONS
        time.sleep(0.02)
    worker.join(120)
    assert seen == {"router": True, "drafter": True, "verifier": True}
    eventually(lambda: value(scrape(ports["router"]), "specdec_router_sessions_in_flight") == 0)
    eventually(lambda: value(scrape(ports["drafter"]), "specdec_drafter_sessions") == 0)


@pytest.mark.e2e
def test_routing_mode_says_load_only_while_redis_is_down(tiers):
    verifier = tiers["verifier"].address
    port = free_port()
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    router = _process("router", "--verifier", verifier, "--verifier", f"ipv4:{verifier}",
                      "--drafter", tiers["drafter"].address, "--redis-url", dead_redis, metrics_port=port)
    try:
        modes = by_label(scrape(port), "specdec_router_routing_mode", "mode")
        assert modes["locality"] == 1 and modes["load-only"] == 0  # nothing has tried Redis yet
        responses, _ = generate(router.address, PROMPT, 4)  # a request never fails because Redis did
        assert responses[-1].finish_reason
        assert by_label(scrape(port), "specdec_router_routing_mode", "mode") == {
            "locality": 0.0, "load-only": 1.0, "round-robin": 0.0, "random": 0.0}
    finally:
        router.stop()


@pytest.mark.e2e
def test_the_metrics_port_is_printed_at_start(tiers):
    log = ROOT / ".cache" / f"test-telemetry-verifier-{tiers['ports']['verifier']}.log"
    assert f"metrics on :{tiers['ports']['verifier']}/metrics" in log.read_text()


# -- traces -----------------------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_one_request_is_one_trace_across_router_drafter_and_verifier(tiers):
    """The client's W3C traceparent continues through the router, the Draft call and the shared Verify stream."""
    trace_id, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    responses, _ = generate(tiers["router"].address, "The capital of France is", 12, max_draft_tokens=4,
                            metadata=(("traceparent", f"00-{trace_id}-{client_span}-01"),))
    usage = responses[-1].usage
    files = {tier: tiers["traces"] / f"{tier}.jsonl" for tier in ("router", "drafter", "verifier")}

    def spans_of_trace():
        spans = {tier: [s for s in read_spans(path) if s["trace_id"] == trace_id] for tier, path in files.items()}
        assert any(s["name"] == "specdec.v1.Generation/Generate" for s in spans["router"])
        assert any(s["name"] == "specdec.v1.VerifierService/Verify" for s in spans["verifier"])
        assert spans["drafter"]
        return spans

    spans = eventually(spans_of_trace)
    (generate_span,) = [s for s in spans["router"] if s["name"] == "specdec.v1.Generation/Generate"]
    assert generate_span["parent_span_id"] == client_span and generate_span["kind"] == "SERVER"
    assert generate_span["service"] == "specdec-router"
    (attempt,) = [s for s in spans["router"] if s["kind"] == "CLIENT"]
    assert attempt["name"] == "specdec.v1.DrafterService/Draft"
    assert attempt["parent_span_id"] == generate_span["span_id"]
    (draft,) = spans["drafter"]
    assert draft["name"] == "specdec.v1.DrafterService/Draft" and draft["parent_span_id"] == attempt["span_id"]
    assert draft["service"] == "specdec-drafter"
    (verify,) = [s for s in spans["verifier"] if s["name"] == "specdec.v1.VerifierService/Verify"]
    assert verify["parent_span_id"] == draft["span_id"] and verify["service"] == "specdec-verifier"
    blocks = [s for s in spans["verifier"] if s["name"] == "verify block"]
    assert len(blocks) == usage.verify_steps
    assert all(b["parent_span_id"] == verify["span_id"] for b in blocks)
    assert sum(b["attributes"]["specdec.accepted_tokens"] for b in blocks) == usage.accepted_draft_tokens
    # each hop starts after the one that called it (one machine, one clock)
    assert generate_span["start_ns"] <= attempt["start_ns"] <= draft["start_ns"] <= verify["start_ns"]
    assert verify["end_ns"] <= generate_span["end_ns"]  # the verifier finished the session before the router


@pytest.mark.e2e
def test_a_request_without_speculation_is_traced_from_router_to_verifier(tiers):
    before = {s["trace_id"] for s in read_spans(tiers["traces"] / "router.jsonl")}
    generate(tiers["router"].address, "Name a colour:", 4, max_draft_tokens=0)

    def new_request_span():
        spans = [s for s in read_spans(tiers["traces"] / "router.jsonl") if s["trace_id"] not in before]
        return [s for s in spans if s["name"] == "specdec.v1.Generation/Generate"]

    (root,) = eventually(new_request_span)
    assert root["parent_span_id"] is None  # no traceparent from the client: the router starts the trace

    def decode_span():
        found = [s for s in read_spans(tiers["traces"] / "verifier.jsonl")
                 if s["trace_id"] == root["trace_id"] and s["name"] == "specdec.v1.VerifierService/Decode"]
        return found

    (decode,) = eventually(decode_span)
    (attempt,) = [s for s in read_spans(tiers["traces"] / "router.jsonl")
                  if s["trace_id"] == root["trace_id"] and s["kind"] == "CLIENT"]
    assert attempt["name"] == "specdec.v1.VerifierService/Decode"
    assert decode["parent_span_id"] == attempt["span_id"]


# -- the verifier's per-tick accounting, without processes -----------------------------------------------------------
def test_a_tick_records_one_batch_size_per_forward_pass_and_acceptance_by_position():
    from types import SimpleNamespace

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from specdec.telemetry import VerifierMetrics

    reader = InMemoryMetricReader()
    scheduler = SimpleNamespace(queue_depth=3, sessions={"a": 1, "b": 2}, cache=SimpleNamespace(num_slots=8))
    metrics = VerifierMetrics(MeterProvider(metric_readers=[reader]).get_meter("test"), scheduler)
    # prefill passes of 2 rows and of 1 row; a verify pass of 3 rows: 3 of 4 accepted, a plain step, 2 of 2
    metrics.record_tick([2, 1, 2], [(4, 3), (0, 0), (2, 2)])
    points = {m.name: m.data.data_points for rm in reader.get_metrics_data().resource_metrics
              for sm in rm.scope_metrics for m in sm.metrics}

    def by_position(name):
        return {p.attributes["position"]: p.value for p in points[name]}

    (sizes,) = points["specdec.verifier.batch_size"]
    assert (sizes.count, sizes.sum) == (3, 2 + 1 + 3)
    assert [p.value for p in points["specdec.speculation.drafts"]] == [2]
    assert [p.value for p in points["specdec.speculation.draft_tokens"]] == [6]
    assert [p.value for p in points["specdec.speculation.accepted_tokens"]] == [5]
    assert by_position("specdec.speculation.drafted_by_position") == {"1": 2, "2": 2, "3": 1, "4": 1}
    assert by_position("specdec.speculation.accepted_by_position") == {"1": 2, "2": 2, "3": 1}
    assert [p.value for p in points["specdec.verifier.queue_depth"]] == [3]
    assert [p.value for p in points["specdec.verifier.batch_occupancy_ratio"]] == [2 / 8]


def test_a_device_trace_splits_each_span_into_the_device_time_of_the_kernels_it_launched():
    from specdec.device_trace import summarize

    def x(cat, name, ts, dur, tid=1, correlation=None):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid,
                **({"args": {"correlation": correlation}} if correlation is not None else {})}

    events = [
        x("user_annotation", "specdec.verifier.tick", 0, 1000),
        x("cuda_runtime", "cudaGraphLaunch", 100, 10, correlation=7),
        x("cuda_runtime", "cudaGraphLaunch", 1500, 10, correlation=8),  # after the tick: not the tick's
        x("kernel", "gemm", 200, 300, tid=9, correlation=7),
        x("kernel", "attention", 400, 200, tid=9, correlation=7),  # overlaps the gemm: the union counts once
        x("kernel", "gemm", 1600, 100, tid=9, correlation=8),
        x("user_annotation", "other", 0, 5000),  # not specdec's: no span
        {"ph": "M", "name": "process_name"},
    ]
    summary = summarize(events, wall_s=0.002)
    assert summary["device"]["busy_ms"] == pytest.approx(0.5)  # 200-600 and 1600-1700 us
    assert summary["device"]["busy_pct"] == pytest.approx(25.0)
    assert summary["device"]["kernels"] == 3
    assert summary["device"]["top_kernels"][0] == {"name": "gemm", "count": 2, "ms": 0.4}
    assert list(summary["spans"]) == ["verifier.tick"]
    tick = summary["spans"]["verifier.tick"]
    assert (tick["count"], tick["host_ms"], tick["device_ms"], tick["device_pct"]) == (1, 1.0, 0.5, 50.0)
    assert summary["runtime"][0] == {"name": "cudaGraphLaunch", "count": 2, "ms": 0.02}


def test_device_busy_across_processes_counts_overlapping_kernels_once(tmp_path):
    from specdec.device_trace import shared_busy

    def trace(path, intervals):
        path.write_text(json.dumps({"traceEvents": [
            {"ph": "X", "cat": "kernel", "name": "k", "ts": s, "dur": e - s} for s, e in intervals]}))
        return path

    a = trace(tmp_path / "a.trace.json", [(0, 400), (600, 1000)])
    b = trace(tmp_path / "b.trace.json", [(300, 500), (900, 1000)])
    shared = shared_busy([a, b])
    # the window both cover: 300-1000 us; busy 300-500 and 600-1000
    assert shared == {"window_ms": 0.7, "busy_pct_all": pytest.approx(85.7),
                      "busy_pct_each": {"a.trace.json": pytest.approx(71.4), "b.trace.json": pytest.approx(42.9)}}


def test_sigusr1_writes_a_device_trace_of_the_verifiers_ticks_and_it_keeps_serving(tiers):
    import os
    import signal

    verifier = tiers["verifier"]
    directory = tiers["device_traces"]
    done = threading.Event()

    def load():
        while not done.is_set():
            generate(tiers["router"].address, "Name three colours.", 24, max_draft_tokens=0)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(0.5)
        os.kill(verifier.proc.pid, signal.SIGUSR1)
        summary_path = directory / f"verifier-{verifier.proc.pid}.summary.json"
        deadline = time.monotonic() + 60
        while not summary_path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        done.set()
        worker.join()
    summary = json.loads(summary_path.read_text())
    assert summary["process"] == "verifier"
    assert summary["wall_s"] >= 1.0  # SPECDEC_DEVICE_TRACE_SECONDS of the fixture
    tick = summary["spans"]["verifier.tick"]
    assert tick["count"] >= 1 and tick["host_ms"] > 0
    assert (directory / f"verifier-{verifier.proc.pid}.trace.json").exists()
    responses, _ = generate(tiers["router"].address, "Name three colours.", 8)  # the server lived through it
    assert responses[-1].finish_reason and responses[-1].usage.completion_tokens > 0
