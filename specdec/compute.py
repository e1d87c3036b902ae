"""The one thread per process that runs all torch work (model loading, forward passes, sampling).

Why one: OpenMP gives every thread that calls into torch its own team of worker threads, and two teams on the
same cores spin against each other. Measured on 2 CPU cores with the default target: a decode step takes 38 ms
when one thread does all torch work and 53 ms once a second thread has run a parallel op. The event loop stays
free for gRPC; torch work queues here, in order.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

_EXECUTOR = ThreadPoolExecutor(1, thread_name_prefix="torch")


async def run(fn, *args):
    """Runs fn(*args) on the torch thread without blocking the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_EXECUTOR, fn, *args)


async def run_timed(phases, name: str, fn, *args):
    """`run`, adding to phases (specdec.phases.PhaseTimes) where its time went: `name`_wait queued behind other work
    of the torch thread, `name`_thread fn itself, `name`_resume from fn's end until the event loop resumed the
    caller (the loop's own backlog)."""
    submitted = time.perf_counter()
    marks: list[float] = []

    def timed():
        marks.append(time.perf_counter())
        try:
            return fn(*args)
        finally:
            marks.append(time.perf_counter())

    try:
        return await run(timed)
    finally:
        if len(marks) == 2:
            phases.add(f"{name}_wait", marks[0] - submitted)
            phases.add(f"{name}_thread", marks[1] - marks[0])
            phases.since(f"{name}_resume", marks[1])


def call(fn, *args):
    """Runs fn(*args) on the torch thread and waits (startup work such as loading a model)."""
    return _EXECUTOR.submit(fn, *args).result()


def cpu_limit(cpu_max: str | None = None) -> int:
    """CPUs this process may use: the cgroup v2 quota (a container's CPU limit) when there is one, else the CPUs
    it may run on. `cpu_max`: the text of /sys/fs/cgroup/cpu.max (read from there when None)."""
    import math
    import os

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpu_max is None:
        try:
            with open("/sys/fs/cgroup/cpu.max") as f:
                cpu_max = f.read()
        except OSError:
            return available
    quota, _, period = cpu_max.strip().partition(" ")
    if quota == "max" or not period:
        return available
    return max(1, min(available, math.ceil(int(quota) / int(period))))


# A process whose passes run on a GPU does little CPU math (packing inputs, small host tensors), and a wide OpenMP
# team spins around each such op: on a 16-core H200 host at 64 users, 2 threads instead of 16 cut the verifier's
# and drafter's CPU time per token ~5x and raised throughput 7-9% (docs/benchmarks.md, tenth session).
GPU_SERVING_THREADS = 2


def set_threads(threads: int | None = None, gpu: bool = False) -> int:
    """Sizes the torch thread's OpenMP team: `threads`, else OMP_NUM_THREADS, else the CPU limit (at most
    GPU_SERVING_THREADS when the process's passes run on a GPU). PyTorch's default is every core of the host, and a
    team larger than a container's CPU quota spins against itself (docs/locality.md: four verifiers on 2 cores,
    2 threads each against 1, aggregate 3.1 against 19.9 tokens/s)."""
    import os

    import torch

    threads = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or (
        min(cpu_limit(), GPU_SERVING_THREADS) if gpu else cpu_limit())
    call(torch.set_num_threads, threads)
    return threads
