"""The router tier: the client-facing Generation service; pairs sessions with drafters and verifiers."""
