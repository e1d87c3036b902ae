"""The Python SDK: `Client` and `AsyncClient` for the router's Generation service (API.md).

    with Client("127.0.0.1:50051") as c:
        for chunk in c.generate(prompt="...", max_new_tokens=64):
            print(chunk.text, end="")

`generate` streams `GenerateResponse` messages (fields token_ids, text, finish_reason, usage). Status codes
become typed exceptions. Retries (UNAVAILABLE, RESOURCE_EXHAUSTED) back off exponentially and happen only
before the first token arrives: after that, a retry could repeat text the caller has already seen.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc

from specdec.proto import generation_pb2, generation_pb2_grpc
from specdec.server import CHANNEL_OPTIONS

GenerateResponse = generation_pb2.GenerateResponse
FinishReason = generation_pb2.FinishReason


class SpecdecError(Exception):
    """A failed call; `code` is the gRPC status code."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgumentError(SpecdecError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhaustedError(SpecdecError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(SpecdecError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(SpecdecError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(SpecdecError):
    code = grpc.StatusCode.CANCELLED


_BY_CODE = {cls.code: cls for cls in (InvalidArgumentError, ResourceExhaustedError, UnavailableError,
                                      DeadlineExceededError, CancelledError)}
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


def _error(exc: grpc.RpcError) -> SpecdecError:
    code = exc.code()
    return _BY_CODE.get(code, SpecdecError)(exc.details() or code.name, code)


def build_request(
    prompt: str | None = None,
    chat: Sequence[dict] | None = None,
    tokens: Sequence[int] | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    max_draft_tokens: int | None = None,
    session_id: str = "",
) -> generation_pb2.GenerateRequest:
    given = [x is not None for x in (prompt, chat, tokens)]
    if sum(given) != 1:
        raise InvalidArgumentError("give exactly one of prompt=, chat= or tokens=")
    request = generation_pb2.GenerateRequest(session_id=session_id)
    if prompt is not None:
        request.prompt = prompt
    elif chat is not None:
        request.chat.messages.extend(generation_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in chat)
        request.chat.SetInParent()
    else:
        request.tokens.ids.extend(tokens)
        request.tokens.SetInParent()
    s = request.sampling
    s.max_new_tokens, s.temperature, s.top_p, s.top_k = max_new_tokens, temperature, top_p, top_k
    s.stop.extend(stop)
    if seed is not None:
        s.seed = seed
    if max_draft_tokens is not None:
        request.speculation.max_draft_tokens = max_draft_tokens
    return request


class Client:
    def __init__(self, address: str = "127.0.0.1:50051", retries: int = 3, backoff: float = 0.25):
        self.address = address
        self.retries = retries
        self.backoff = backoff
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, *, timeout: float | None = None, **kwargs) -> Iterator[GenerateResponse]:
        """Streams the continuation; keyword arguments as `build_request`."""
        request = build_request(**kwargs)
        for attempt in range(self.retries + 1):
            call = self._stub.Generate(request, timeout=timeout)
            started = False
            try:
                for response in call:
                    started = True
                    yield response
                return
            except grpc.RpcError as exc:
                if started or exc.code() not in _RETRYABLE or attempt == self.retries:
                    raise _error(exc) from None
            finally:
                call.cancel()
            time.sleep(self.backoff * 2**attempt * (0.5 + random.random()))

    def complete(self, **kwargs) -> str:
        """The whole continuation as one string."""
        return "".join(chunk.text for chunk in self.generate(**kwargs))


class AsyncClient:
    def __init__(self, address: str = "127.0.0.1:50051", retries: int = 3, backoff: float = 0.25):
        self.address = address
        self.retries = retries
        self.backoff = backoff
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, *, timeout: float | None = None, **kwargs) -> AsyncIterator[GenerateResponse]:
        request = build_request(**kwargs)
        for attempt in range(self.retries + 1):
            call = self._stub.Generate(request, timeout=timeout)
            started = False
            try:
                async for response in call:
                    started = True
                    yield response
                return
            except grpc.aio.AioRpcError as exc:
                if started or exc.code() not in _RETRYABLE or attempt == self.retries:
                    raise _error(exc) from None
            finally:
                call.cancel()
            await asyncio.sleep(self.backoff * 2**attempt * (0.5 + random.random()))

    async def complete(self, **kwargs) -> str:
        return "".join([chunk.text async for chunk in self.generate(**kwargs)])
