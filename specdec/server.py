"""What every specdec server shares: grpc.health.v1, reflection, and draining on SIGTERM.

`GrpcServer` wraps one grpc.aio server. On SIGTERM (or `drain()`), health turns NOT_SERVING so load balancers
and readiness probes stop sending work, the tier's `on_drain` hook makes its servicers refuse new sessions with
UNAVAILABLE, and the server keeps listening until the sessions in flight have finished or `grace` seconds have
passed; then it stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specdec import device_trace
from specdec.phases import CollectionTimes, PhaseTimes

log = logging.getLogger(__name__)

# Candidate blocks and verdicts are small, but prompts sent as token ids can be long.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Long-lived drafter<->verifier streams cross idle periods; keepalives notice a dead peer in seconds.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
CHANNEL_OPTIONS = SERVER_OPTIONS


class GrpcServer:
    def __init__(self, name: str, host: str, port: int, grace: float = 30.0):
        self.name = name
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"{name}: cannot listen on {host}:{port} (in use?)")
        self.address = f"{host}:{self.port}"
        self.grace = grace
        self._service_names: list[str] = []
        self._on_drain: list[Callable[[], None]] = []
        self._in_flight: list[Callable[[], int]] = []
        self._on_stop: list[Callable[[], object]] = []
        self._stopped = asyncio.Event()

    def add(
        self,
        add_fn,
        servicer,
        service_name: str,
        on_drain: Callable[[], None] | None = None,
        in_flight: Callable[[], int] | None = None,
        on_stop: Callable[[], object] | None = None,
    ) -> None:
        """Registers a servicer; `on_drain` makes it refuse new sessions, `in_flight` counts those still running,
        `on_stop` (sync or async) releases what it holds once the server has stopped."""
        add_fn(servicer, self.server)
        self._service_names.append(service_name)
        if on_drain:
            self._on_drain.append(on_drain)
        if in_flight:
            self._in_flight.append(in_flight)
        if on_stop:
            self._on_stop.append(on_stop)

    async def start(self) -> None:
        names = [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        await self.server.start()
        for name in ["", *self._service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s listening on %s", self.name, self.address)

    async def drain(self) -> None:
        if self._stopped.is_set():
            return
        log.info("%s draining: no new sessions, %.0f s for those in flight", self.name, self.grace)
        await self.health.enter_graceful_shutdown()
        for hook in self._on_drain:
            hook()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        while loop.time() < deadline and sum(count() for count in self._in_flight) > 0:
            await asyncio.sleep(0.1)
        await self.server.stop(min(1.0, self.grace))
        for hook in self._on_stop:
            result = hook()
            if asyncio.iscoroutine(result):
                await result
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


async def run_servers(servers: list[GrpcServer]) -> None:
    """Starts the servers, then drains them all on SIGTERM or SIGINT and returns when they have stopped; SIGUSR1
    captures a device trace (specdec.device_trace). The garbage collections while serving are timed and logged at
    the stop (a full one over torch's ~200k objects takes ~100 ms on a 2-core CPU; serving's objects mostly die by
    reference count: on a CPU at 16 sessions, 3-5 young collections in ~1,700 rounds a process)."""
    loop = asyncio.get_running_loop()
    for s in servers:
        await s.start()
    collections = PhaseTimes()
    with CollectionTimes(collections):
        await _serve(servers, loop)
    log.info(collections.summary_line("+".join(s.name for s in servers) + "-gc"))


async def _serve(servers: list[GrpcServer], loop) -> None:
    def on_signal():
        for s in servers:
            loop.create_task(s.drain())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    device_trace.install("+".join(s.name for s in servers))
    await asyncio.gather(*(s.wait() for s in servers))
