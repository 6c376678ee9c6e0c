"""Triton kernels of the fused ops (GPU; tested on CPU under ``TRITON_INTERPRET=1``)."""
