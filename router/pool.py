"""A tier's pods as the router sees them: address, sessions in flight, and whether they answered lately.

Picking is least-loaded (sessions in flight), ties broken in rotation so equal pods share work. A pod that fails
is skipped for `cooldown` seconds, then tried again. `watch` checks every pod's grpc.health.v1 status in the
background, so a pod that died or is draining leaves routing within a second, before a request trips on it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.server import CHANNEL_OPTIONS

log = logging.getLogger(__name__)


@dataclass
class Pod:
    address: str
    channel: grpc.aio.Channel
    in_flight: int = 0
    down_until: float = 0.0
    slow_checks: int = 0  # health checks in a row that timed out

    @property
    def up(self) -> bool:
        return time.monotonic() >= self.down_until


class Pool:
    def __init__(self, addresses: list[str], cooldown: float = 5.0):
        self.pods = [Pod(a, grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS)) for a in dict.fromkeys(addresses)]
        self.cooldown = cooldown
        self._turn = itertools.count()

    def __bool__(self) -> bool:
        return bool(self.pods)

    def candidates(self, exclude: set[str] = frozenset()) -> list[Pod]:
        """Pods that are up and not excluded (the verifier choice is router.scoring's)."""
        return [p for p in self.pods if p.up and p.address not in exclude]

    def pick(self, exclude: set[str] = frozenset()) -> Pod | None:
        candidates = self.candidates(exclude)
        if not candidates:
            return None
        least = min(p.in_flight for p in candidates)
        tied = [p for p in candidates if p.in_flight == least]
        return tied[next(self._turn) % len(tied)]

    def mark_down(self, pod: Pod) -> None:
        pod.down_until = time.monotonic() + self.cooldown

    async def watch(self, interval: float = 1.0, timeout: float = 1.0) -> None:
        """Runs until cancelled: marks down pods that are gone or not SERVING, brings back those that are."""
        while True:
            await asyncio.sleep(interval)
            await asyncio.gather(*(self._check(pod, timeout) for pod in self.pods))

    async def _check(self, pod: Pod, timeout: float) -> None:
        try:
            reply = await health_pb2_grpc.HealthStub(pod.channel).Check(health_pb2.HealthCheckRequest(),
                                                                          timeout=timeout)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError as exc:
            # A slow answer is a busy pod, not a dead one: only a refused connection (or three slow answers in
            # a row) takes it out of routing.
            pod.slow_checks = pod.slow_checks + 1 if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else 3
            serving = pod.slow_checks < 3
        else:
            pod.slow_checks = 0
        if not serving:
            if pod.up:
                log.warning("%s is not serving; routing around it", pod.address)
            pod.down_until = time.monotonic() + self.cooldown
        elif not pod.up and pod.slow_checks == 0:
            log.info("%s is serving again", pod.address)
            pod.down_until = 0.0
