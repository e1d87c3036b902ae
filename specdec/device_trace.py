"""A running server's device timeline, on demand: `kill -USR1 <pid>` profiles the process's torch work for a few
seconds and writes what its device and its torch thread did.

Every server (verifier, drafter, router, all-in-one) installs the handler. On SIGUSR1, torch.profiler starts on the
torch thread (specdec.compute: the one thread that runs every pass; the profiler records the ops of the thread
that starts it, and every CUDA kernel of the process), runs for SPECDEC_DEVICE_TRACE_SECONDS (5), then writes
under SPECDEC_DEVICE_TRACE_DIR (the system's temporary directory when unset):
- `<name>-<pid>.trace.json`: the Chrome trace (open it in Perfetto or chrome://tracing; tens of MB under load);
- `<name>-<pid>.summary.json`: `summarize` of it (below), what `bench/load_profile.py --device-trace` prints.

The passes carry `specdec.*` annotations (`annotate`): the verifier's tick, the drafter's batch of drafts. The
summary splits each annotation's host time into the device time of the kernels it launched, so a slow round says
whether its time went to the device, to the host around it, or to waiting between. This module owns the trigger
and the arithmetic over the trace, not what is annotated. Profiling slows the process (every op is recorded):
read a window's shares, not its throughput.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import json
import logging
import os
import signal
import tempfile
import time
from pathlib import Path

from specdec import compute

log = logging.getLogger(__name__)

DEFAULT_SECONDS = 5.0
ANNOTATION_PREFIX = "specdec."
_DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def annotate(name: str):
    """A span the device trace reports on (`specdec.<name>`); costs a flag check when no profiler runs."""
    import torch

    return torch.profiler.record_function(ANNOTATION_PREFIX + name)


def traced(name: str, fn):
    """fn, run inside `annotate(name)` (for compute.run)."""
    def run(*args):
        with annotate(name):
            return fn(*args)

    return run


def install(name: str) -> None:
    """Makes SIGUSR1 capture a device trace of this process (see the module docstring). Call on the event loop."""
    loop = asyncio.get_running_loop()
    state = {"running": False}

    async def capture_once() -> None:
        if state["running"]:
            log.warning("device trace: one is already running; SIGUSR1 ignored")
            return
        state["running"] = True
        try:
            seconds = float(os.environ.get("SPECDEC_DEVICE_TRACE_SECONDS") or DEFAULT_SECONDS)
            directory = Path(os.environ.get("SPECDEC_DEVICE_TRACE_DIR") or tempfile.gettempdir())
            await capture(name, seconds, directory)
        except Exception:  # a failed trace must never take the server down
            log.exception("device trace failed")
        finally:
            state["running"] = False

    loop.add_signal_handler(signal.SIGUSR1, lambda: loop.create_task(capture_once()))


async def capture(name: str, seconds: float, directory: Path) -> Path:
    """Profiles the torch thread for `seconds`, writes the trace and its summary; returns the summary's path."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities)
    stem = directory / f"{name}-{os.getpid()}"
    directory.mkdir(parents=True, exist_ok=True)
    log.info("device trace: %.1f s, writing %s.*", seconds, stem)
    window = {}

    def start():
        profiler.start()
        window["began"] = time.perf_counter()

    def stop():  # the window ends where recording does, not after the (slow) stop and the tick queued before it
        window["ended"] = time.perf_counter()
        profiler.stop()

    await compute.run(start)
    try:
        await asyncio.sleep(seconds)
    finally:
        await compute.run(stop)
    wall = window["ended"] - window["began"]
    trace = stem.with_suffix(".trace.json")
    await asyncio.to_thread(profiler.export_chrome_trace, str(trace))
    summary = await asyncio.to_thread(lambda: summarize(json.loads(trace.read_text())["traceEvents"], wall))
    summary["process"] = name
    out = stem.with_suffix(".summary.json")
    out.write_text(json.dumps(summary, indent=1))
    log.info("device trace: device busy %.1f%% of %.1f s; %s", summary["device"]["busy_pct"], wall, out)
    return out


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def _top(counter_ms: dict[str, float], counts: dict[str, int], top: int) -> list[dict]:
    ranked = sorted(counter_ms.items(), key=lambda kv: -kv[1])[:top]
    return [{"name": name[:120], "count": counts[name], "ms": round(ms, 3)} for name, ms in ranked]


def summarize(events: list[dict], wall_s: float, top: int = 12) -> dict:
    """A Chrome trace's events -> where the window went:
    - device: kernels, copies; busy_ms / busy_pct (the union of their intervals, over the window's wall time);
      top kernels by device time;
    - runtime: the CUDA runtime calls the host made (graph launches, synchronizations) by host time;
    - spans: each `specdec.*` annotation: count, host ms (total, mean, share of the window), the device ms of the
      kernels its thread launched inside it, and `device_pct`, that device time over the span's host time (low: the
      span's wall went to the host or to waiting, not to the device).
    `wall_s` is the profiled window's length."""
    device_intervals: list[tuple[float, float]] = []
    kernel_ms: dict[str, float] = collections.defaultdict(float)
    kernel_n: collections.Counter = collections.Counter()
    device_by_correlation: dict[int, float] = collections.defaultdict(float)
    runtime_ms: dict[str, float] = collections.defaultdict(float)
    runtime_n: collections.Counter = collections.Counter()
    launches: dict[object, list[tuple[float, int]]] = collections.defaultdict(list)  # tid -> [(ts, correlation)]
    spans: list[dict] = []
    copies = {"count": 0, "ms": 0.0}
    for e in events:
        if e.get("ph") != "X":
            continue
        cat, dur = e.get("cat"), float(e.get("dur") or 0.0)
        if cat in _DEVICE_CATEGORIES:
            start = float(e["ts"])
            device_intervals.append((start, start + dur))
            correlation = (e.get("args") or {}).get("correlation")
            if correlation is not None:
                device_by_correlation[correlation] += dur
            if cat == "kernel":
                kernel_ms[e["name"]] += dur / 1000
                kernel_n[e["name"]] += 1
            else:
                copies["count"] += 1
                copies["ms"] += dur / 1000
        elif cat == "cuda_runtime" or cat == "cuda_driver":
            runtime_ms[e["name"]] += dur / 1000
            runtime_n[e["name"]] += 1
            correlation = (e.get("args") or {}).get("correlation")
            if correlation is not None:
                launches[e.get("tid")].append((float(e["ts"]), correlation))
        elif cat == "user_annotation" and str(e.get("name", "")).startswith(ANNOTATION_PREFIX):
            spans.append(e)
    for calls in launches.values():
        calls.sort()
    by_span: dict[str, dict] = {}
    for e in spans:
        entry = by_span.setdefault(e["name"][len(ANNOTATION_PREFIX):], {"count": 0, "host_ms": 0.0, "device_ms": 0.0})
        start, dur = float(e["ts"]), float(e.get("dur") or 0.0)
        entry["count"] += 1
        entry["host_ms"] += dur / 1000
        calls = launches.get(e.get("tid"), [])
        lo = bisect.bisect_left(calls, (start, -1))
        hi = bisect.bisect_right(calls, (start + dur, float("inf")))
        entry["device_ms"] += sum(device_by_correlation.get(c, 0.0) for _, c in calls[lo:hi]) / 1000
    for entry in by_span.values():
        entry["mean_host_ms"] = round(entry["host_ms"] / entry["count"], 3)
        entry["host_pct_of_wall"] = round(100 * entry["host_ms"] / (wall_s * 1000), 1) if wall_s else 0.0
        entry["device_pct"] = round(100 * entry["device_ms"] / entry["host_ms"], 1) if entry["host_ms"] else 0.0
        entry["host_ms"], entry["device_ms"] = round(entry["host_ms"], 3), round(entry["device_ms"], 3)
    busy_ms = _busy_us(device_intervals) / 1000
    return {
        "wall_s": round(wall_s, 3),
        "device": {
            "busy_ms": round(busy_ms, 3),
            "busy_pct": round(100 * busy_ms / (wall_s * 1000), 1) if wall_s else 0.0,
            "kernels": sum(kernel_n.values()),
            "copies": {"count": copies["count"], "ms": round(copies["ms"], 3)},
            "top_kernels": _top(kernel_ms, kernel_n, top),
        },
        "runtime": _top(runtime_ms, runtime_n, top),
        "spans": dict(sorted(by_span.items(), key=lambda kv: -kv[1]["host_ms"])),
    }


def device_intervals(events: list[dict]) -> list[tuple[float, float]]:
    """The [start, end) microseconds of a trace's kernels and copies: for the union across processes (one GPU's
    clock, one host's traces)."""
    return [(float(e["ts"]), float(e["ts"]) + float(e.get("dur") or 0.0)) for e in events
            if e.get("ph") == "X" and e.get("cat") in _DEVICE_CATEGORIES]


def shared_busy(traces: list[Path]) -> dict:
    """Several processes' traces of one window on one device -> the device's busy share of the window they share
    (from the latest first event to the earliest last), all processes together and each alone."""
    per: dict[str, list[tuple[float, float]]] = {}
    for path in traces:
        with contextlib.suppress(OSError, ValueError, KeyError):
            per[path.name] = device_intervals(json.loads(path.read_text())["traceEvents"])
    per = {k: v for k, v in per.items() if v}
    if not per:
        return {}
    lo = max(min(s for s, _ in v) for v in per.values())
    hi = min(max(e for _, e in v) for v in per.values())
    if hi <= lo:
        return {}

    def clipped(v):
        return [(max(s, lo), min(e, hi)) for s, e in v if e > lo and s < hi]

    span = hi - lo
    return {"window_ms": round(span / 1000, 3),
            "busy_pct_all": round(100 * _busy_us([i for v in per.values() for i in clipped(v)]) / span, 1),
            "busy_pct_each": {k: round(100 * _busy_us(clipped(v)) / span, 1) for k, v in per.items()}}
