"""The drafter's gRPC edge: DrafterService.Draft runs one session against a verifier.

The loop per session: open it on the verifier (prefill, first token), then draft a block after the committed
tokens, send it, commit the verdict, stream the committed tokens back, until the verifier says the session is
finished. Blocks of all sessions are drafted together by the `DraftBatcher`. Every verdict carries the committed
length, and the next draft is made from exactly the committed tokens, so the drafter never trusts its own guesses.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from drafter_service.drafters import Draft, DraftRequest
from drafter_service.link import VerifierLink
from specdec import compute, device_trace, telemetry
from specdec.draft_tree import FOLLOW_VERIFIER, TreeShape
from specdec.errors import InvalidInput, SpecdecError, Unavailable
from specdec.proto import drafter_pb2, drafter_pb2_grpc, verifier_pb2
from specdec.phases import PhaseTimes
from specdec.sampling import SamplingConfig, output_depends_on_drafts
from specdec.server import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)


class DraftBatcher:
    """Gathers the sessions waiting for a draft and proposes for all of them in one call on the torch thread."""

    def __init__(self, drafter, gather_s: float = 0.0):
        """gather_s: under load, how long a batch may wait for half of the open sessions to ask (`_gather`; the
        server's default: drafter_service.app.draft_gather_s); 0 drafts whatever is queued at once."""
        self.drafter = drafter
        self.gather_s = gather_s
        self._open: set[str] = set()  # sessions opened here and not closed: what `_gather` waits for half of
        self._drafted: set[str] = set()  # open sessions that have had a draft (their prompt is in the drafter's KV)
        self._pending: list[tuple[DraftRequest, asyncio.Future, float]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._drafting = False  # a batch is on the torch thread
        self._closing: set[asyncio.Task] = set()
        # Draft tokens asked for and not yet returned (queued or being drafted): the drafter tier's load metric
        # (specdec_drafter_pending_work, read by its HPA).
        self.pending_work = 0
        # where the sessions' rounds go (logged when the server stops): the queue before a batch, the batches,
        # and the servicer's phases (DrafterServicer.Draft)
        self.phases = PhaseTimes()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="draft-batcher")

    def close(self, session_id: str) -> None:
        """Frees a session's drafter state on the torch thread, in order behind any draft of it still running there
        (a cancelled proactive draft) and with the time to save its KV into the prefix cache; never waits."""
        self._open.discard(session_id)  # the servicer closes a session whose open failed too
        self._drafted.discard(session_id)
        task = asyncio.get_running_loop().create_task(self._close(session_id))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, session_id: str) -> None:
        try:
            await compute.run(self.drafter.close, session_id)
        except Exception:
            log.exception("closing drafter session %s failed", session_id)

    async def open(self, session_id: str) -> None:
        """Takes a KV slot for the session, after the closes already under way have given theirs back (a client
        that opens a session as soon as its last one ended must not find the slot still taken)."""
        if self._closing:
            await asyncio.wait(set(self._closing))
        self.drafter.open(session_id)
        self._open.add(session_id)

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch drafting."""
        return not self._pending and not self._drafting

    async def propose(self, request: DraftRequest) -> Draft:
        if request.k == 0:
            return Draft([])
        future = asyncio.get_running_loop().create_future()
        self._pending.append((request, future, time.perf_counter()))
        self.pending_work += request.k
        self._wakeup.set()
        try:
            return await future
        finally:
            self.pending_work -= request.k

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._gather()
            batch, self._pending = self._pending, []
            batch = [(r, f, queued) for r, f, queued in batch if not f.done()]
            # A session's first draft carries its whole prompt (one wide pass: at 64 users on an H200 such batches
            # took 31 ms mean against 7.8 for the others, docs/benchmarks.md, thirteenth session): the running
            # sessions' drafts go first, in a call of their own, so that they never wait for a new one's prompt.
            running = [item for item in batch if item[0].session_id in self._drafted]
            for part in (running, [item for item in batch if item[0].session_id not in self._drafted]):
                if part:
                    await self._draft(part)

    async def _draft(self, batch: list[tuple[DraftRequest, asyncio.Future, float]]) -> None:
        started = time.perf_counter()
        for _, _, queued in batch:
            self.phases.add("draft_queue", started - queued)
        self.phases.count("batches")
        self.phases.count("batch_rows", len(batch))
        self._drafting = True
        try:
            drafts = await compute.run_timed(self.phases, "draft_batch", device_trace.traced("drafter.propose",
                                                                                         self._propose),
                                             [r for r, _, _ in batch])
        except Exception:  # a drafter bug costs speed (empty drafts), never a session
            log.exception("drafting failed for %d sessions", len(batch))
            drafts = [Draft([]) for _ in batch]
        finally:
            self._drafting = False
        self.phases.add(f"draft_batch_{getattr(self.drafter, 'last_batch_kind', 'all')}",
                        self.phases.since("draft_batch", started) - started)
        for (request, future, _), draft in zip(batch, drafts):
            if request.session_id in self._open:
                self._drafted.add(request.session_id)
            if not future.done():
                future.set_result(draft)

    async def _gather(self) -> None:
        """Waits up to gather_s for half of the open sessions to be queued. A batch's time is mostly fixed (an H200:
        ~7 ms for 1 row or 17), so at 64 sessions the rounds fell into ~4 groups that each paid it; fewer, fuller
        batches should shorten every round. One session, or half already queued, never waits."""
        deadline = time.perf_counter() + self.gather_s
        while len(self._pending) < len(self._open) // 2:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except asyncio.TimeoutError:
                return
            self._wakeup.clear()

    def _propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """On the torch thread: the requests' features made (those given as functions), then one drafter call."""
        with device_trace.annotate("drafter.features"):
            requests = [replace(r, features=r.features()) if callable(r.features) else r for r in requests]
        return self.drafter.propose(requests)


def next_draft_length(current: int, drafted: int, accepted: int, k_max: int) -> int:
    """Per-session draft length from the last verdict: grow after a fully accepted block, else shrink to what
    was accepted plus one. Wrong draft tokens cost verify compute; a drafter that is rarely right drafts 1."""
    if drafted == 0:
        return current
    if accepted == drafted:
        return min(k_max, current + 1)
    return max(1, accepted + 1)


# The open verdict of a feature drafter's session carries the hidden state of every prompt token (float16): keep
# it well inside gRPC's message limit (specdec.server). The default target needs 1.15 KB per token (29k tokens
# fit); an 8B target 8 KB per token, so prompts past ~4k tokens draft nothing rather than break the shared stream.
# A fused drafter reads several layers' states a token (3.5 KB on the default target with three).
MAX_FEATURE_BYTES = MAX_MESSAGE_BYTES // 2


def wants_features(drafter, prompt_tokens: int) -> bool:
    """Whether a session asks the verifier for hidden states: the drafter reads them, and the prompt's fit in one
    verdict (MAX_FEATURE_BYTES). A session without them gets empty drafts: plain decode steps."""
    return drafter.wants_features and prompt_tokens * drafter.feature_width * 2 <= MAX_FEATURE_BYTES


def allowed_draft_length(verdict, k: int) -> int:
    """The session's draft length, capped by the verifier's VerifyResponse.max_draft_tokens: a busy verifier asks
    for empty blocks (plain decode steps) until its load falls."""
    return min(k, verdict.max_draft_tokens) if verdict.HasField("max_draft_tokens") else k


async def _usable_ahead(ahead: asyncio.Future, block, verdict, k: int) -> Draft | None:
    """The proactive draft, if the verdict accepted the whole block and its bonus is the drafter's guess."""
    committed = list(verdict.update.token_ids)
    all_accepted = verdict.accepted == len(block.token_ids) and not verdict.update.finish_reason
    if not all_accepted or not committed:
        ahead.cancel()  # a draft already running finishes on the torch thread; its result is dropped
        return None
    guess = await ahead
    if not guess.tokens or guess.tokens[0] != committed[-1]:
        return None
    return Draft(guess.tokens[1 : 1 + k], guess.distributions[1 : 1 + k])


class _Features:
    """A session's copy of the target's hidden states (VerifyResponse.features), one row per committed token but
    the newest, of the drafter's feature_width (several layers' side by side for a fused drafter); grown in place
    (capacity doubles), handed out as a view.

    A verdict's bytes are only staged on the event loop (`stage`: no torch work there: torch's float16 kernels on
    that thread left a process's later decoding ~25% slower for good on an AVX-512 CPU, docs/benchmarks.md); they
    become rows on the torch thread when a draft asks for them (`upto`), a whole batch's sessions in the batch's one
    call. Staging them through a hop of its own to the torch thread per verdict queued every session of a round
    behind the batch of drafts running there (docs/benchmarks.md, tenth session)."""

    def __init__(self, drafter):
        self.width = drafter.feature_width
        self._buffer = torch.empty(0, self.width, dtype=torch.float16)
        self._folded = 0  # rows in _buffer (torch thread)
        self.count = 0  # rows staged or folded (event loop)
        self._staged: list[bytes] = []
        self._lock = threading.Lock()  # _staged: appended on the event loop, taken on the torch thread

    def stage(self, verdict) -> None:
        """On the event loop: keeps the verdict's features for the next draft."""
        if not verdict.features:
            return
        with self._lock:
            self._staged.append(verdict.features)
        self.count += len(verdict.features) // (2 * self.width)

    def upto(self, n: int) -> Callable[[], torch.Tensor]:
        """A function giving rows 0..n-1 (on the torch thread): the count when the draft was asked for, so rows a
        later verdict stages (the committed tokens a proactive draft guessed at) never pair with its guesses."""
        return lambda: self._rows()[:n]

    def _rows(self) -> torch.Tensor:
        with self._lock:
            staged, self._staged = self._staged, []
        for data in staged:
            new = torch.frombuffer(bytearray(data), dtype=torch.float16).view(-1, self.width)
            if self._folded + new.shape[0] > self._buffer.shape[0]:
                grown = torch.empty(max(2 * self._buffer.shape[0], self._folded + new.shape[0]), self.width,
                                    dtype=torch.float16)
                grown[: self._folded] = self._buffer[: self._folded]
                self._buffer = grown
            self._buffer[self._folded : self._folded + new.shape[0]] = new
            self._folded += new.shape[0]
        return self._buffer[: self._folded]


def tree_for(shape: TreeShape | str | None, drafter, info, depth: int) -> TreeShape | None:
    """The draft tree a session drafts, or None for chains: the drafter drafts trees, the verifier verifies them
    (GetModelInfo.max_tree_nodes), and a tree of this shape `depth` deep fits that limit. shape FOLLOW_VERIFIER:
    the verifier's advice (GetModelInfo.draft_tree; empty = chains)."""
    if shape == FOLLOW_VERIFIER:
        try:
            shape = TreeShape.parse(info.draft_tree)
        except ValueError:  # advice this drafter cannot read: chains
            log.warning("the verifier advises draft trees %r, which this drafter cannot read: drafting chains",
                        info.draft_tree)
            shape = None
    if shape is None or not drafter.can_draft_trees or shape.nodes(depth) > info.max_tree_nodes:
        return None
    return shape


class DrafterServicer(drafter_pb2_grpc.DrafterServiceServicer):
    def __init__(self, batcher: DraftBatcher, default_draft_tokens: int = 5, proactive: bool = False,
                 tree: TreeShape | str | None = None):
        """proactive: while a block is being verified, draft the next one as if the block and the drafter's own
        guess of the bonus token were accepted; use it if the verdict agrees, else throw it away. Pays when the
        drafter has its own device; on a shared CPU it only competes with verification. Only an idle drafter drafts
        ahead: about one such draft in five is used (an H200 at 64 users: 1,237 of 5,867), so under load they
        queued in front of drafts sure to be used and cost 21-23% of the throughput (docs/benchmarks.md, eleventh
        session). tree: draft trees of this
        shape, max_draft_tokens deep, where the drafter and the verifier can (a session drafting trees keeps its
        depth and drafts nothing ahead); None = chains; FOLLOW_VERIFIER = the verifier's advice."""
        self.batcher = batcher
        self.default_draft_tokens = default_draft_tokens
        self.proactive = proactive
        self.tree = tree
        self._links: dict[str, VerifierLink] = {}
        self.draining = False
        self.sessions_in_flight = 0

    def _link(self, address: str) -> VerifierLink:
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = VerifierLink(address)
        return link

    def _drafts_ahead(self, draft: Draft, k_now: int, fixed_output: bool) -> bool:
        """Whether to draft the next block while this one is verified (proactive; chains only): on an idle drafter,
        and always for a session whose output depends on its drafts (a seeded sampled one: the draws its drafts
        ahead take from its generator must not depend on the load, or its output would not reproduce)."""
        return (self.proactive and bool(draft.tokens) and k_now > 0 and draft.parents is None
                and (self.batcher.idle or fixed_output))

    async def Draft(self, request, context):
        spec = request.session
        if self.draining:
            await context.abort(Unavailable.code, "this drafter is shutting down; retry on another")
        if not request.verifier_address:
            await context.abort(InvalidInput.code, "DraftRequest.verifier_address is empty: name the verifier")
        k_max = request.max_draft_tokens or self.default_draft_tokens
        k = k_max
        sampling = SamplingConfig(spec.temperature, spec.top_p or 1.0, spec.top_k)
        fixed_output = output_depends_on_drafts(spec.temperature, spec.HasField("seed"))
        generator = torch.Generator()
        if spec.HasField("seed"):  # the drafter's own stream, distinct from the verifier's
            generator.manual_seed((spec.seed ^ 0x5DEECE66D) & 0xFFFF_FFFF_FFFF_FFFF)
        link = self._link(request.verifier_address)
        drafter = self.batcher.drafter
        span = telemetry.start_span("specdec.v1.DrafterService/Draft", telemetry.metadata_carrier(context),
                                    attributes={"specdec.session_id": spec.session_id,
                                                "specdec.verifier": request.verifier_address})
        if span is not None:  # the verifier's span of this session becomes a child of this one
            spec.trace_context.update(telemetry.trace_headers(span))
        error = None
        self.sessions_in_flight += 1
        opened = False
        features = _Features(drafter) if wants_features(drafter, len(spec.prompt_ids)) else None
        spec.return_features = features is not None
        spec.feature_layers[:] = drafter.feature_layers if features is not None else []
        try:
            await self.batcher.open(spec.session_id)
            tree = None if self.tree is None else tree_for(self.tree, drafter, await link.model_info(), k_max)
            verdict = await link.open(spec)
            opened = True
            context_tokens = list(spec.prompt_ids) + list(verdict.update.token_ids)
            if features is not None:
                features.stage(verdict)
            wire_bytes = spec.ByteSize() + verdict.ByteSize()
            yield drafter_pb2.DraftResponse(update=verdict.update, wire_bytes=wire_bytes)
            draft: Draft | None = None
            phases = self.batcher.phases
            while not verdict.update.finish_reason:
                round_started = time.perf_counter()
                k_now = allowed_draft_length(verdict, k)
                if draft is None:
                    draft = await self.batcher.propose(
                        DraftRequest(spec.session_id, context_tokens, k_now, sampling, generator,
                                     features and features.upto(features.count), tree)
                    )
                    phases.since("draft", round_started)
                block = verifier_pb2.DraftBlock(
                    session_id=spec.session_id,
                    committed_length=verdict.update.committed_length,
                    token_ids=draft.tokens,
                    parents=draft.parents or [],
                )
                if any(ids for ids, _ in draft.distributions):
                    for ids, probs in draft.distributions:
                        block.distributions.add(token_ids=ids, probs=probs)
                sending = asyncio.ensure_future(link.send_block(block))
                sent = time.perf_counter()
                ahead = None
                if self._drafts_ahead(draft, k_now, fixed_output):
                    k_ahead = next_draft_length(k, len(draft.tokens), len(draft.tokens), k_max)
                    ahead = asyncio.ensure_future(self.batcher.propose(DraftRequest(
                        spec.session_id, context_tokens + draft.tokens, k_ahead + 1, sampling, generator,
                        features and features.upto(features.count))))
                    phases.count("ahead_drafts")
                try:
                    verdict = await sending
                except BaseException:
                    if ahead:
                        ahead.cancel()
                    raise
                phases.since("verify", sent)
                if draft.parents is None:  # a tree keeps its depth: its nodes, not its depth, are the bet
                    k = next_draft_length(k, len(draft.tokens), verdict.accepted, k_max)
                wire_bytes += block.ByteSize() + verdict.ByteSize()
                context_tokens.extend(verdict.update.token_ids)
                if features is not None:
                    features.stage(verdict)
                responding = time.perf_counter()
                yield drafter_pb2.DraftResponse(update=verdict.update, wire_bytes=wire_bytes)
                responded = phases.since("respond", responding)
                draft = None
                if ahead:
                    draft = await _usable_ahead(ahead, block, verdict, allowed_draft_length(verdict, k))
                    phases.since("ahead_wait", responded)
                    phases.count("ahead_used", draft is not None)
                phases.since("round", round_started)
            opened = False  # the verifier closes finished sessions itself
        except SpecdecError as exc:
            error = exc
            await context.abort(exc.code, str(exc))
        finally:
            telemetry.end_span(span, error)
            self.sessions_in_flight -= 1
            self.batcher.close(spec.session_id)
            if opened:  # cancelled or failed mid-session: free the verifier's KV now
                link.close_session(spec.session_id)

    async def aclose(self) -> None:
        log.info(self.batcher.phases.summary_line("drafter"))
        for link in self._links.values():
            await link.aclose()
