"""The locality store against a real redis-server (and the in-process store, same contract), the circuit
breaker around Redis, the publisher's batching and resync, and the router's choice of verifier."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest
import redis

from router.scoring import MODE_FALLBACK, MODE_LOCALITY, Chooser, Locator, Weights
from specdec.launch import free_port
from specdec.locality import Breaker, InProcessStore, Publisher, RedisStore, StoreUnavailable
from specdec.prefix_hash import block_hashes, model_namespace, model_seed

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
CHAIN = block_hashes(list(range(16 * 5)), model_seed("m"))  # five blocks


class RedisServer:
    """A real redis-server on a loopback port: no persistence, nothing on disk; restartable on the same port."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        if not os.path.exists(REDIS_SERVER):
            pytest.fail("redis-server is not installed: apt-get install redis-server")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


def run(coro):
    return asyncio.run(coro)


def _stores(kind: str, redis_server, ttl: float = 30.0, namespace: str = "ns"):
    if kind == "redis":
        return RedisStore(redis_server.url, namespace, ttl=ttl, timeout=0.5)
    return InProcessStore(ttl=ttl)


@pytest.fixture(params=["redis", "in-process"])
def kind(request):
    return request.param


def test_lookup_counts_each_pods_leading_blocks_and_stops_at_the_first_miss(kind, redis_server):
    async def main():
        store = _stores(kind, redis_server)
        await store.publish("a:1", CHAIN[:3], [])
        await store.publish("b:1", CHAIN[:1], [])
        await store.publish("c:1", [CHAIN[0], CHAIN[2], CHAIN[3]], [])  # a gap at block 1
        got = await store.lookup(CHAIN)
        await store.publish("a:1", [], [CHAIN[1]])  # lost: a's chain now ends after block 0
        after = await store.lookup(CHAIN)
        none = await store.lookup(CHAIN[1:])  # nobody holds block 1 any more: nothing after it counts
        await store.aclose()
        return got, after, none

    got, after, none = run(main())
    assert got == {"a:1": 3, "b:1": 1, "c:1": 1}
    assert after == {"a:1": 1, "b:1": 1, "c:1": 1}
    assert none == {}


def test_entries_expire_without_heartbeat_and_refresh_while_held(kind, redis_server):
    async def main():
        store = _stores(kind, redis_server, ttl=0.4)
        await store.publish("a:1", CHAIN[:2], [])
        await store.publish("b:1", CHAIN[:2], [])
        for _ in range(4):  # a keeps refreshing (the heartbeat), b does not
            await asyncio.sleep(0.15)
            await store.publish("a:1", CHAIN[:2], [], replace=True)
        got = await store.lookup(CHAIN)
        await store.aclose()
        return got

    assert run(main()) == {"a:1": 2}


def test_redis_keys_carry_ttls_and_a_reverse_index_per_pod(redis_server):
    async def main():
        store = RedisStore(redis_server.url, model_namespace("m"), ttl=5)
        await store.publish("a:1", CHAIN[:2], [])
        await store.aclose()
        return store

    store = run(main())
    r = redis_server.client()
    block = store.key("blk", CHAIN[0])
    assert block.startswith(f"specdec:{{{model_namespace('m')}}}:blk:")
    assert r.zrange(block, 0, -1) == ["a:1"]
    assert 0 < r.pttl(block) <= 5000
    assert r.smembers(store.key("pod", "a:1")) == set(CHAIN[:2])
    assert 0 < r.pttl(store.key("pod", "a:1")) <= 5000
    assert r.zscore(store.key("pods"), "a:1") is not None


def test_models_never_see_each_others_entries(redis_server):
    async def main():
        one, two = (RedisStore(redis_server.url, model_namespace(m)) for m in ("m1", "m2"))
        await one.publish("a:1", CHAIN[:2], [])
        got = await one.lookup(CHAIN), await two.lookup(CHAIN)
        await one.aclose(), await two.aclose()
        return got

    assert run(main()) == ({"a:1": 2}, {})


def test_a_leaving_pod_is_cleaned_by_its_reverse_index_and_a_dead_one_is_reaped(kind, redis_server):
    async def main():
        store = _stores(kind, redis_server, ttl=0.3)
        await store.publish("a:1", CHAIN[:3], [])
        await store.publish("b:1", CHAIN[:3], [])
        await store.remove_pod("a:1")  # shutdown
        left = await store.lookup(CHAIN)
        await asyncio.sleep(0.4)  # b missed its heartbeats
        reaped = await store.reap()
        await store.aclose()
        return left, reaped

    left, reaped = run(main())
    assert left == {"b:1": 3}
    assert reaped == 1
    if kind == "redis":
        r = redis_server.client()
        assert r.keys("specdec:*") == []  # nothing left behind: no block keys, no reverse index, no heartbeat


def test_replace_drops_what_the_pod_no_longer_holds(kind, redis_server):
    async def main():
        store = _stores(kind, redis_server)
        await store.publish("a:1", CHAIN[:4], [])
        await store.publish("a:1", CHAIN[:2], [], replace=True)
        got = await store.lookup(CHAIN)
        await store.aclose()
        return got

    assert run(main()) == {"a:1": 2}


def test_breaker_fails_fast_while_redis_is_down_and_closes_when_it_returns():
    server = RedisServer().start()

    async def main():
        store = RedisStore(server.url, "ns", timeout=0.05, breaker=Breaker("redis", failures=2, reset_after=0.3))
        await store.publish("a:1", CHAIN[:2], [])
        server.stop()
        times = []
        for _ in range(20):
            t = time.perf_counter()
            with pytest.raises(StoreUnavailable):
                await store.lookup(CHAIN)
            times.append(time.perf_counter() - t)
        opened = store.breaker.open
        server.start()  # an empty Redis on the same port
        await asyncio.sleep(0.35)
        await store.publish("a:1", CHAIN[:1], [])  # the probe
        got = await store.lookup(CHAIN)
        await store.aclose()
        return times, opened, store.breaker.open, got

    try:
        times, opened, still_open, got = run(main())
    finally:
        server.stop()
    assert opened and not still_open
    assert max(times) < 0.25  # never seconds, even while it was failing
    assert sorted(times)[10] < 0.005  # once open, calls fail at once without touching the network
    assert got == {"a:1": 1}


def test_publisher_batches_changes_and_resyncs_an_emptied_redis():
    server = RedisServer().start()

    async def main():
        store = RedisStore(server.url, "ns", ttl=0.9, timeout=0.05, breaker=Breaker("redis", 1, 0.1))
        pub = Publisher(store, "v:1", ttl=0.9, flush_interval=0.02)
        await pub.start()
        pub.changed(CHAIN[:3], [])
        pub.changed([], [CHAIN[2]])
        await asyncio.sleep(0.1)
        first = await store.lookup(CHAIN)
        server.stop()
        pub.changed([CHAIN[2]], [])  # gained while Redis is down
        await asyncio.sleep(0.2)
        server.start()  # back, and empty
        await asyncio.sleep(0.5)
        back = await store.lookup(CHAIN)
        await pub.stop()
        gone = await store.lookup(CHAIN)
        await store.aclose()
        return first, back, gone

    try:
        first, back, gone = run(main())
    finally:
        server.stop()
    assert first == {"v:1": 2}
    assert back == {"v:1": 3}
    assert gone == {}


@dataclass
class FakePod:
    address: str
    in_flight: int = 0


def test_a_cold_prompt_goes_to_the_least_loaded_pod():
    pods = [FakePod("a", 3), FakePod("b", 1), FakePod("c", 2)]
    assert Chooser().choose(pods, {}).address == "b"


def test_a_hot_prefix_goes_to_its_holder_and_spreads_when_the_holder_is_overloaded():
    chooser = Chooser(weights=Weights(cache=1.0, load=4.0, load_slack=2))
    a, b = FakePod("a", 1), FakePod("b", 0)
    assert chooser.choose([a, b], {"a": 20}).address == "a"  # 20 blocks outweigh one more session
    a.in_flight = 3  # more than load_slack above b: overloaded
    assert chooser.choose([a, b], {"a": 20}).address == "b"
    assert chooser.choose([a, b], {"a": 20, "b": 20}).address == "b"  # now both hold it: the lighter one
    a.in_flight = 1
    assert chooser.choose([a, b], {"a": 1}).address == "b"  # one block is not worth a busier pod


def test_session_affinity_holds_while_the_pod_is_a_candidate():
    chooser = Chooser()
    a, b = FakePod("a", 1), FakePod("b", 0)
    chooser.remember("conv-1", "a")
    assert chooser.choose([a, b], {}, "conv-1").address == "a"
    assert chooser.choose([b], {}, "conv-1").address == "b"  # a is down
    a.in_flight = 5
    assert chooser.choose([a, b], {}, "conv-1").address == "b"  # a is overloaded


def test_baseline_policies_ignore_cache_and_load():
    pods = [FakePod("a", 0), FakePod("b", 9)]
    rr = Chooser("round-robin")
    assert [rr.choose(pods, {"a": 50}).address for _ in range(4)] == ["a", "b", "a", "b"]
    rnd = Chooser("random", rng=random.Random(1))
    assert {rnd.choose(pods, {"a": 50}).address for _ in range(20)} == {"a", "b"}
    with pytest.raises(ValueError):
        Chooser("nearest")


def test_locator_falls_back_to_its_own_view_when_redis_is_down_and_comes_back():
    server = RedisServer().start()

    async def main():
        locator = Locator(lambda ns: RedisStore(server.url, ns, timeout=0.05, breaker=Breaker("redis", 1, 0.2)))
        locator.bind("m")
        hashes = locator.hashes(list(range(16 * 5)))
        await locator.store.publish("v:1", hashes[:3], [])
        modes = [(await locator.lookup(hashes), locator.mode)]
        locator.learned("v:2", hashes[:2])  # what this router's own sessions left on v:2
        server.stop()
        t = time.perf_counter()
        modes.append((await locator.lookup(hashes), locator.mode))
        elapsed = time.perf_counter() - t
        server.start()
        await asyncio.sleep(0.25)
        modes.append((await locator.lookup(hashes), locator.mode))  # the probe succeeds: empty Redis, locality
        await locator.aclose()
        return modes, elapsed

    try:
        modes, elapsed = run(main())
    finally:
        server.stop()
    assert modes[0] == ({"v:1": 3}, MODE_LOCALITY)
    assert modes[1] == ({"v:2": 2}, MODE_FALLBACK)
    assert modes[2] == ({}, MODE_LOCALITY)
    assert elapsed < 0.2
