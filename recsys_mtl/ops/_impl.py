"""Which implementation a fused op takes for a call: the Triton kernels or PyTorch."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

IMPLS = ("triton", "torch")


class ImplChoice:
    """Per op: a forced choice inside :meth:`force` blocks, else the environment variable ``env``
    (``triton`` or ``torch``), else Triton for CUDA tensors and PyTorch elsewhere. (Tests run the
    Triton kernels on CPU under ``TRITON_INTERPRET=1`` by forcing ``triton``.)

    Args:
        env (str): the op's override variable, e.g. ``RECSYS_MTL_MASKED_LINEAR_IMPL``.

    Example::

        >>> choice = ImplChoice("RECSYS_MTL_EXAMPLE_IMPL")
        >>> choice.use_triton(torch.zeros(1))
        False
        >>> with choice.force("triton"):
        ...     choice.use_triton(torch.zeros(1))
        True
    """

    def __init__(self, env: str) -> None:
        self.env = env
        self.forced: str | None = None

    @contextlib.contextmanager
    def force(self, impl: str | None) -> Iterator[None]:
        """Within the block every call takes ``impl`` (``"triton"`` or ``"torch"``) whatever the device."""
        if impl not in (None, *IMPLS):
            raise ValueError(f"impl must be 'triton', 'torch' or None, got {impl!r}")
        before, self.forced = self.forced, impl
        try:
            yield
        finally:
            self.forced = before

    def use_triton(self, t: torch.Tensor) -> bool:
        impl = self.forced or os.environ.get(self.env) or ("triton" if t.device.type == "cuda" else "torch")
        if impl not in IMPLS:
            raise ValueError(f"{self.env} must be 'triton' or 'torch', got {impl!r}")
        return impl == "triton"
