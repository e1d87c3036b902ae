"""Protobuf <-> domain objects for the messages the tiers share (translation happens at the edge only)."""

from __future__ import annotations

from specdec.proto import session_pb2
from specdec.sampling import SamplingConfig
from specdec.validation import check_sampling
from verifier_service.session import Session, SessionSettings


def settings_from_spec(spec: session_pb2.SessionSpec, max_new_tokens_limit: int) -> SessionSettings:
    """Validates and converts; raises InvalidInput with an actionable message."""
    check_sampling(spec.max_new_tokens, spec.temperature, spec.top_p, max_new_tokens_limit)
    sampling = SamplingConfig(
        temperature=float(spec.temperature), top_p=float(spec.top_p) if spec.top_p > 0 else 1.0, top_k=spec.top_k
    )
    seed = spec.seed if spec.HasField("seed") else None
    return SessionSettings(spec.session_id, list(spec.prompt_ids), spec.max_new_tokens, sampling, seed,
                           return_features=spec.return_features, feature_layers=tuple(spec.feature_layers))


def update_of(session: Session, tokens: list[int]) -> session_pb2.SessionUpdate:
    s = session.stats
    return session_pb2.SessionUpdate(
        token_ids=tokens,
        committed_length=len(session.tokens),
        finish_reason=session.finish,
        stats=session_pb2.SessionStats(
            cached_prompt_tokens=s.cached_prompt_tokens,
            draft_tokens=s.draft_tokens,
            accepted_draft_tokens=s.accepted_draft_tokens,
            verify_steps=s.verify_steps,
            drafted_by_position=s.drafted_by_position,
            accepted_by_position=s.accepted_by_position,
        ),
    )
