"""PyTorch references of the fused ops (the ground truth of their parity tests)."""
