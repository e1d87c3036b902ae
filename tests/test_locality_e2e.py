"""KV-cache locality end to end: router, two verifiers and a drafter as separate processes, a real redis-server.

Claims: every later turn of a conversation lands on the verifier that holds it and reuses at least the previous
turn's full blocks; a prefix a verifier cached on its own is found through Redis; with Redis stopped requests
keep succeeding (routing on load and the router's own view), and once Redis is back its hints are used again;
a killed verifier's entries leave the store and routing skips it.
"""

from __future__ import annotations

import time

import grpc
import pytest

from specdec.prefix_hash import BLOCK_TOKENS, block_hashes, model_namespace, model_seed
from specdec.models import DEFAULT_TARGET
from specdec.proto import generation_pb2, generation_pb2_grpc, session_pb2, verifier_pb2, verifier_pb2_grpc
from tests.conftest import ServerProcess, free_port
from tests.test_locality import RedisServer

pytestmark = pytest.mark.e2e
TTL = "1.5"  # seconds: heartbeats every 0.5 s, so a dead verifier leaves the store within ~2 s
MAX_NEW = 6
SYSTEM = ("You are a patient tutor for curious students. Keep answers short and concrete, explain one idea at a "
          "time, and end with a question that checks understanding.")


@pytest.fixture(scope="module")
def fleet():
    redis_server = RedisServer().start()
    common = ("--redis-url", redis_server.url, "--locality-ttl", TTL)
    verifiers = []
    for _ in range(2):
        port = free_port()
        verifiers.append(ServerProcess("verifier", "--max-sequence-length", "1024", "--max-sessions", "4",
                                       "--advertise", f"127.0.0.1:{port}", *common, port=port))
    drafter = ServerProcess("drafter", "--model", "ngram")
    router = ServerProcess("router", "--verifier", verifiers[0].address, "--verifier", verifiers[1].address,
                           "--drafter", drafter.address, *common)
    yield {"redis": redis_server, "verifiers": verifiers, "router": router}
    for p in (router, drafter, *verifiers):
        p.stop()
    redis_server.stop()


def generate(router: str, timeout: float = 60, **request):
    """One Generate call: (token ids, text, last message, trailing metadata as a dict, seconds)."""
    request.setdefault("sampling", generation_pb2.SamplingParams(max_new_tokens=MAX_NEW))
    start = time.perf_counter()
    with grpc.insecure_channel(router) as channel:
        call = generation_pb2_grpc.GenerationStub(channel).Generate(
            generation_pb2.GenerateRequest(**request), timeout=timeout)
        chunks = list(call)
        trailers = dict(call.trailing_metadata())
    ids = [t for c in chunks for t in c.token_ids]
    return ids, "".join(c.text for c in chunks), chunks[-1], trailers, time.perf_counter() - start


def chat(messages):
    return generation_pb2.Chat(messages=[generation_pb2.ChatMessage(role=r, content=c) for r, c in messages])


def conversation(router: str, name: str, session_id: str = "", turns: int = 3):
    """Runs a conversation; returns per turn (verifier, prompt_tokens, cached_prompt_tokens, routing)."""
    messages = [("system", SYSTEM)]
    out = []
    for turn in range(turns):
        messages.append(("user", f"{name}: question {turn + 1}, tell me one more fact about it."))
        _, text, last, trailers, _ = generate(router, chat=chat(messages), session_id=session_id)
        messages.append(("assistant", text))
        out.append((trailers["x-specdec-verifier"], last.usage.prompt_tokens, last.usage.cached_prompt_tokens,
                    trailers["x-specdec-routing"]))
    return out


def seed_on(verifier: str, prompt: list[int]) -> None:
    """Runs a prompt on one verifier directly (the router never sees it): only Redis can tell where it is."""
    with grpc.insecure_channel(verifier) as channel:
        stub = verifier_pb2_grpc.VerifierServiceStub(channel)
        spec = session_pb2.SessionSpec(session_id=f"seed-{time.monotonic_ns()}", prompt_ids=prompt, max_new_tokens=1)
        list(stub.Decode(verifier_pb2.DecodeRequest(session=spec), timeout=60))


def distinct_prompt(i: int) -> list[int]:
    return [1000 + 37 * i + j % 50 for j in range(3 * BLOCK_TOKENS + 5)]


def assert_sticky(turns):
    home = turns[0][0]
    for (prev, now) in zip(turns, turns[1:]):
        assert now[0] == home, turns
        assert now[2] >= prev[1] // BLOCK_TOKENS * BLOCK_TOKENS > 0, turns  # the previous turn's full blocks


def test_every_later_turn_lands_on_its_verifier_and_reuses_the_previous_turn(fleet):
    router = fleet["router"].address
    with_id = conversation(router, "volcanoes", session_id="conv-volcanoes")
    by_hints = conversation(router, "glaciers")  # no session_id: only the locality hints keep it home
    assert_sticky(with_id)
    assert_sticky(by_hints)
    assert all(t[3] == "locality" for t in with_id + by_hints)


def wait_published(redis_client, holder: str, prompt: list[int], timeout: float = 10.0) -> None:
    """Waits until Redis lists `holder` for every full block of `prompt`: a verifier publishes in the background
    (every 50 ms, and after Redis comes back, everything it holds first), so on a loaded machine a fixed pause is
    not enough to know the hints are there."""
    prefix = f"specdec:{{{model_namespace(DEFAULT_TARGET)}}}:blk:"
    keys = [prefix + h for h in block_hashes(prompt, model_seed(DEFAULT_TARGET))]
    deadline = time.monotonic() + timeout
    while any(redis_client.zscore(k, holder) is None for k in keys) and time.monotonic() < deadline:
        time.sleep(0.05)


def seed_and_route(fleet, first_index: int, label: str):
    """Seeds prompts on the verifiers in the order v0, v0, v1, v1 (alternation alone cannot match it)."""
    router, verifiers = fleet["router"].address, fleet["verifiers"]
    redis_client = fleet["redis"].client()
    results = []
    for i, owner in enumerate([0, 0, 1, 1]):
        prompt = distinct_prompt(first_index + i)
        seed_on(verifiers[owner].address, prompt)
        wait_published(redis_client, verifiers[owner].address, prompt)
        _, _, last, trailers, _ = generate(router, tokens=generation_pb2.TokenIds(ids=prompt + [7, 8]))
        results.append((verifiers[owner].address, trailers["x-specdec-verifier"], last.usage.cached_prompt_tokens,
                        trailers["x-specdec-routing"]))
    for owner, landed, cached, routing in results:
        assert (owner, routing) == (landed, "locality"), (label, results)
        assert cached == 3 * BLOCK_TOKENS, (label, results)


def test_a_prefix_cached_on_one_verifier_is_found_through_redis(fleet):
    seed_and_route(fleet, 0, "before")


def test_redis_down_requests_keep_succeeding_and_hints_return_with_redis(fleet):
    router, redis_server = fleet["router"].address, fleet["redis"]
    home = conversation(router, "tides", session_id="conv-tides", turns=1)[0][0]
    hinted = conversation(router, "comets", turns=1)[0][0]
    redis_server.stop()
    try:
        results = []
        for turn in range(4):
            _, _, last, trailers, seconds = generate(router, prompt=f"Redis is down; request {turn}:", timeout=20)
            results.append((trailers["x-specdec-routing"], seconds, last.finish_reason))
        # conversations stay home without Redis: affinity, and the router's own view of what it left where
        affine = conversation(router, "tides", session_id="conv-tides", turns=1)[0]
        viewed = conversation(router, "comets", turns=1)[0]
    finally:
        redis_server.start()  # the same port, empty
    assert all(r[2] for r in results) and results[-1][0] == "fallback", results
    assert max(r[1] for r in results) < 10, results  # as fast as ever: never waiting on Redis
    assert affine[0] == home and viewed[0] == hinted
    assert viewed[3] == "fallback"
    time.sleep(2.5)  # breakers probe every second; verifiers re-send everything they hold
    keys = redis_server.client().keys("specdec:*:blk:*")
    assert keys, "the verifiers did not republish their blocks after Redis came back"
    seed_and_route(fleet, 10, "after Redis came back")


def test_a_killed_verifier_leaves_the_store_and_routing(fleet):
    router, (alive, victim) = fleet["router"].address, fleet["verifiers"]
    prompt = distinct_prompt(20)
    seed_on(victim.address, prompt)
    r = fleet["redis"].client()
    prefix = f"specdec:{{{model_namespace(DEFAULT_TARGET)}}}:"
    deadline = time.monotonic() + 5
    while not r.exists(prefix + f"pod:{victim.address}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.exists(prefix + f"pod:{victim.address}")
    victim.proc.kill()  # no shutdown hook runs: only the TTL and the reapers can clean up
    victim.proc.wait()
    deadline = time.monotonic() + 8
    def holders():
        return [k for k in r.keys(prefix + "blk:*") if r.zscore(k, victim.address) is not None]

    def still_listed():
        # the reverse index may expire by TTL before a reaper removes the heartbeat entry: wait for all three
        return (holders() or r.exists(prefix + f"pod:{victim.address}")
                or r.zscore(prefix + "pods", victim.address) is not None)

    while still_listed() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not holders() and not r.exists(prefix + f"pod:{victim.address}")
    assert r.zscore(prefix + "pods", victim.address) is None
    for i in range(4):
        ids = prompt + [i] if i % 2 else distinct_prompt(30 + i)
        _, _, last, trailers, _ = generate(router, tokens=generation_pb2.TokenIds(ids=ids))
        assert trailers["x-specdec-verifier"] == alive.address
        assert trailers["x-specdec-attempts"] == "1"  # chosen right the first time, no failed attempt
        assert last.finish_reason
