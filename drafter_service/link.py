"""One bidirectional Verify stream from this drafter to one verifier, shared by all sessions paired with it.

`open` and `send_block` return the verifier's verdict for that session; replies are matched by session id. If
the stream breaks, every session waiting on it fails with UNAVAILABLE and the next call opens a new stream.

Requests queued together go as one VerifyBatch message when the verifier takes batches (GetModelInfo's
verify_batches): the blocks of one batch of drafts are queued in one pass of the event loop, so a round of 64
sessions costs one message each way instead of 64 (gRPC's per-message work was the larger part of an n-gram
drafter's Python under load: docs/benchmarks.md, tenth session)."""

from __future__ import annotations

import asyncio
import logging

import grpc

from specdec.errors import SessionFailed, Unavailable, status_code_from_int
from specdec.proto import session_pb2, verifier_pb2, verifier_pb2_grpc
from specdec.server import CHANNEL_OPTIONS

log = logging.getLogger(__name__)


class VerifierLink:
    def __init__(self, address: str):
        self.address = address
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = verifier_pb2_grpc.VerifierServiceStub(self._channel)
        self._outbox: asyncio.Queue | None = None
        self._waiting: dict[str, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._info: asyncio.Future | None = None  # of the GetModelInfoResponse, asked once per link
        # Verify messages written and read (a batch counts once), for tests and benchmarks
        self.messages_sent = self.messages_received = 0

    async def model_info(self) -> verifier_pb2.GetModelInfoResponse:
        """The verifier's GetModelInfo (its limits), asked once per link however many sessions ask at once."""
        if self._info is None or (self._info.done() and (self._info.cancelled() or self._info.exception())):
            self._info = asyncio.ensure_future(self._stub.GetModelInfo(verifier_pb2.GetModelInfoRequest(), timeout=10))
        try:
            return await asyncio.shield(self._info)
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"verifier {self.address}: {exc.code().name}: {exc.details()}") from None

    async def _requests(self, outbox: asyncio.Queue, batches: bool):
        while True:
            queued = [await outbox.get()]
            while queued[-1] is not None and not outbox.empty():
                queued.append(outbox.get_nowait())
            ending = queued[-1] is None
            queued = [m for m in queued if m is not None]
            if batches and len(queued) > 1:
                queued = [verifier_pb2.VerifyRequest(batch=verifier_pb2.VerifyBatch(requests=queued))]
            for message in queued:
                self.messages_sent += 1
                yield message
            if ending:
                return

    async def _ensure_stream(self) -> asyncio.Queue:
        info = await self.model_info()
        if self._reader is None or self._reader.done():
            self._outbox = asyncio.Queue()
            call = self._stub.Verify(self._requests(self._outbox, info.verify_batches))
            self._reader = asyncio.create_task(self._read(call, self._outbox))
        return self._outbox

    async def _read(self, call, outbox: asyncio.Queue) -> None:
        error: Exception = Unavailable(f"the stream to verifier {self.address} ended")
        try:
            async for message in call:
                self.messages_received += 1
                for response in message.batch or [message]:
                    future = self._waiting.pop(response.session_id, None)
                    if future is None or future.done():
                        continue
                    if response.HasField("error"):
                        code = status_code_from_int(response.error.code)
                        future.set_exception(SessionFailed(code, response.error.message))
                    else:
                        future.set_result(response)
        except grpc.aio.AioRpcError as exc:
            error = Unavailable(f"verifier {self.address}: {exc.code().name}: {exc.details()}")
        except asyncio.CancelledError:
            call.cancel()
            raise
        finally:
            if self._outbox is outbox:
                self._outbox = None
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(error)
            self._waiting.clear()

    async def _call(self, session_id: str, request: verifier_pb2.VerifyRequest) -> verifier_pb2.VerifyResponse:
        outbox = await self._ensure_stream()
        future = asyncio.get_running_loop().create_future()
        self._waiting[session_id] = future
        outbox.put_nowait(request)
        return await future

    async def open(self, spec: session_pb2.SessionSpec) -> verifier_pb2.VerifyResponse:
        return await self._call(spec.session_id, verifier_pb2.VerifyRequest(open=spec))

    async def send_block(self, block: verifier_pb2.DraftBlock) -> verifier_pb2.VerifyResponse:
        return await self._call(block.session_id, verifier_pb2.VerifyRequest(block=block))

    def close_session(self, session_id: str) -> None:
        future = self._waiting.pop(session_id, None)
        if future and not future.done():
            future.cancel()
        if self._outbox is not None:
            self._outbox.put_nowait(verifier_pb2.VerifyRequest(close=verifier_pb2.CloseSession(session_id=session_id)))

    async def aclose(self) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
        await self._channel.close()
