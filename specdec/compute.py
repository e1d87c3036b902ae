"""The one thread per process that runs all torch work (model loading, forward passes, sampling).

Why one: OpenMP gives every thread that calls into torch its own team of worker threads, and two teams on the
same cores spin against each other. Measured on 2 CPU cores with the default target: a decode step takes 38 ms
when one thread does all torch work and 53 ms once a second thread has run a parallel op. The event loop stays
free for gRPC; torch work queues here, in order.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

_EXECUTOR = ThreadPoolExecutor(1, thread_name_prefix="torch")


async def run(fn, *args):
    """Runs fn(*args) on the torch thread without blocking the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_EXECUTOR, fn, *args)


def call(fn, *args):
    """Runs fn(*args) on the torch thread and waits (startup work such as loading a model)."""
    return _EXECUTOR.submit(fn, *args).result()
