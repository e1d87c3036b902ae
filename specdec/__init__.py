"""specdec: disaggregated speculative decoding over gRPC.

This package is the part every tier shares: the Python SDK (`Client`, `AsyncClient`), the command line, the
protobuf contract, model loading, the Llama engine and the lossless verification math.
"""

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


def __getattr__(name: str):
    # The SDK is imported on first use, so tools that only need the engine or the models (training, GPU
    # scripts) do not need the generated gRPC code or a matching grpcio.
    if name in __all__:
        from specdec import client

        return getattr(client, name)
    raise AttributeError(f"module 'specdec' has no attribute {name!r}")
