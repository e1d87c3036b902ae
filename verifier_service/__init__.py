"""The verifier tier: runs the target model, verifies drafters' blocks in batched forward passes."""
