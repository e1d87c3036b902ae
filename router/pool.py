"""A tier's pods as the router sees them: address, sessions in flight, and whether they answered lately.

Picking is least-loaded (sessions in flight), ties broken in rotation so equal pods share work. A pod that fails
is skipped for `cooldown` seconds, then tried again. `watch` checks every pod's grpc.health.v1 status in the
background, so a pod that died or is draining leaves routing within a second, before a request trips on it.

The set of pods may change while the router runs (`add`, `remove`, `set_addresses`; router.discovery calls them
from Kubernetes): a removed pod leaves routing at once, but its channel stays open until the sessions already on
it have finished, so they are never cut by the router itself. This module does not know where addresses come
from.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.server import CHANNEL_OPTIONS

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Pod:
    address: str
    channel: grpc.aio.Channel
    in_flight: int = 0
    down_until: float = 0.0
    slow_checks: int = 0  # health checks in a row that timed out
    checking: bool = False  # a health check is using the channel: do not close it under the check
    removed: bool = False  # out of the pool; the channel closes once nothing uses it

    @property
    def up(self) -> bool:
        return time.monotonic() >= self.down_until


class Pool:
    def __init__(self, addresses: Iterable[str] = (), cooldown: float = 5.0, name: str = "pod",
                 origin: str = "the configured addresses", linger: float = 0.5):
        """`name` (e.g. "verifier") and `origin` (where addresses come from) are for log lines and error
        messages; `linger` is how often a removed pod is checked for sessions still on it."""
        self.name = name
        self.origin = origin
        self.cooldown = cooldown
        self.linger = linger
        # Replaced on every change, never mutated in place: code that awaits while iterating over a snapshot
        # (the health watch, the router's model-info lookup) never sees the list change under it.
        self.pods: list[Pod] = []
        self._leaving: dict[str, Pod] = {}  # removed pods whose channel is still open
        self._closers: set[asyncio.Task] = set()
        self._turn = itertools.count()
        for address in addresses:
            self.add(address)

    def __bool__(self) -> bool:
        return bool(self.pods)

    def __len__(self) -> int:
        return len(self.pods)

    @property
    def addresses(self) -> list[str]:
        return [p.address for p in self.pods]

    def add(self, address: str) -> bool:
        """Puts `address` into routing; False if it was there already."""
        if any(p.address == address for p in self.pods):
            return False
        pod = self._leaving.pop(address, None)
        if pod is not None:
            pod.removed = False  # back before its channel closed: keep it, and its count of sessions in flight
        else:
            pod = Pod(address, grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
        self.pods = [*self.pods, pod]
        log.info("%s %s joined (%d in the pool)", self.name, address, len(self.pods))
        return True

    def remove(self, address: str) -> bool:
        """Takes `address` out of routing; sessions on it finish before its channel closes. False if unknown."""
        pod = next((p for p in self.pods if p.address == address), None)
        if pod is None:
            return False
        self.pods = [p for p in self.pods if p is not pod]
        pod.removed = True
        self._leaving[address] = pod
        task = asyncio.get_running_loop().create_task(self._close_when_idle(pod), name=f"close-{address}")
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)
        log.info("%s %s left (%d in the pool, %d sessions still on it)", self.name, address, len(self.pods),
                 pod.in_flight)
        return True

    def set_addresses(self, addresses: Iterable[str]) -> None:
        """Makes the pool exactly `addresses`: new ones join, missing ones leave."""
        wanted = dict.fromkeys(addresses)
        for address in [p.address for p in self.pods if p.address not in wanted]:
            self.remove(address)
        for address in wanted:
            self.add(address)

    async def _close_when_idle(self, pod: Pod) -> None:
        while pod.in_flight > 0 or pod.checking:
            await asyncio.sleep(self.linger)
        if self._leaving.get(pod.address) is not pod:
            return  # it came back into the pool, or another closer already took it
        del self._leaving[pod.address]
        await pod.channel.close()

    async def aclose(self) -> None:
        """Closes every channel (router shutdown)."""
        for task in list(self._closers):
            task.cancel()
        pods, self.pods = [*self.pods, *self._leaving.values()], []
        self._leaving.clear()
        await asyncio.gather(*(p.channel.close() for p in pods), return_exceptions=True)

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
        if pod.removed:
            return
        pod.checking = True
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
        finally:
            pod.checking = False
        if not serving:
            if pod.up and not pod.removed:
                log.warning("%s is not serving; routing around it", pod.address)
            pod.down_until = time.monotonic() + self.cooldown
        elif not pod.up and pod.slow_checks == 0:
            log.info("%s is serving again", pod.address)
            pod.down_until = 0.0
