"""The drafter tier: proposes candidate blocks for sessions and relays what verifiers commit."""
