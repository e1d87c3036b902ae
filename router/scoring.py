"""How the router chooses a verifier: cached prefix against load, conversation affinity, and the policies to
compare against (round-robin, random).

Locality policy, per request:
1. Candidates: verifiers that are up, not failed for this request, and not overloaded (load more than
   `load_slack` above the least-loaded candidate): a hot prefix's holder that is overloaded drops out, so the
   request goes to the next best pod, which then holds the prefix too (the prefix spreads).
2. `session_id` affinity: the pod that served the conversation last, if it is still a candidate.
3. Otherwise the best score, `cache_weight * cached_blocks - load_weight * load`; a cold prompt (no pod holds
   any block) therefore goes to the least-loaded pod. Ties rotate.

`Locator` answers "which pods hold how much of this chain": the shared store when it answers, otherwise
(`mode == "fallback"`) this router's own view (what its own sessions left on each pod, and what the store said
last). It never raises and never waits longer than the store's timeout. This module knows nothing about gRPC.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from specdec.locality import InProcessStore, StoreUnavailable
from specdec.prefix_hash import block_hashes, model_namespace, model_seed

log = logging.getLogger(__name__)

POLICIES = ("locality", "round-robin", "random")
MODE_LOCALITY, MODE_FALLBACK = "locality", "fallback"


@dataclass(frozen=True)
class Weights:
    cache: float = 1.0  # per cached 16-token block
    load: float = 4.0  # per session in flight on the pod
    load_slack: int = 2  # sessions above the least-loaded pod before a pod counts as overloaded


def score(cached_blocks: int, load: int, weights: Weights) -> float:
    return weights.cache * cached_blocks - weights.load * load


class Chooser:
    """Picks one of `candidates` (objects with `.address` and `.in_flight`) under a policy."""

    def __init__(self, policy: str = "locality", weights: Weights = Weights(), affinity_size: int = 100_000,
                 rng: random.Random | None = None):
        if policy not in POLICIES:
            raise ValueError(f"routing policy {policy!r}: use one of {', '.join(POLICIES)}")
        self.policy = policy
        self.weights = weights
        self._affinity: OrderedDict[str, str] = OrderedDict()  # session_id -> verifier address
        self._affinity_size = affinity_size
        self._turn = itertools.count()
        self._rng = rng or random.Random()

    def remember(self, session_id: str, address: str) -> None:
        if not session_id:
            return
        self._affinity[session_id] = address
        self._affinity.move_to_end(session_id)
        while len(self._affinity) > self._affinity_size:
            self._affinity.popitem(last=False)

    def choose(self, candidates: list, cached: dict[str, int], session_id: str = ""):
        if not candidates:
            return None
        if self.policy == "round-robin":
            return candidates[next(self._turn) % len(candidates)]
        if self.policy == "random":
            return self._rng.choice(candidates)
        least = min(p.in_flight for p in candidates)
        fit = [p for p in candidates if p.in_flight <= least + self.weights.load_slack]
        home = self._affinity.get(session_id) if session_id else None
        for pod in fit:
            if pod.address == home:
                return pod
        scores = [score(cached.get(p.address, 0), p.in_flight, self.weights) for p in fit]
        best = max(scores)
        tied = [p for p, s in zip(fit, scores) if s == best]
        return tied[next(self._turn) % len(tied)]


class Locator:
    """The shared store when it answers, this router's own view when it does not.

    `open_store(namespace)` makes the store once the model is known (`bind`), so the router hashes and looks
    up under the identity the verifiers report, never under its own spelling of the model.
    """

    def __init__(self, open_store: Callable[[str], object] | None = None, reap_interval: float = 10.0,
                 view_ttl: float = 600.0, view_blocks: int = 200_000):
        self._open_store = open_store
        self.store = None
        self.seed: bytes | None = None
        self.view = InProcessStore(ttl=view_ttl, max_blocks=view_blocks)
        self.mode = MODE_LOCALITY if open_store is not None else MODE_FALLBACK
        self.reap_interval = reap_interval
        self._reaper: asyncio.Task | None = None

    def bind(self, model_identity: str) -> None:
        if self.seed is not None:
            return
        self.seed = model_seed(model_identity)
        if self._open_store is not None:
            self.store = self._open_store(model_namespace(model_identity))
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="locality-reaper")

    @property
    def shared_store_down(self) -> bool:
        """A shared store is configured but did not answer lately: routing is on load and this router's own view
        (the `load-only` routing mode of the metrics)."""
        return self._open_store is not None and self.mode == MODE_FALLBACK

    def hashes(self, token_ids: list[int], max_tokens: int | None = None) -> list[str]:
        return block_hashes(token_ids, self.seed, max_tokens) if self.seed is not None else []

    async def lookup(self, hashes: list[str]) -> dict[str, int]:
        if not hashes:
            return {}
        if self.store is not None:
            try:
                cached = await self.store.lookup(hashes)
                self._set_mode(MODE_LOCALITY)
                return cached
            except StoreUnavailable:
                self._set_mode(MODE_FALLBACK)
        return await self.view.lookup(hashes)

    def learned(self, pod: str, hashes: list[str]) -> None:
        """What a finished session left on pod (its full blocks), for when the store is out of reach."""
        if hashes:
            self.view.publish_now(pod, hashes, [])

    async def aclose(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        if self.store is not None:
            await self.store.aclose()

    async def _reap(self) -> None:
        """Pods that stopped heartbeating leave the store even when no other pod is left to notice."""
        while True:
            await asyncio.sleep(self.reap_interval)
            try:
                if await self.store.reap():
                    log.info("reaped pods whose locality heartbeat expired")
                self._set_mode(MODE_LOCALITY)  # the store answers again, even if no lookup has run since
            except StoreUnavailable:
                self._set_mode(MODE_FALLBACK)

    def _set_mode(self, mode: str) -> None:
        if mode != self.mode:
            log.info("routing mode: %s", mode)
            self.mode = mode
