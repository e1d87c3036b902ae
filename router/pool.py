"""A tier's pods as the router sees them: address, sessions in flight, and whether they answered lately.

Picking is least-loaded (sessions in flight), ties broken in rotation so equal pods share work. A pod that fails
is skipped for `cooldown` seconds, then tried again.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import grpc

from specdec.server import CHANNEL_OPTIONS


@dataclass
class Pod:
    address: str
    channel: grpc.aio.Channel
    in_flight: int = 0
    down_until: float = 0.0

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

    def pick(self, exclude: set[str] = frozenset()) -> Pod | None:
        candidates = [p for p in self.pods if p.up and p.address not in exclude]
        if not candidates:
            return None
        least = min(p.in_flight for p in candidates)
        tied = [p for p in candidates if p.in_flight == least]
        return tied[next(self._turn) % len(tied)]

    def mark_down(self, pod: Pod) -> None:
        pod.down_until = time.monotonic() + self.cooldown

    async def aclose(self) -> None:
        for pod in self.pods:
            await pod.channel.close()
