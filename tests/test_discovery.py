"""Kubernetes discovery in the router, against a local test double of the API server.

`FakeKubeApi` speaks only what the router uses of the Kubernetes API: list and watch of discovery.k8s.io/v1
EndpointSlices by label selector (resourceVersion, chunked watch streams of JSON lines, 410 Gone once history is
compacted). The router's code under test is the real one: router.discovery with the `kubernetes` client, and in
the end-to-end test the `specdec serve router --discovery kubernetes` process reading a kubeconfig.

Claims: ready endpoints join the pool (port named grpc), not-ready ones and those of deleted slices leave; after
a 410 Gone the watch lists again and finds what it missed; an API server error is retried; a removed pod's
channel stays open for the sessions on it; the health watch survives pods coming and going; end to end, a router
with no ready verifier answers UNAVAILABLE, serves once the verifier is ready and stops routing to it when it is
not.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from router.discovery import KubeDiscovery, ready_addresses
from router.pool import Pool
from tests.conftest import ServerProcess

NS = "specdec-test"
SLICES_PATH = "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"


def endpoint_slice(name: str, service: str, endpoints: list[tuple[str, bool]], port: int,
                   extra_ports: tuple = (("metrics", 9464),)) -> dict:
    """An EndpointSlice as the API serves it; `endpoints` are (ip, ready)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": False}}
                      for ip, ready in endpoints],
        "ports": [*({"name": n, "port": p, "protocol": "TCP"} for n, p in extra_ports),
                  {"name": "grpc", "port": port, "protocol": "TCP"}],
    }


class FakeKubeApi:
    """A test double of the API server for EndpointSlices: list, watch, 410 Gone after `compact`."""

    def __init__(self):
        self.version = 1
        self.slices: dict[tuple[str, str], dict] = {}  # (namespace, name) -> slice
        self.events: list[tuple[int, str, str, dict]] = []  # (version, namespace, type, object)
        self.too_old_below = 0  # watches from a version older than this get 410 Gone
        self.requests: list[tuple[str, dict]] = []  # (path, query)
        self.fail_lists = 0  # answer the next N list requests with 500
        self.closing = False
        self.cond = threading.Condition()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # chunked watch streams

            def do_GET(self):
                api.handle(self)

            def log_message(self, *args):
                return None  # keep the test output quiet

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    # -- what tests change -------------------------------------------------------------------------------------------
    def put(self, slice_: dict, silent: bool = False) -> None:
        """Creates or replaces a slice; `silent`: no watch event (as if history were lost)."""
        with self.cond:
            self.version += 1
            key = (slice_["metadata"]["namespace"], slice_["metadata"]["name"])
            obj = json.loads(json.dumps(slice_))
            obj["metadata"]["resourceVersion"] = str(self.version)
            kind = "MODIFIED" if key in self.slices else "ADDED"
            self.slices[key] = obj
            if not silent:
                self.events.append((self.version, key[0], kind, obj))
            self.cond.notify_all()

    def delete(self, name: str, namespace: str = NS) -> None:
        with self.cond:
            self.version += 1
            obj = self.slices.pop((namespace, name))
            obj["metadata"]["resourceVersion"] = str(self.version)
            self.events.append((self.version, namespace, "DELETED", obj))
            self.cond.notify_all()

    def compact(self) -> None:
        """History before the current version is gone: watches that began earlier get ERROR 410."""
        with self.cond:
            self.too_old_below = self.version
            self.cond.notify_all()

    def count(self, watch: bool, service: str | None = None) -> int:
        with self.cond:
            return sum(1 for _, q in self.requests if ("watch" in q) == watch
                       and (service is None or q.get("labelSelector") == f"kubernetes.io/service-name={service}"))

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # -- the protocol ------------------------------------------------------------------------------------------------
    def handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        parts = url.path.split("/")
        if len(parts) != 7 or url.path != SLICES_PATH.format(ns=parts[5]):
            return self._json(h, 404, {"kind": "Status", "code": 404, "reason": "NotFound", "message": url.path})
        namespace = parts[5]
        with self.cond:
            self.requests.append((url.path, query))
            failing = self.fail_lists > 0 and query.get("watch") != "true"
            self.fail_lists -= failing
        if failing:
            return self._json(h, 500, {"kind": "Status", "code": 500, "reason": "InternalError", "message": "boom"})
        selector = query.get("labelSelector", "")
        if query.get("watch") == "true":
            return self._watch(h, namespace, selector, int(query.get("resourceVersion") or 0),
                               float(query.get("timeoutSeconds", 300)))
        with self.cond:
            items = [s for (ns, _), s in self.slices.items() if ns == namespace and _matches(s, selector)]
            body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                    "metadata": {"resourceVersion": str(self.version)}, "items": items}
        self._json(h, 200, body)

    def _watch(self, h, namespace: str, selector: str, since: int, timeout: float) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        deadline = time.monotonic() + timeout
        position = since
        try:
            while True:
                with self.cond:
                    if since < self.too_old_below:
                        gone = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                                "reason": "Expired", "message": f"too old resource version: {since}"}
                        self._chunk(h, {"type": "ERROR", "object": gone})
                        break
                    batch = [(v, kind, obj) for v, ns, kind, obj in self.events
                             if v > position and ns == namespace and _matches(obj, selector)]
                    if not batch:
                        if self.closing or time.monotonic() >= deadline:
                            break
                        self.cond.wait(min(0.2, max(0.0, deadline - time.monotonic())))
                        continue
                for v, kind, obj in batch:
                    self._chunk(h, {"type": kind, "object": obj})
                    position = v
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return  # the client went away (router stopped, or it stopped the watch)

    @staticmethod
    def _chunk(h, event: dict) -> None:
        data = json.dumps(event).encode() + b"\n"
        h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        h.wfile.flush()

    @staticmethod
    def _json(h, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def _matches(obj: dict, selector: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


@pytest.fixture
def fake_api():
    api = FakeKubeApi()
    yield api
    api.close()


def api_client(url: str):
    from kubernetes import client

    return client.ApiClient(client.Configuration(host=url))


async def until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def discovering(fake: FakeKubeApi, drafter_service: str | None = None):
    """A verifier pool (and drafter pool) fed by a real KubeDiscovery aimed at the fake API server."""
    verifiers, drafters = Pool([], name="verifier"), Pool([], name="drafter")
    discovery = KubeDiscovery(NS, "verifiers", drafter_service, api_client=api_client(fake.url), timeout_seconds=30)
    discovery.start(verifiers, drafters)
    return discovery, verifiers, drafters


# -- discovery against the fake API server -----------------------------------------------------------------------------
def test_ready_endpoints_join_and_unready_ones_leave(fake_api):
    fake_api.put(endpoint_slice("verifiers-a", "verifiers", [("10.0.0.1", True), ("10.0.0.2", False)], 50053))
    fake_api.put(endpoint_slice("other-x", "other", [("10.9.9.9", True)], 50053))  # another Service's slice
    fake_api.put(endpoint_slice("drafters-a", "drafters", [("10.0.1.1", True)], 50052))

    async def main():
        discovery, verifiers, drafters = await discovering(fake_api, drafter_service="drafters")
        try:
            await until(lambda: verifiers.addresses == ["10.0.0.1:50053"], what="the ready verifier")
            await until(lambda: drafters.addresses == ["10.0.1.1:50052"], what="the ready drafter")
            assert verifiers.origin == f"the ready endpoints of Service verifiers in namespace {NS}"

            fake_api.put(endpoint_slice("verifiers-a", "verifiers", [("10.0.0.1", True), ("10.0.0.2", True)], 50053))
            await until(lambda: sorted(verifiers.addresses) == ["10.0.0.1:50053", "10.0.0.2:50053"],
                        what="the second verifier to become ready")

            fake_api.put(endpoint_slice("verifiers-a", "verifiers", [("10.0.0.1", False), ("10.0.0.2", True)], 50053))
            await until(lambda: verifiers.addresses == ["10.0.0.2:50053"], what="the unready verifier to leave")
            assert [p.address for p in verifiers.candidates()] == ["10.0.0.2:50053"]
        finally:
            await discovery.aclose()
        assert fake_api.count(watch=True, service="verifiers") >= 1  # it watched, not polled
        assert fake_api.count(watch=False, service="other") == 0

    asyncio.run(main())


def test_deleted_slice_and_removed_endpoint_leave_the_pool(fake_api):
    fake_api.put(endpoint_slice("verifiers-a", "verifiers", [("10.0.0.1", True), ("10.0.0.3", True)], 50053))
    fake_api.put(endpoint_slice("verifiers-b", "verifiers", [("10.0.0.2", True)], 50053))

    async def main():
        discovery, verifiers, _ = await discovering(fake_api)
        try:
            await until(lambda: len(verifiers) == 3, what="three verifiers")
            fake_api.delete("verifiers-b")
            await until(lambda: sorted(verifiers.addresses) == ["10.0.0.1:50053", "10.0.0.3:50053"],
                        what="the deleted slice's endpoint to leave")
            fake_api.put(endpoint_slice("verifiers-a", "verifiers", [("10.0.0.1", True)], 50053))  # pod went away
            await until(lambda: verifiers.addresses == ["10.0.0.1:50053"], what="the removed endpoint to leave")
        finally:
            await discovery.aclose()

    asyncio.run(main())


def test_relists_after_410_gone_and_finds_what_it_missed(fake_api):
    fake_api.put(endpoint_slice("verifiers-a", "verifiers", [("10.0.0.1", True)], 50053))

    async def main():
        discovery, verifiers, _ = await discovering(fake_api)
        try:
            await until(lambda: verifiers.addresses == ["10.0.0.1:50053"], what="the first verifier")
            await until(lambda: fake_api.count(watch=True) >= 1, what="the watch")
            # A change the watch never hears of, then its history is gone: only a fresh list can find it.
            fake_api.put(endpoint_slice("verifiers-a", "verifiers", [("10.0.0.7", True)], 50053), silent=True)
            fake_api.compact()
            await until(lambda: verifiers.addresses == ["10.0.0.7:50053"], what="the re-list after 410")
            assert fake_api.count(watch=False) == 2
            # ... and it watches again from the new list: later events still arrive.
            fake_api.put(endpoint_slice("verifiers-b", "verifiers", [("10.0.0.8", True)], 50053))
            await until(lambda: sorted(verifiers.addresses) == ["10.0.0.7:50053", "10.0.0.8:50053"],
                        what="an event after the re-list")
        finally:
            await discovery.aclose()

    asyncio.run(main())


def test_api_errors_are_retried_and_stop_is_prompt(fake_api):
    fake_api.fail_lists = 2
    fake_api.put(endpoint_slice("verifiers-a", "verifiers", [("10.0.0.1", True)], 50053))

    async def main():
        discovery, verifiers, _ = await discovering(fake_api)
        await until(lambda: verifiers.addresses == ["10.0.0.1:50053"], what="discovery after two failed lists")
        assert fake_api.count(watch=False) == 3
        await until(lambda: fake_api.count(watch=True) >= 1, what="the watch")
        started = time.monotonic()
        await discovery.aclose()  # the watch is blocked reading a quiet stream: stop must not wait for it
        assert time.monotonic() - started < 1.5
        assert not any(t.is_alive() for t in discovery._threads)

    asyncio.run(main())


def test_ready_addresses_port_and_conditions():
    from kubernetes import client

    def model(d):
        return client.ApiClient().deserialize(json.dumps(d), "V1EndpointSlice", "application/json")

    only_port = endpoint_slice("a", "s", [("10.0.0.1", True)], 7000, extra_ports=())
    only_port["ports"][0]["name"] = "web"
    unknown = endpoint_slice("b", "s", [("10.0.0.2", True)], 50053)
    del unknown["endpoints"][0]["conditions"]  # unset `ready` is unknown, which Kubernetes says to treat as ready
    ipv6 = endpoint_slice("c", "s", [("fd00::5", True)], 50053)
    ipv6["addressType"] = "IPv6"
    ambiguous = endpoint_slice("d", "s", [("10.0.0.4", True)], 1)
    ambiguous["ports"] = [{"name": "a", "port": 1}, {"name": "b", "port": 2}]
    assert ready_addresses([model(s) for s in (only_port, unknown, ipv6, ambiguous)]) == {
        "10.0.0.1:7000", "10.0.0.2:50053", "[fd00::5]:50053"}


# -- the dynamic pool --------------------------------------------------------------------------------------------------
async def _health_server():
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, f"127.0.0.1:{port}"


def test_removed_pod_keeps_its_channel_until_its_sessions_finish():
    async def main():
        server, address = await _health_server()
        pool = Pool([address], name="verifier", linger=0.05)
        pod = pool.pick()
        pod.in_flight += 1  # a session in flight on it
        pool.set_addresses([])
        assert pool.pick() is None and not pool.candidates()
        await asyncio.sleep(0.2)
        reply = await health_pb2_grpc.HealthStub(pod.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING  # the session's channel still works

        assert pool.add(address) and pool.pick() is pod  # back before it closed: same pod, same load
        assert pod.in_flight == 1
        pool.remove(address)
        pod.in_flight -= 1  # the session ends
        await asyncio.sleep(0.2)
        with pytest.raises(Exception):  # now the channel is closed
            await health_pb2_grpc.HealthStub(pod.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        await pool.aclose()
        await server.stop(None)

    asyncio.run(main())


def test_health_watch_survives_pods_coming_and_going():
    async def main():
        server, address = await _health_server()
        dead = "127.0.0.1:1"  # nothing listens there
        pool = Pool([address], name="verifier", linger=0.01)
        watcher = asyncio.get_running_loop().create_task(pool.watch(interval=0.01, timeout=0.5))
        for i in range(60):
            pool.set_addresses([address, dead] if i % 2 else [address])
            await asyncio.sleep(0.01)
        assert not watcher.done(), watcher.exception() if watcher.done() else None
        pool.set_addresses([address, dead])
        await until(lambda: [p.address for p in pool.candidates()] == [address], what="the dead pod marked down")
        watcher.cancel()
        await pool.aclose()
        await server.stop(None)

    asyncio.run(main())


# -- end to end: router process, discovery through a kubeconfig --------------------------------------------------------
@pytest.mark.e2e
def test_router_routes_only_to_ready_discovered_verifiers(fake_api, tmp_path, monkeypatch):
    from specdec import Client, UnavailableError

    verifier = ServerProcess("verifier", "--max-sequence-length", "512", "--max-sessions", "4")
    drafter = ServerProcess("drafter", "--model", "ngram")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake_api.url}}],
        "users": [{"name": "router", "user": {"token": "test-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "router", "namespace": NS}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))  # the router process reads it, as kubectl would
    fake_api.put(endpoint_slice("specdec-verifier-1", "specdec-verifier", [("127.0.0.1", False)], verifier.port))
    fake_api.put(endpoint_slice("specdec-drafter-1", "specdec-drafter", [("127.0.0.1", True)], drafter.port))
    router = None
    try:
        router = ServerProcess("router", "--discovery", "kubernetes", "--verifier-service", "specdec-verifier",
                               "--drafter-service", "specdec-drafter", "--kube-namespace", NS)
        deadline = time.monotonic() + 20
        while fake_api.count(watch=True, service="specdec-verifier") == 0:
            assert time.monotonic() < deadline, "the router never watched the verifier Service"
            time.sleep(0.05)
        request = dict(chat=[{"role": "user", "content": "Count: one two three one two three one two three"}],
                       max_new_tokens=12)
        with Client(router.address, retries=0) as client:
            with pytest.raises(UnavailableError, match="Service specdec-verifier in namespace specdec-test"):
                client.complete(**request)

            fake_api.put(endpoint_slice("specdec-verifier-1", "specdec-verifier", [("127.0.0.1", True)],
                                        verifier.port))
            deadline = time.monotonic() + 20
            while True:
                try:
                    chunks = list(client.generate(**request))
                    break
                except UnavailableError:
                    assert time.monotonic() < deadline, "the ready verifier never got routed to"
                    time.sleep(0.1)
            last = chunks[-1]
            assert last.usage.completion_tokens == 12 and "".join(c.text for c in chunks)
            assert last.usage.draft_tokens > 0  # the discovered drafter drafted for the discovered verifier

            fake_api.put(endpoint_slice("specdec-verifier-1", "specdec-verifier", [("127.0.0.1", False)],
                                        verifier.port))
            deadline = time.monotonic() + 20
            while True:
                try:
                    client.complete(**request)
                except UnavailableError as exc:
                    assert "no verifier reachable" in str(exc)
                    break
                assert time.monotonic() < deadline, "the router kept routing to a verifier that is not ready"
                time.sleep(0.1)
        assert router.stop() == 0  # the watch threads do not hold up a clean shutdown
    finally:
        for p in (router, drafter, verifier):
            if p is not None:
                p.stop()
