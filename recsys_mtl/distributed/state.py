"""Moving values between a sharded model and full (unsharded) tensors.

TorchRec ships equivalent helpers only in its test utilities, which are not importable from the
1.8.0 wheel (they import a module missing from it), so we keep a small one of our own.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor


def local_pieces(t: torch.Tensor) -> Iterator[tuple[torch.Tensor, tuple[int, ...]]]:
    """This rank's pieces of a (possibly sharded) tensor with their offsets in the full tensor.

    Handles ``ShardedTensor`` (table/row/table-row-wise), ``DTensor`` wrapping local shards
    (column-wise) and plain tensors (data-parallel / dense parameters, offset 0).
    """
    if isinstance(t, ShardedTensor):
        for shard in t.local_shards():
            yield shard.tensor, tuple(shard.metadata.shard_offsets)
    elif isinstance(t, DTensor):
        local = t.to_local()
        if hasattr(local, "local_shards"):
            for piece, offsets in zip(local.local_shards(), local.local_offsets()):
                yield piece, tuple(offsets)
        else:  # a regular DTensor placement: fall back to the full tensor on every rank
            yield t.full_tensor(), (0,) * t.dim()
    else:
        yield t, (0,) * t.dim()


def _slice(full: torch.Tensor, piece: torch.Tensor, offsets: tuple[int, ...]) -> torch.Tensor:
    idx = tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape))
    return full[idx]


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Copies full tensors (e.g. an unsharded model's ``state_dict()``) into ``model``'s shards.

    Args:
        model (nn.Module): a ``DistributedModelParallel`` (or any) model.
        full (Mapping[str, torch.Tensor]): full-size tensors keyed like ``model.state_dict()``.
        strict (bool): every key of ``model.state_dict()`` must be present in ``full``.
    """
    for name, t in model.state_dict().items():
        key = name if name in full else name.removeprefix("_dmp_wrapped_module.").removeprefix("module.")
        if key not in full:
            if strict:
                raise KeyError(f"{name} missing from the full state dict")
            continue
        src = full[key]
        for piece, offsets in local_pieces(t):
            piece.copy_(_slice(src, piece, offsets).to(piece.dtype))


def max_abs_diff(model: nn.Module, full: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """Largest ``|sharded - full|`` per tensor over this rank's pieces (keys filtered by ``prefix``)."""
    out = {}
    for name, t in model.state_dict().items():
        key = name.removeprefix("_dmp_wrapped_module.").removeprefix("module.")
        if not key.startswith(prefix) or key not in full:
            continue
        diffs = [
            float((piece.detach() - _slice(full[key], piece, offsets)).abs().max())
            for piece, offsets in local_pieces(t)
            if piece.numel() > 0
        ]
        if diffs:
            out[key] = max(diffs)
    return out
