"""specdec: disaggregated speculative decoding over gRPC.

This package is the part every tier shares: the Python SDK (`Client`, `AsyncClient`), the command line, the
protobuf contract, model loading, the Llama engine and the lossless verification math.
"""

from specdec.client import (
    AsyncClient,
    CancelledError,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    SpecdecError,
    UnavailableError,
)

__all__ = [
    "AsyncClient",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "ResourceExhaustedError",
    "SpecdecError",
    "UnavailableError",
]
