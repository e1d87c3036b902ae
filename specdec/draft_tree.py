"""A draft tree's shape (`--draft-tree`, GetModelInfo.draft_tree): a value every tier and the command line read, kept
apart from the drafters so that parsing a flag loads no model code."""

from __future__ import annotations

from dataclasses import dataclass

FOLLOW_VERIFIER = "auto"  # `--draft-tree auto`: draft the trees the verifier advises (GetModelInfo.draft_tree)


@dataclass(frozen=True)
class TreeShape:
    """A draft tree's shape: the root gets `branch` children, and at each next level the `beam` likeliest nodes
    get `branch` children each (depth: the request's k)."""

    branch: int
    beam: int

    @classmethod
    def parse(cls, spec: str) -> "TreeShape | None":
        """'BRANCHxBEAM' (e.g. '4x4'), or 'off'/'' for chains; ValueError with the expected form otherwise."""
        if spec.strip().lower() in ("", "off", "none"):
            return None
        try:
            branch, beam = (int(v) for v in spec.lower().split("x"))
        except ValueError:
            raise ValueError(f"draft tree {spec!r}: write BRANCHxBEAM, e.g. 4x4, or off") from None
        if branch < 1 or beam < 1:
            raise ValueError(f"draft tree {spec!r}: branch and beam must be at least 1")
        return cls(branch, beam)

    def nodes(self, depth: int) -> int:
        """The most tokens a tree of this shape holds at `depth` levels."""
        return self.branch + max(0, depth - 1) * self.beam * self.branch if depth else 0

    def __str__(self) -> str:
        return f"{self.branch}x{self.beam}"
