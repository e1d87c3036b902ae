"""Where a round's time goes: durations of named phases (a drafter's wait for its draft, a verifier's queue wait
before a tick...), kept cheaply on the token path and summarized when a server stops.

Each phase keeps a count, a total and its last RESERVOIR durations (for percentiles of the recent past, in bounded
memory). A server logs `summary_line()` when it stops, so a bench run's logs say where its rounds went
(`bench/load_profile.py` prints them): one line, `<prefix> phases: {"phase": {"n": .., "mean_ms": .., "p50_ms":
.., "p90_ms": .., "p99_ms": ..}, ...}`, and counters (`count`) beside them.
"""

from __future__ import annotations

import gc
import json
import time
from collections import deque

RESERVOIR = 8192
LINE_MARK = " phases: "


class PhaseTimes:
    def __init__(self):
        self._durations: dict[str, deque[float]] = {}
        self._totals: dict[str, list[float]] = {}  # phase -> [count, seconds]
        self.counters: dict[str, int] = {}

    def add(self, phase: str, seconds: float) -> None:
        durations = self._durations.get(phase)
        if durations is None:
            durations = self._durations[phase] = deque(maxlen=RESERVOIR)
            self._totals[phase] = [0, 0.0]
        durations.append(seconds)
        total = self._totals[phase]
        total[0] += 1
        total[1] += seconds

    def since(self, phase: str, started: float) -> float:
        """Adds the time from `started` (time.perf_counter) to now; returns now."""
        now = time.perf_counter()
        self.add(phase, now - started)
        return now

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def summary(self) -> dict:
        out: dict = {}
        for phase, durations in self._durations.items():
            ordered = sorted(durations)
            n, seconds = self._totals[phase]

            def pct(q: float) -> float:
                return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

            out[phase] = {"n": n, "mean_ms": round(1000 * seconds / n, 3), "p50_ms": pct(0.5), "p90_ms": pct(0.9),
                          "p99_ms": pct(0.99)}
        if self.counters:
            out["counters"] = dict(self.counters)
        return out

    def summary_line(self, prefix: str) -> str:
        return prefix + LINE_MARK + json.dumps(self.summary(), sort_keys=True)


def read_summaries(text: str) -> dict[str, dict]:
    """The last phases line of each prefix in a log's text: {prefix: summary}."""
    found: dict[str, dict] = {}
    for line in text.splitlines():
        head, mark, body = line.partition(LINE_MARK)
        if not mark:
            continue
        try:
            found[head.rsplit(" ", 1)[-1]] = json.loads(body)
        except ValueError:
            continue
    return found


class CollectionTimes:
    """Times this process's garbage collections into `phases` (gc_gen0 / gc_gen1 / gc_gen2) while installed: a full
    collection stops every thread that needs the GIL, the event loop's included, for as long as it scans."""

    def __init__(self, phases: PhaseTimes):
        self.phases = phases
        self._started = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.phases.since(f"gc_gen{info['generation']}", self._started)

    def __enter__(self) -> CollectionTimes:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

