"""The verifier's gRPC edge: VerifierService over a Scheduler.

Translates protobuf to domain objects and domain errors to status codes; all model work is the scheduler's.
A Verify stream multiplexes many sessions: an error in one session is sent as that session's VerifyError and
the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from specdec import telemetry
from specdec.convert import settings_from_spec, update_of
from specdec.errors import SpecdecError
from specdec.proto import verifier_pb2, verifier_pb2_grpc
from specdec.sampling import output_depends_on_drafts
from specdec.validation import DEFAULT_MAX_NEW_TOKENS_LIMIT
from verifier_service.scheduler import DraftDistribution, Scheduler
from verifier_service.session import FINISH_NONE

log = logging.getLogger(__name__)

# Sessions in flight from which speculation lost throughput, measured with the default target and the shipped
# drafters (docs/benchmarks.md): on the CPU (2 cores shared by the tiers) it gained 1.08-1.10x for 1 user and lost
# 2x at 2 users; on an H200 it gained 1.11x at 4 users and lost at 16 (0.69x).
SPECULATION_MAX_SESSIONS = {"cpu": 1, "cuda": 8}
# Draft length that paid best for one user with the default drafter (docs/benchmarks.md): on the CPU, where verifying
# 6 tokens costs 1.6x one, k = 2-3 gave 1.23-1.24x speculation off against 1.12x for k = 5 (same run); on an H200,
# where a 6-token verify costs 1.2x one, k = 5 is what was measured.
ADVISED_DRAFT_TOKENS = {"cpu": 3, "cuda": 5}


def draft_limit(settings, sessions_in_flight: int, max_sessions: int) -> int | None:
    """VerifyResponse.max_draft_tokens for a session: 0 while this verifier holds more than `max_sessions`
    sessions (0 = no advice), else none. Seeded sampled sessions are never limited (output_depends_on_drafts)."""
    if output_depends_on_drafts(settings.sampling.temperature, settings.seed is not None):
        return None
    return 0 if 0 < max_sessions < sessions_in_flight else None


class VerifierServicer(verifier_pb2_grpc.VerifierServiceServicer):
    def __init__(self, scheduler: Scheduler, model_name: str, max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT,
                 speculation_max_sessions: int | None = None, draft_tokens: int | None = None):
        """speculation_max_sessions: with more sessions than this in flight, drafts cost this verifier more than
        they save (advised to routers, and to drafters with each verdict); draft_tokens: the draft length advised to
        routers. None = the measured default for the engine's device (SPECULATION_MAX_SESSIONS,
        ADVISED_DRAFT_TOKENS), 0 = no advice."""
        self.scheduler = scheduler
        self.model_name = model_name
        self.max_new_tokens_limit = max_new_tokens_limit
        device = scheduler.engine.device.type
        self.speculation_max_sessions = (SPECULATION_MAX_SESSIONS.get(device, 0) if speculation_max_sessions is None
                                         else speculation_max_sessions)
        advised = ADVISED_DRAFT_TOKENS.get(device, 0) if draft_tokens is None else draft_tokens
        self.draft_tokens = min(advised, scheduler.max_draft_tokens)
        self.draft_tree = ""  # the tree shape advised to drafters, "" = chains (verifier_service.tree_advice)

    async def GetModelInfo(self, request, context):
        s = self.scheduler
        return verifier_pb2.GetModelInfoResponse(
            model=self.model_name,
            vocab_size=s.vocab_size,
            max_sequence_length=s.max_sequence_length,
            max_draft_tokens=s.max_draft_tokens,
            eos_token_ids=sorted(s.eos_ids),
            speculation_max_sessions=self.speculation_max_sessions,
            draft_tokens=self.draft_tokens,
            max_tree_nodes=s.max_tree_nodes,
            verify_batches=True,
            draft_tree=self.draft_tree,
        )

    async def Decode(self, request, context):
        session_id = request.session.session_id
        span = telemetry.start_span("specdec.v1.VerifierService/Decode", telemetry.metadata_carrier(context),
                                    attributes={"specdec.session_id": session_id})
        error = None
        try:
            settings = settings_from_spec(request.session, self.max_new_tokens_limit)
            result = await self.scheduler.open(settings)
            yield verifier_pb2.DecodeResponse(update=update_of(result.session, result.tokens))
            while result.session.finish == FINISH_NONE:
                result = await self.scheduler.step(session_id, len(result.session.tokens), [], chunk=True)
                yield verifier_pb2.DecodeResponse(update=update_of(result.session, result.tokens))
        except SpecdecError as exc:
            error = exc
            await context.abort(exc.code, str(exc))
        finally:
            self.scheduler.close(session_id)
            telemetry.end_span(span, error)

    async def Verify(self, request_iterator, context):
        responses: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        opened: set[str] = set()
        spans: dict = {}  # session id -> its span on this stream (only while tracing)

        def end_span(session_id: str, error=None) -> None:
            telemetry.end_span(spans.pop(session_id, None), error)

        async def handle(request):
            kind = request.WhichOneof("kind")
            if kind is None:
                return  # an empty message from a newer drafter; nothing to do
            session_id = request.open.session_id if kind == "open" else getattr(request, kind).session_id
            try:
                if kind == "close":
                    self.scheduler.close(session_id)
                    end_span(session_id)
                    return
                if kind == "open":
                    opened.add(session_id)
                    span = telemetry.start_span("specdec.v1.VerifierService/Verify", request.open.trace_context,
                                                attributes={"specdec.session_id": session_id})
                    if span is not None:
                        spans[session_id] = span
                    result = await self.scheduler.open(settings_from_spec(request.open, self.max_new_tokens_limit))
                    accepted = 0
                else:
                    block = request.block
                    dists = [DraftDistribution(list(d.token_ids), list(d.probs)) for d in block.distributions]
                    parent = spans.get(session_id)
                    step_span = None if parent is None else telemetry.start_span(
                        "verify block", parent=parent, kind=telemetry.SpanKind.INTERNAL,
                        attributes={"specdec.draft_tokens": len(block.token_ids)})
                    try:
                        result = await self.scheduler.step(
                            session_id, block.committed_length, list(block.token_ids), dists or None,
                            draft_parents=list(block.parents) or None,
                        )
                    except BaseException as exc:
                        telemetry.end_span(step_span, exc)
                        raise
                    accepted = result.accepted
                    if step_span is not None:
                        telemetry.end_span(step_span, attributes={"specdec.accepted_tokens": accepted,
                                                                  "specdec.batch_rows": result.batch_rows})
                limit = draft_limit(result.session.settings, len(self.scheduler.sessions),
                                    self.speculation_max_sessions)
                if result.session.finish != FINISH_NONE:
                    self.scheduler.close(session_id)
                    end_span(session_id)
                responses.put_nowait(
                    verifier_pb2.VerifyResponse(
                        session_id=session_id, update=update_of(result.session, result.tokens), accepted=accepted,
                        features=b"" if result.features is None else result.features.numpy().tobytes(),
                        max_draft_tokens=limit,
                    )
                )
            except Exception as exc:  # fails this session only, whatever went wrong: a drafter must never wait
                if not isinstance(exc, SpecdecError):  # (a bug, or the device failing: INTERNAL, and logged)
                    log.exception("session %s failed on an unexpected error", session_id)
                    exc = SpecdecError(f"the verifier failed on this session: {type(exc).__name__}: {exc}")
                self.scheduler.close(session_id)
                end_span(session_id, exc)
                error = verifier_pb2.VerifyError(code=exc.code.value[0], message=str(exc))
                responses.put_nowait(verifier_pb2.VerifyResponse(session_id=session_id, error=error))

        batched = False  # the drafter sends batches, so it reads batched verdicts

        async def read():
            nonlocal batched
            async for request in request_iterator:
                if request.WhichOneof("kind") == "batch":
                    batched = True
                    requests = [r for r in request.batch.requests if r.WhichOneof("kind") != "batch"]
                else:
                    requests = [request]
                for one in requests:
                    task = asyncio.create_task(handle(one))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)

        def ready(first: verifier_pb2.VerifyResponse) -> list[verifier_pb2.VerifyResponse]:
            """first and every verdict queued behind it: one message for a batching drafter, else one each.
            (A tick's verdicts are queued together: the sessions it served resume one after another before this
            writer runs again.)"""
            out = [first]
            while not responses.empty():
                out.append(responses.get_nowait())
            if batched and len(out) > 1:
                return [verifier_pb2.VerifyResponse(batch=out)]
            return out

        reader = asyncio.create_task(read())
        try:
            while True:
                getter = asyncio.ensure_future(responses.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    for message in ready(getter.result()):
                        yield message
                    continue
                getter.cancel()
                if reader.exception():
                    raise reader.exception()
                if tasks:  # the drafter closed its side: finish the sessions in flight, then end
                    await asyncio.wait(tasks)
                while not responses.empty():
                    yield responses.get_nowait()
                return
        except grpc.aio.AioRpcError:
            return
        finally:
            reader.cancel()
            for task in tasks:
                task.cancel()
            for session_id in opened:  # a dropped drafter frees its sessions' KV at once
                self.scheduler.close(session_id)
            for session_id in list(spans):
                end_span(session_id, "the Verify stream ended before the session finished")
