"""Kubernetes discovery for the router: keeps the drafter and verifier pools equal to the ready endpoints of their
Services.

Owns: the list/watch loop over discovery.k8s.io/v1 EndpointSlices labelled `kubernetes.io/service-name=NAME`
(list, then watch from the list's resourceVersion; resume after a watch times out; list again after 410 Gone; back
off on any other error while keeping the last known endpoints), turning slices into "<ip>:<grpc port>"
addresses, and handing each new set to the asyncio loop. The `kubernetes` client is synchronous, so each watch
runs in its own thread and hands updates over with `loop.call_soon_threadsafe`.

Does not own: what a pool does with the addresses (router.pool), health checks (Pool.watch), RBAC (the chart
grants list+watch on endpointslices).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PORT_NAME = "grpc"
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def pod_namespace(default: str = "default") -> str:
    """The namespace of the pod this runs in (its service account says), else `default`."""
    try:
        return NAMESPACE_FILE.read_text().strip() or default
    except OSError:
        return default


def load_api_client():
    """A kubernetes ApiClient: an explicit $KUBECONFIG wins; in a pod, its service account; else ~/.kube/config."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if not os.environ.get("KUBECONFIG") and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def ready_addresses(slices: Iterable, port_name: str = PORT_NAME) -> set[str]:
    """"<ip>:<port>" of every ready endpoint in `slices` (V1EndpointSlice objects).

    The port is the slice port named `port_name`, or the slice's only port. Kubernetes says an unset `ready`
    means unknown and should be taken as ready; `ready: false` (not ready yet, or terminating) is not routable.
    """
    out = set()
    for s in slices:
        port = _port_of(s, port_name)
        if port is None:
            continue
        for endpoint in s.endpoints or ():
            if endpoint.conditions is not None and endpoint.conditions.ready is False:
                continue
            for ip in endpoint.addresses or ():
                out.add(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")  # IPv6 literals need brackets
    return out


def _port_of(s, port_name: str) -> int | None:
    ports = [p for p in (s.ports or ()) if p.port is not None]
    named = [p for p in ports if p.name == port_name]
    if named:
        return named[0].port
    if len(ports) == 1:
        return ports[0].port
    log.warning("EndpointSlice %s has no port named %r and %d ports; skipping it", s.metadata.name, port_name,
                len(ports))
    return None


class ServiceWatch:
    """Ready endpoint addresses of one Service, kept current by list+watch; `run` blocks (call it in a thread).

    `on_change(addresses)` is called from the watch thread with the sorted ready addresses after the first list
    and whenever they change afterwards.
    """

    def __init__(self, api, namespace: str, service: str, on_change: Callable[[list[str]], None],
                 port_name: str = PORT_NAME, timeout_seconds: int = 300, backoff: float = 0.5,
                 max_backoff: float = 15.0, connect_timeout: float = 5.0):
        """`api` is a kubernetes DiscoveryV1Api. `timeout_seconds` bounds each watch request on the server (the
        watch then resumes from the last resourceVersion it saw); `backoff` doubles after each failed attempt up
        to `max_backoff`."""
        self.api = api
        self.namespace = namespace
        self.service = service
        self.on_change = on_change
        self.port_name = port_name
        self.timeout_seconds = timeout_seconds
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self.selector = f"{SERVICE_NAME_LABEL}={service}"
        self.synced = threading.Event()  # set after the first successful list
        self._slices: dict[str, object] = {}  # slice name -> V1EndpointSlice
        self._published: set[str] | None = None
        self._stopping = threading.Event()
        self._watch = None

    def run(self) -> None:
        from kubernetes.client import ApiException

        delay = self.backoff
        while not self._stopping.is_set():
            try:
                version = self._list()
                delay = self.backoff
                self._follow(version)
                continue
            except ApiException as exc:
                if exc.status == 410:
                    # The watch fell behind what the API server keeps: list again from now, no wait needed.
                    log.info("%s: watch expired (410 Gone); listing again", self.service)
                    continue
                problem = f"HTTP {exc.status} {exc.reason}"
            except Exception as exc:  # connection refused, reset, protocol errors: the API server may be restarting
                problem = f"{type(exc).__name__}: {exc}"
            if self._stopping.is_set():
                break
            # Keep routing to the endpoints we know: an API server hiccup is no reason to drop pods.
            log.warning("%s: EndpointSlice list/watch failed (%s); retrying in %.1f s", self.service, problem, delay)
            self._stopping.wait(delay)
            delay = min(delay * 2, self.max_backoff)

    def stop(self) -> None:
        """Ends `run` soon: wakes a backoff wait and shuts a watch's socket (safe from any thread)."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()

    def _list(self) -> str:
        reply = self.api.list_namespaced_endpoint_slice(
            self.namespace, label_selector=self.selector,
            _request_timeout=(self.connect_timeout, self.timeout_seconds),
        )
        self._slices = {s.metadata.name: s for s in reply.items}
        self._publish()
        self.synced.set()
        return reply.metadata.resource_version

    def _follow(self, version: str) -> None:
        """Applies watch events from `version` on until stopped; raises on errors (410 included)."""
        from kubernetes import watch

        while not self._stopping.is_set():
            w = self._watch = watch.Watch()
            if self._stopping.is_set():  # stop() ran before this watch existed
                return
            for event in w.stream(
                self.api.list_namespaced_endpoint_slice, self.namespace, label_selector=self.selector,
                resource_version=version, timeout_seconds=self.timeout_seconds, allow_watch_bookmarks=True,
                # The read timeout outlasts the server's own: a silent connection still ends, never hangs.
                _request_timeout=(self.connect_timeout, self.timeout_seconds + 30),
            ):
                kind, obj = event["type"], event["object"]
                if kind == "DELETED":
                    self._slices.pop(obj.metadata.name, None)
                elif kind in ("ADDED", "MODIFIED"):
                    self._slices[obj.metadata.name] = obj
                else:
                    continue  # BOOKMARK: only moves the resourceVersion, which Watch tracks
                self._publish()
            version = w.resource_version or version

    def _publish(self) -> None:
        addresses = ready_addresses(self._slices.values(), self.port_name)
        if addresses != self._published:
            self._published = addresses
            log.info("%s: %d ready endpoint(s) in namespace %s: %s", self.service, len(addresses), self.namespace,
                     ", ".join(sorted(addresses)) or "none")
            self.on_change(sorted(addresses))


class KubeDiscovery:
    """A router's pools fed from Kubernetes: the verifier Service always, the drafter Service when given.

    Built from plain values by the CLI; `start` runs in the router's event loop; `aclose` stops the watches.
    """

    def __init__(self, namespace: str, verifier_service: str, drafter_service: str | None = None,
                 api_client=None, port_name: str = PORT_NAME, timeout_seconds: int = 300):
        """`api_client` None: load one when started (`load_api_client`); tests pass one aimed at a fake server."""
        if not verifier_service:
            raise ValueError("Kubernetes discovery needs the verifier Service name (--verifier-service)")
        self.namespace = namespace
        self.verifier_service = verifier_service
        self.drafter_service = drafter_service
        self.api_client = api_client
        self.port_name = port_name
        self.timeout_seconds = timeout_seconds
        self.watches: list[ServiceWatch] = []
        self._threads: list[threading.Thread] = []

    def origin(self, service: str) -> str:
        return f"the ready endpoints of Service {service} in namespace {self.namespace}"

    def start(self, verifiers, drafters) -> None:
        """Starts one watch thread per Service; each hands its addresses to the pool's `set_addresses`."""
        from kubernetes import client

        loop = asyncio.get_running_loop()
        api = client.DiscoveryV1Api(self.api_client or load_api_client())
        targets = [(self.verifier_service, verifiers)]
        if self.drafter_service:
            targets.append((self.drafter_service, drafters))
        for service, pool in targets:
            pool.origin = self.origin(service)
            w = ServiceWatch(api, self.namespace, service, _on_loop(loop, pool.set_addresses), self.port_name,
                             self.timeout_seconds)
            # Daemon: a thread stuck in a read must never keep the process alive after the router stopped.
            thread = threading.Thread(target=w.run, name=f"discovery-{service}", daemon=True)
            thread.start()
            self.watches.append(w)
            self._threads.append(thread)

    async def aclose(self, timeout: float = 2.0) -> None:
        for w in self.watches:
            w.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for w, thread in zip(self.watches, self._threads):
            while thread.is_alive() and loop.time() < deadline:
                w.stop()  # again: a watch request may have started after the first stop
                await asyncio.sleep(0.05)
            if thread.is_alive():
                log.warning("discovery watch for %s did not stop within %.0f s", w.service, timeout)


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """`fn`, callable from another thread: it runs on `loop` (pools are not thread-safe)."""

    def call(addresses: list[str]) -> None:
        try:
            loop.call_soon_threadsafe(fn, addresses)
        except RuntimeError:
            log.debug("event loop closed; dropping a discovery update")

    return call
