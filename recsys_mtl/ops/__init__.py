"""Fused ops: one dispatcher per op (``<op>.py``), a PyTorch reference (``pytorch/``) and Triton
kernels (``triton/``)."""
