"""The router's gRPC edge: specdec.v1.Generation.

Per request: turn the input into token ids (chat template for `chat`), check it, pick a verifier and (unless
speculation is off) a drafter, relay the committed tokens through the TextStreamer (UTF-8 safety, stop strings),
and fill `usage` on the last message. The router keeps each session's committed tokens: if a drafter fails the
session continues on the verifier alone, and if a verifier fails it resumes on another by prefilling prompt +
committed tokens. The client sees every token exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import grpc

from router.pool import Pod, Pool
from router.scoring import Chooser, Locator
from router.text import TextStreamer
from specdec import telemetry
from specdec.errors import InvalidInput, SpecdecError, Unavailable
from specdec.proto import (
    drafter_pb2,
    drafter_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    session_pb2,
    verifier_pb2,
    verifier_pb2_grpc,
)
from specdec.sampling import output_depends_on_drafts
from specdec.validation import DEFAULT_MAX_NEW_TOKENS_LIMIT, check_prompt_ids, check_sampling

log = logging.getLogger(__name__)

_ROLES = ("system", "user", "assistant")
# Failures that say "this pod, now" rather than "this request": worth another pod.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
_MAX_ATTEMPTS = 4


class RouterServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(
        self,
        tokenizer,
        verifiers: Pool,
        drafters: Pool,
        default_draft_tokens: int = -1,
        max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT,
        locator: Locator | None = None,
        chooser: Chooser | None = None,
        speculation_max_sessions: int = 0,
    ):
        """default_draft_tokens: k for requests that leave it unset (-1 = the verifiers' advice in GetModelInfo,
        else 5). speculation_max_sessions: a verifier with this many sessions in flight gets new sessions without
        a drafter (0 = no limit; -1 = the limit the verifiers advise in GetModelInfo): under load drafts cost the
        verifier more than they save."""
        self.tokenizer = tokenizer
        self.locator = locator or Locator()
        self.chooser = chooser or Chooser()
        self.verifiers = verifiers
        self.drafters = drafters
        self.default_draft_tokens = default_draft_tokens
        self.speculation_max_sessions = speculation_max_sessions
        self.max_new_tokens_limit = max_new_tokens_limit
        self.draining = False
        self.in_flight = 0
        self.metrics: telemetry.RouterMetrics | None = None  # set by the app when metrics are on
        self._info: verifier_pb2.GetModelInfoResponse | None = None

    # -- input -------------------------------------------------------------------------------------------------------
    def prompt_ids(self, request: generation_pb2.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind is None:
            raise InvalidInput("no input: set one of prompt, chat or tokens")
        if kind == "tokens":
            return list(request.tokens.ids)
        if kind == "prompt":
            if not request.prompt:
                raise InvalidInput("the prompt is empty: send some text")
            return list(self.tokenizer.encode(request.prompt))
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        if not messages:
            raise InvalidInput("chat has no messages: send at least one user message")
        for i, m in enumerate(messages):
            if m["role"] not in _ROLES:
                raise InvalidInput(f"chat message {i} has role {m['role']!r}; use one of {', '.join(_ROLES)}")
        return chat_ids(self.tokenizer, messages)

    async def model_info(self) -> verifier_pb2.GetModelInfoResponse:
        if self._info is None:
            for pod in self.verifiers.pods:
                try:
                    stub = verifier_pb2_grpc.VerifierServiceStub(pod.channel)
                    self._info = await stub.GetModelInfo(verifier_pb2.GetModelInfoRequest(), timeout=10)
                    self.locator.bind(self._info.model)  # hash prompts under the verifiers' model identity
                    break
                except grpc.aio.AioRpcError as exc:
                    log.warning("verifier %s did not answer GetModelInfo: %s", pod.address, exc.code().name)
            else:
                raise Unavailable(f"no verifier reachable; check {self.verifiers.origin} and that verifiers are up")
        return self._info

    # -- the RPC -----------------------------------------------------------------------------------------------------
    async def Generate(self, request, context):
        """Times and traces the request (gen_ai.server.* metrics, the Generate span) around `_generate`."""
        started, first, last, error = time.perf_counter(), None, None, None
        span = telemetry.start_span("specdec.v1.Generation/Generate", telemetry.metadata_carrier(context))
        try:
            async with contextlib.aclosing(self._generate(request, context, span)) as responses:
                async for response in responses:
                    first = first or time.perf_counter()
                    last = response
                    yield response
        except BaseException as exc:  # aborts, cancellations: recorded, then re-raised as they were
            error = exc
            raise
        finally:
            ended = time.perf_counter()
            finished = error is None and last is not None and last.finish_reason
            error_type = None if finished else _error_type(error, context)
            if self.metrics is not None:
                tokens = last.usage.completion_tokens if last is not None else 0
                self.metrics.request_done(started, first, ended, tokens, error_type)
            telemetry.end_span(span, error_type)

    async def _generate(self, request, context, span=None):
        try:
            if self.draining:
                raise Unavailable("this router is shutting down; retry")
            sampling = request.sampling
            check_sampling(sampling.max_new_tokens, sampling.temperature, sampling.top_p, self.max_new_tokens_limit)
            prompt = self.prompt_ids(request)
            info = await self.model_info()
            check_prompt_ids(prompt, info.vocab_size, info.max_sequence_length)
        except SpecdecError as exc:
            await context.abort(exc.code, str(exc))
        k = self._draft_tokens(request, info)
        streamer = TextStreamer(self.tokenizer, list(sampling.stop))
        usage = generation_pb2.Usage(prompt_tokens=len(prompt))
        timeout = context.time_remaining()
        route: dict[str, str] = {}
        self.in_flight += 1
        try:
            session = self._session(prompt, sampling, k, usage, timeout, request.session_id, route, span)
            async with contextlib.aclosing(session) as updates:
                async for update in updates:
                    chunk = streamer.push(list(update.token_ids))
                    finish = generation_pb2.FINISH_REASON_STOP if chunk.stopped else update.finish_reason
                    if finish and not chunk.stopped:
                        tail = streamer.flush()
                        chunk.token_ids += tail.token_ids
                        chunk.text += tail.text
                    if finish:
                        usage.completion_tokens = streamer.emitted_tokens
                        # Where the session ran and how it was routed: for operators and the locality tests.
                        context.set_trailing_metadata(tuple((f"x-specdec-{k}", v) for k, v in route.items()))
                        yield generation_pb2.GenerateResponse(
                            token_ids=chunk.token_ids, text=chunk.text, finish_reason=finish, usage=usage
                        )
                        return
                    if chunk.token_ids:
                        yield generation_pb2.GenerateResponse(token_ids=chunk.token_ids, text=chunk.text)
        except SpecdecError as exc:
            await context.abort(exc.code, str(exc))
        finally:
            self.in_flight -= 1

    async def _pick_verifier(self, ids: list[int], session_id: str, exclude: set[str], route: dict) -> Pod | None:
        candidates = self.verifiers.candidates(exclude)
        cached: dict[str, int] = {}
        if self.chooser.policy == "locality" and len(candidates) > 1:
            cached = await self.locator.lookup(self.locator.hashes(ids))
        pod = self.chooser.choose(candidates, cached, session_id)
        if pod is not None and self.metrics is not None:
            self.metrics.cached_blocks.add(cached.get(pod.address, 0))
        if pod is not None:
            route.update(verifier=pod.address, routing=self.chooser.policy if self.chooser.policy != "locality"
                         else self.locator.mode, **{"cached-blocks": str(cached.get(pod.address, 0))})
        return pod

    async def _session(self, prompt: list[int], sampling, k: int, usage: generation_pb2.Usage, timeout,
                       session_id: str = "", route: dict | None = None, span=None):
        """Committed updates until the session finishes, across pod failures; `span` (or None): the request's."""
        route = {} if route is None else route
        committed: list[int] = []
        failed_drafters: set[str] = set()
        failed_verifiers: set[str] = set()
        done = session_pb2.SessionStats()  # stats of attempts that ended early
        wire_done = 0
        for _ in range(_MAX_ATTEMPTS):
            verifier = await self._pick_verifier(prompt + committed, session_id, failed_verifiers, route)
            route["attempts"] = str(int(route.get("attempts", "0")) + 1)
            if verifier is None:
                raise Unavailable("no verifier reachable; retry later")
            drafter = self.drafters.pick(failed_drafters) if self._speculate(k, sampling, verifier) else None
            spec = session_pb2.SessionSpec(
                session_id=uuid.uuid4().hex,
                prompt_ids=prompt + committed,
                max_new_tokens=sampling.max_new_tokens - len(committed),
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
            )
            if sampling.HasField("seed"):
                spec.seed = sampling.seed
            last, wire_last = session_pb2.SessionStats(), 0
            pods = [p for p in (verifier, drafter) if p is not None]
            for pod in pods:
                pod.in_flight += 1
            attempt = telemetry.start_span(
                "specdec.v1.DrafterService/Draft" if drafter else "specdec.v1.VerifierService/Decode", parent=span,
                kind=telemetry.SpanKind.CLIENT,
                attributes={"specdec.verifier": verifier.address,
                            "specdec.drafter": drafter.address if drafter else ""},
            ) if span is not None else None
            failure = None
            call = self._call(spec, verifier, drafter, k, timeout, telemetry.trace_headers(attempt))
            try:
                async for response in call:
                    update = response.update
                    committed.extend(update.token_ids)
                    last = update.stats
                    wire_last = getattr(response, "wire_bytes", 0)
                    _add_stats(usage, done, last)
                    usage.draft_wire_bytes = wire_done + wire_last
                    if update.finish_reason:  # before the yield: the consumer closes this generator after it
                        self._finished_on(verifier, session_id, prompt + committed)
                    yield update
                    if update.finish_reason:
                        return
                raise Unavailable("the session's stream ended before it finished")
            except (grpc.aio.AioRpcError, Unavailable) as exc:
                code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else grpc.StatusCode.UNAVAILABLE
                failure = code.name
                if code not in _RETRYABLE:
                    raise _as_error(exc) from None
                culprit, pool, failed = (
                    (drafter, self.drafters, failed_drafters) if drafter else (verifier, self.verifiers, failed_verifiers)
                )
                log.warning("%s failed mid-session (%s); resuming after %d tokens", culprit.address, code.name, len(committed))
                failed.add(culprit.address)
                pool.mark_down(culprit)
                _accumulate(done, last)
                wire_done += wire_last
            finally:
                call.cancel()
                for pod in pods:
                    pod.in_flight -= 1
                telemetry.end_span(attempt, failure)
        raise Unavailable(f"the session failed on {_MAX_ATTEMPTS} pods in a row; retry later")

    def _draft_tokens(self, request, info) -> int:
        """k for a request: its own max_draft_tokens (capped by the verifier's), else this router's default, else
        the verifiers' advice for their device (GetModelInfo.draft_tokens), else 5."""
        if request.speculation.HasField("max_draft_tokens"):
            return min(request.speculation.max_draft_tokens, info.max_draft_tokens)
        if self.default_draft_tokens >= 0:
            return self.default_draft_tokens
        return info.draft_tokens or 5

    def _speculate(self, k: int, sampling, verifier: Pod) -> bool:
        """Whether to attach a drafter. A saturated verifier decodes new sessions alone, except seeded sampled
        ones: their output must not depend on load (same seed, same output), and greedy output never does."""
        if k <= 0:
            return False
        limit = self.speculation_max_sessions
        if limit < 0:  # the verifiers' own advice (GetModelInfo), known once any request has asked for it
            limit = self._info.speculation_max_sessions if self._info is not None else 0
        saturated = 0 < limit <= verifier.in_flight
        return not saturated or output_depends_on_drafts(sampling.temperature, sampling.HasField("seed"))

    def _finished_on(self, verifier: Pod, session_id: str, tokens: list[int]) -> None:
        """The verifier now holds this conversation's blocks (the last token's KV is never computed)."""
        self.chooser.remember(session_id, verifier.address)
        self.locator.learned(verifier.address, self.locator.hashes(tokens, len(tokens) - 1))

    def _call(self, spec, verifier: Pod, drafter: Pod | None, k: int, timeout, trace_headers: dict | None = None):
        """trace_headers: W3C traceparent (and tracestate) for the call's metadata."""
        metadata = tuple(trace_headers.items()) if trace_headers else None
        if drafter is not None:
            stub = drafter_pb2_grpc.DrafterServiceStub(drafter.channel)
            request = drafter_pb2.DraftRequest(session=spec, verifier_address=verifier.address, max_draft_tokens=k)
            return stub.Draft(request, timeout=timeout, metadata=metadata)
        stub = verifier_pb2_grpc.VerifierServiceStub(verifier.channel)
        return stub.Decode(verifier_pb2.DecodeRequest(session=spec), timeout=timeout, metadata=metadata)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The target's chat template applied, ready for the assistant's turn."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids)


_COUNTERS = ("cached_prompt_tokens", "draft_tokens", "accepted_draft_tokens", "verify_steps")
_BY_POSITION = ("drafted_by_position", "accepted_by_position")


def _add_stats(usage: generation_pb2.Usage, done: session_pb2.SessionStats, last: session_pb2.SessionStats) -> None:
    """usage = stats of the attempts that ended early + stats of the current attempt."""
    for name in _COUNTERS:
        setattr(usage, name, getattr(done, name) + getattr(last, name))
    for name in _BY_POSITION:
        getattr(usage, name)[:] = _sum_lists(getattr(done, name), getattr(last, name))


def _accumulate(done: session_pb2.SessionStats, last: session_pb2.SessionStats) -> None:
    for name in _COUNTERS:
        setattr(done, name, getattr(done, name) + getattr(last, name))
    for name in _BY_POSITION:
        getattr(done, name)[:] = _sum_lists(getattr(done, name), getattr(last, name))


def _sum_lists(a, b) -> list[int]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


def _error_type(error: BaseException | None, context) -> str:
    """The status code name a failed request ended with (the error_type of the duration metric)."""
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
        return code.name
    if error is None or isinstance(error, (GeneratorExit, asyncio.CancelledError)):
        return grpc.StatusCode.CANCELLED.name  # the client went away before the last message
    return type(error).__name__


def _as_error(exc) -> SpecdecError:
    from specdec.errors import SessionFailed

    if isinstance(exc, SpecdecError):
        return exc
    return SessionFailed(exc.code(), exc.details() or exc.code().name)
