"""Reference masked linear: ``y_s = x_s (W ⊙ M_s)ᵀ + b`` for every subnet ``s``, and bit packing of
the masks (1 bit per weight)."""

from __future__ import annotations

import torch


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """Packs boolean masks along the last dim, 8 weights per byte, little-endian within a byte.

    Args:
        masks (Tensor): ``S x N x K`` bool (or 0/1) masks.

    Returns:
        Tensor: ``S x N x ceil(K/8)`` uint8; bit ``j`` of byte ``c`` is weight ``8c + j``.

    Example::

        >>> pack_masks(torch.tensor([[[1, 0, 1, 1, 0, 0, 0, 0, 1]]], dtype=torch.bool))
        tensor([[[13,  1]]], dtype=torch.uint8)
    """
    s, n, k = masks.shape
    pad = (-k) % 8
    bits = torch.nn.functional.pad(masks.to(torch.uint8), (0, pad)).view(s, n, -1, 8)  # S x N x C x 8
    weights = (1 << torch.arange(8, dtype=torch.int32, device=masks.device)).to(torch.uint8)  # 8
    return (bits * weights).sum(-1, dtype=torch.int32).to(torch.uint8)  # S x N x C


def unpack_masks(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_masks`: ``S x N x C`` uint8 -> ``S x N x in_features`` bool.

    Example::

        >>> unpack_masks(torch.tensor([[[13, 1]]], dtype=torch.uint8), 9).int()
        tensor([[[1, 0, 1, 1, 0, 0, 0, 0, 1]]], dtype=torch.int32)
    """
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)  # 8
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # S x N x C x 8
    return bits.flatten(-2)[..., :in_features].bool()  # S x N x K


def masked_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed_masks: torch.Tensor
) -> torch.Tensor:
    """Every subnet's masked linear layer with plain autograd (a dense masked weight per subnet).

    Args:
        x (Tensor): ``B x K`` (one input for every subnet) or ``S x B x K`` (one per subnet).
        weight (Tensor): ``N x K``.
        bias (Tensor | None): ``N`` (unmasked, shared by the subnets).
        packed_masks (Tensor): ``S x N x ceil(K/8)`` uint8 from :func:`pack_masks`.

    Returns:
        Tensor: ``S x B x N``.
    """
    masks = unpack_masks(packed_masks, weight.shape[1]).to(weight.dtype)  # S x N x K
    w = weight.unsqueeze(0) * masks  # S x N x K
    if x.dim() == 2:
        y = torch.einsum("bk,snk->sbn", x, w)  # S x B x N
    else:
        y = torch.einsum("sbk,snk->sbn", x, w)  # S x B x N
    return y if bias is None else y + bias
