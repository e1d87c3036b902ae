"""The locality store: which pods hold which prefix blocks. One small interface, two implementations.

- `InProcessStore`: dicts in this process (all-in-one mode, and the router's own fallback view).
- `RedisStore`: shared by every pod and router of a fleet, through redis-py asyncio and three Lua scripts
  (each one round trip, clock = the Redis server's TIME so pods' clocks never matter). Layout, all keys under
  `specdec:{<model tag>}:` (the hash tag keeps one model's keys in one cluster slot; the tag is derived from the
  model identity, so models never share keys):
    blk:<block hash>  ZSET  pod -> expiry (ms)   who holds the block; PEXPIRE ttl, refreshed while held
    pod:<pod>         SET   block hashes          reverse index: cleanup of a pod without SCAN; PEXPIRE ttl
    pods              ZSET  pod -> expiry (ms)   heartbeats; a pod past its expiry is reaped by anyone
  Lookup walks a prompt's chain and stops at the first block no live pod holds.

`Publisher` runs on each verifier: the prefix cache reports gained and lost blocks from the torch thread; a
background task sends them in batches and re-sends the whole held set every ttl/3 (the heartbeat, which also
rebuilds Redis after a restart). Nothing here is on the token path.

`Breaker` guards RedisStore: short timeouts; after consecutive failures every call fails at once (callers route
on load and their own view) until a probe succeeds. It logs once per outage.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from typing import Protocol

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """The store did not answer in time, or its breaker is open; the caller goes on without it."""


class LocalityStore(Protocol):
    async def publish(self, pod: str, gained: list[str], lost: list[str], replace: bool = False) -> None:
        """Records blocks gained and lost by pod (replace: `gained` is everything it holds) and its heartbeat."""

    async def lookup(self, hashes: list[str]) -> dict[str, int]:
        """pod -> how many leading blocks of the chain `hashes` it holds (live pods only)."""

    async def remove_pod(self, pod: str) -> None:
        """Forgets everything pod holds (shutdown)."""

    async def reap(self) -> int:
        """Removes pods whose heartbeat expired; returns how many."""

    async def aclose(self) -> None: ...


def leading_counts(holders: list[list[str]]) -> dict[str, int]:
    """holders[i] = pods holding block i -> pod -> blocks held from block 0 without a gap."""
    counts: dict[str, int] = {}
    alive = set(holders[0]) if holders else set()
    for i, pods in enumerate(holders):
        alive &= set(pods)
        for pod in alive:
            counts[pod] = i + 1
    return counts


class InProcessStore:
    """The same semantics in this process: block -> {pod: expiry}, a reverse index, heartbeats, LRU-bounded."""

    def __init__(self, ttl: float = 30.0, max_blocks: int = 1_000_000):
        self.ttl = ttl
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._by_pod: dict[str, set[str]] = {}
        self._pods: dict[str, float] = {}

    async def publish(self, pod: str, gained: list[str], lost: list[str], replace: bool = False) -> None:
        self.publish_now(pod, gained, lost, replace)

    def publish_now(self, pod: str, gained: list[str], lost: list[str], replace: bool = False) -> None:
        expiry = time.monotonic() + self.ttl
        held = self._by_pod.setdefault(pod, set())
        if replace:
            lost = [h for h in held if h not in set(gained)]
        for h in lost:
            self._blocks.get(h, {}).pop(pod, None)
            held.discard(h)
        for h in gained:
            self._blocks.setdefault(h, {})[pod] = expiry
            self._blocks.move_to_end(h)
            held.add(h)
        while len(self._blocks) > self.max_blocks:
            h, pods = self._blocks.popitem(last=False)
            for p in pods:
                self._by_pod.get(p, set()).discard(h)
        self._pods[pod] = expiry

    async def lookup(self, hashes: list[str]) -> dict[str, int]:
        now, holders = time.monotonic(), []
        for h in hashes:
            pods = [p for p, expiry in self._blocks.get(h, {}).items() if expiry >= now]
            if not pods:
                break
            holders.append(pods)
        return leading_counts(holders)

    async def remove_pod(self, pod: str) -> None:
        for h in self._by_pod.pop(pod, set()):
            pods = self._blocks.get(h)
            if pods is not None:
                pods.pop(pod, None)
                if not pods:
                    del self._blocks[h]
        self._pods.pop(pod, None)

    async def reap(self) -> int:
        now = time.monotonic()
        dead = [p for p, expiry in self._pods.items() if expiry < now]
        for pod in dead:
            await self.remove_pod(pod)
        return len(dead)

    async def aclose(self) -> None:
        """An in-process store holds no connection to close."""


class Breaker:
    """Closed: calls go through. Open after `failures` consecutive failures: calls fail at once, except one probe
    every `reset_after` seconds; a probe that succeeds closes it."""

    def __init__(self, name: str, failures: int = 3, reset_after: float = 1.0):
        self.name = name
        self.failures = failures
        self.reset_after = reset_after
        self._count = 0
        self._retry_at: float | None = None  # set while open

    @property
    def open(self) -> bool:
        return self._retry_at is not None

    def allow(self) -> bool:
        if self._retry_at is None:
            return True
        now = time.monotonic()
        if now >= self._retry_at:
            self._retry_at = now + self.reset_after  # one probe per period
            return True
        return False

    def success(self) -> None:
        if self._retry_at is not None:
            log.info("%s answers again: locality hints back in use", self.name)
        self._count, self._retry_at = 0, None

    def failure(self, exc: BaseException) -> None:
        self._count += 1
        if self._retry_at is None and self._count >= self.failures:
            self._retry_at = time.monotonic() + self.reset_after
            log.warning("%s failing (%s: %s); routing on load and local view until it answers",
                        self.name, type(exc).__name__, exc)


_PUBLISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pod, ttl, ngained, prefix = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local expiry = now + ttl
if ARGV[5] == '1' then
  local held = {}
  for i = 6, 5 + ngained do held[ARGV[i]] = true end
  for _, h in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    if not held[h] then
      redis.call('ZREM', prefix .. 'blk:' .. h, pod)
      redis.call('SREM', KEYS[2], h)
    end
  end
end
for i = 3, #KEYS do
  local h = ARGV[i + 3]
  if i - 2 <= ngained then
    redis.call('ZADD', KEYS[i], expiry, pod)
    redis.call('PEXPIRE', KEYS[i], ttl)
    redis.call('SADD', KEYS[2], h)
  else
    redis.call('ZREM', KEYS[i], pod)
    redis.call('SREM', KEYS[2], h)
  end
end
redis.call('ZADD', KEYS[1], expiry, pod)
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"""

_LOOKUP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  local pods = redis.call('ZRANGE', key, now, '+inf', 'BYSCORE')
  if #pods == 0 then break end
  out[i] = pods
end
return out
"""

_REMOVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = ARGV[1]
local victims
if ARGV[2] ~= '' then victims = {ARGV[2]} else
  victims = redis.call('ZRANGE', KEYS[1], '-inf', '(' .. now, 'BYSCORE') end
for _, pod in ipairs(victims) do
  local rev = prefix .. 'pod:' .. pod
  for _, h in ipairs(redis.call('SMEMBERS', rev)) do redis.call('ZREM', prefix .. 'blk:' .. h, pod) end
  redis.call('DEL', rev)
  redis.call('ZREM', KEYS[1], pod)
end
return #victims
"""


class RedisStore:
    """The fleet's shared store in Redis; every call is one round trip under `timeout` seconds, or fails fast."""

    def __init__(self, url: str, namespace: str, ttl: float = 30.0, timeout: float = 0.05,
                 breaker: Breaker | None = None):
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No retries inside redis-py: a retry with backoff is exactly the multi-second wait this must not do.
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                              retry=Retry(NoBackoff(), 0), decode_responses=True)
        self.prefix = f"specdec:{{{namespace}}}:"
        self.ttl = ttl
        self.timeout = timeout
        self.breaker = breaker or Breaker(f"redis {url}")
        self._publish = self._redis.register_script(_PUBLISH)
        self._lookup = self._redis.register_script(_LOOKUP)
        self._remove = self._redis.register_script(_REMOVE)

    def key(self, kind: str, name: str = "") -> str:
        return self.prefix + kind + (f":{name}" if name else "")

    async def _guarded(self, coro_fn):
        if not self.breaker.allow():
            raise StoreUnavailable("the locality store's breaker is open")
        try:
            # A fresh connection after an outage needs a connect and (first time) a script load: two timeouts.
            result = await asyncio.wait_for(coro_fn(), 2 * self.timeout)
        except Exception as exc:  # redis, socket and timeout errors alike: the store is unusable now
            self.breaker.failure(exc)
            raise StoreUnavailable(str(exc) or type(exc).__name__) from None
        self.breaker.success()
        return result

    async def publish(self, pod: str, gained: list[str], lost: list[str], replace: bool = False) -> None:
        hashes = [*gained, *lost]
        keys = [self.key("pods"), self.key("pod", pod), *(self.key("blk", h) for h in hashes)]
        args = [pod, int(self.ttl * 1000), len(gained), self.prefix, "1" if replace else "0", *hashes]
        await self._guarded(lambda: self._publish(keys=keys, args=args))

    async def lookup(self, hashes: list[str]) -> dict[str, int]:
        if not hashes:
            return {}
        holders = await self._guarded(lambda: self._lookup(keys=[self.key("blk", h) for h in hashes]))
        return leading_counts(holders)

    async def remove_pod(self, pod: str) -> None:
        await self._guarded(lambda: self._remove(keys=[self.key("pods")], args=[self.prefix, pod]))

    async def reap(self) -> int:
        return int(await self._guarded(lambda: self._remove(keys=[self.key("pods")], args=[self.prefix, ""])))

    async def aclose(self) -> None:
        await self._redis.aclose()


class Publisher:
    """A verifier's side: batches the prefix cache's changes and heartbeats its whole held set to the store."""

    def __init__(self, store, pod: str, ttl: float = 30.0, flush_interval: float = 0.05,
                 max_batch: int = 512):
        self.store = store
        self.pod = pod
        self.heartbeat = ttl / 3
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self._lock = threading.Lock()  # changes arrive from the torch thread
        self._held: set[str] = set()
        self._gained: set[str] = set()
        self._lost: set[str] = set()
        self._resync = True  # the first contact, and the first after an outage, sends everything
        self._task: asyncio.Task | None = None

    def changed(self, gained: list[str], lost: list[str]) -> None:
        """Called by the prefix cache, from any thread; never blocks on the store."""
        with self._lock:
            for h in lost:
                self._held.discard(h)
                self._gained.discard(h)
                self._lost.add(h)
            for h in gained:
                self._held.add(h)
                self._lost.discard(h)
                self._gained.add(h)

    async def start(self) -> None:
        try:
            await self.store.remove_pod(self.pod)  # whatever a previous incarnation at this address left
        except StoreUnavailable:
            pass
        self._task = asyncio.get_running_loop().create_task(self._run(), name="locality-publisher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        try:
            await self.store.remove_pod(self.pod)
        except StoreUnavailable:
            log.warning("could not remove %s from the locality store; its entries expire by TTL", self.pod)

    async def flush(self, full: bool = False) -> None:
        with self._lock:
            if full or self._resync:
                gained, lost, replace = list(self._held), [], True
            else:
                gained, lost, replace = list(self._gained)[: self.max_batch], list(self._lost)[: self.max_batch], False
            self._gained.difference_update(gained)
            self._lost.difference_update(lost)
            if replace:
                self._gained.clear()
                self._lost.clear()
        try:
            await self.store.publish(self.pod, gained, lost, replace)
            self._resync = False
        except StoreUnavailable:
            self._resync = True  # what was lost meanwhile is corrected by the full set

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time()
        while True:
            await asyncio.sleep(self.flush_interval)
            beat = loop.time() >= next_beat
            if beat or self._resync or self._gained or self._lost:
                await self.flush(full=beat)
            if beat:
                next_beat = loop.time() + self.heartbeat
                try:
                    await self.store.reap()
                except StoreUnavailable:
                    pass
