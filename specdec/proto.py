"""The generated protobuf modules, imported in one place with an actionable error when they are missing."""

try:
    from specdec.v1 import (  # noqa: F401
        drafter_pb2,
        drafter_pb2_grpc,
        generation_pb2,
        generation_pb2_grpc,
        session_pb2,
        verifier_pb2,
        verifier_pb2_grpc,
    )
except ImportError as exc:  # pragma: no cover - only without `make protos`
    raise ImportError(
        "specdec's protobuf code is generated at install time and is missing: run `make protos` (or `make install`)"
    ) from exc
