"""A shared MLP seen through S binary weight masks: S subnetworks that share one set of weights.

Sparse Sharing (Sun et al., AAAI'20) and CSRec (Bai et al., WWW'22) give every task ``t`` a
binary mask ``M_t`` over the **weights** of a shared bottom MLP; task ``t``'s subnetwork is
``s(x; M_t ⊙ Θ)`` (CSRec Eq. 1, 7). CSRec adds a contrastive mask ``M'_t`` per task (Eq. 8), so
its bottom holds ``2T`` subnetworks: ``t`` for task ``t`` and ``T + t`` for its contrastive mask.
Biases are shared unmasked.

:class:`MaskedMLP` stores, per layer, the weight ``N x K``, the bias ``N`` and one persistent
``uint8`` buffer with the bit-packed masks of all subnetworks (``S x N x ceil(K/8)``, see
:func:`recsys_mtl.ops.masked_matmul.pack_masks`), so the masks are in the state dict and in
checkpoints. Each layer of the requested subnetworks is one
:func:`~recsys_mtl.ops.masked_matmul.masked_linear` call.

Masks are buffers: optimizers never touch them, and TorchRec's data-parallel wrapper does not
broadcast buffers (``broadcast_buffers=False``), so mask updates must be made identically on every
rank (pruning is deterministic given the replicated weights; random contrastive masks need the
same generator seed on every rank).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from recsys_mtl.ops.masked_matmul import masked_linear, pack_masks, unpack_masks

__all__ = ["MaskedMLP", "pair_key", "pairs_subnets", "pair_logits"]


def pair_key(subnet: int, task: str) -> str:
    """Output key of the ``(subnet, tower task)`` pair in a masked-sharing model's ``pairs`` mode.

    Example::

        >>> pair_key(3, "click")
        'click@3'
    """
    return f"{task}@{subnet}"


@torch.fx.wrap
def _masked_relu_layer(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, packed_masks: torch.Tensor
) -> torch.Tensor:
    """One masked layer of every selected subnet, then ReLU; one leaf call under ``torch.fx``."""
    return torch.relu(masked_linear(x, weight, bias, packed_masks))  # S' x B x N


@torch.fx.wrap
def _split_masked_relu_layer(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, packed_masks: torch.Tensor, packed_no_grad: torch.Tensor
) -> torch.Tensor:
    """Like :func:`_masked_relu_layer`, but the weights in ``packed_no_grad`` (a subset of each
    subnet's mask) are read detached: the output is the same, the weight gradient of each subnet
    only flows through ``mask & ~no_grad`` (the input gradient through the whole mask)."""
    y = masked_linear(x, weight, bias, packed_masks & ~packed_no_grad)  # S' x B x N
    y = y + masked_linear(x, weight.detach(), None, packed_masks & packed_no_grad)  # S' x B x N
    return torch.relu(y)


def _select(packed: torch.Tensor, subnets: list[int] | None) -> torch.Tensor:
    """The packed masks of ``subnets`` (rows of ``packed``): the buffer itself for all subnets, a
    view for a contiguous ascending run, a gathered copy otherwise."""
    s = packed.shape[0]
    if subnets is None:
        return packed
    first, n = subnets[0], len(subnets)
    if subnets == list(range(first, first + n)):
        return packed if (first == 0 and n == s) else packed[first:first + n]  # S' x N x C view
    return packed[subnets]  # S' x N x C


class MaskedMLP(nn.Module):
    """Linear + ReLU stack (ReLU after every layer, like :class:`~recsys_mtl.modules.mlp.MLP`)
    evaluated as ``num_subnets`` masked subnetworks sharing its weights.

    Layer ``i`` owns ``weight_{i}`` (``N x K``, the ``nn.Linear`` layout), ``bias_{i}`` (``N``)
    and the persistent buffer ``masks_{i}`` (``S x N x ceil(K/8)`` uint8, all subnetworks' packed
    masks). All are registered on this module itself, so TorchRec's meta-device materialisation
    (which allocates a module's parameters and zeroes its buffers, then calls that module's
    ``reset_parameters()``) reaches them: :meth:`reset_parameters` initialises the weights like
    ``nn.Linear`` and sets every mask to all ones (the dense network).

    Args:
        in_features (int): input width ``K``.
        layer_sizes (Sequence[int]): output widths of the layers (output ``H`` is the last).
        num_subnets (int): subnetworks ``S``.
        device: where to allocate (None: the current default device, e.g. a ``torch.device``
            context such as ``"meta"``).

    Example::

        >>> mlp = MaskedMLP(6, [8, 4], num_subnets=3)
        >>> mlp(torch.randn(5, 6)).shape  # every subnet reads the same B x K input
        torch.Size([3, 5, 4])
        >>> mlp(torch.randn(5, 6), subnets=[2, 0]).shape
        torch.Size([2, 5, 4])
        >>> m = mlp.get_masks(0)
        >>> m[1, :, :3] = False  # subnet 1 drops the first 3 inputs of layer 0
        >>> mlp.set_masks(0, m[1:2], subnets=[1])
        >>> mlp.subnet_param_counts()  # weights kept + all biases
        [92, 68, 92]
    """

    def __init__(
        self,
        in_features: int,
        layer_sizes: Sequence[int],
        num_subnets: int,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if num_subnets < 1 or not layer_sizes or in_features < 1 or any(n < 1 for n in layer_sizes):
            raise ValueError(
                f"MaskedMLP needs num_subnets >= 1 and >= 1 layer of positive widths, got "
                f"in_features={in_features}, layer_sizes={list(layer_sizes)}, num_subnets={num_subnets}"
            )
        self.in_features = in_features
        self.layer_sizes = [int(n) for n in layer_sizes]
        self.num_subnets = num_subnets
        self.num_layers = len(self.layer_sizes)
        self.out_features = self.layer_sizes[-1]
        self._sizes = [in_features, *self.layer_sizes]
        for i in range(self.num_layers):
            k, n = self._sizes[i], self._sizes[i + 1]
            self.register_parameter(f"weight_{i}", nn.Parameter(torch.empty(n, k, device=device)))  # N x K
            self.register_parameter(f"bias_{i}", nn.Parameter(torch.empty(n, device=device)))  # N
            self.register_buffer(
                f"masks_{i}", torch.empty(num_subnets, n, math.ceil(k / 8), dtype=torch.uint8, device=device)
            )  # S x N x C, persistent
        # Per layer, the packed weights each subnet reads without passing them a gradient
        # (set_no_grad_masks; None: none). Training-time state, not in the state dict.
        self._no_grad: list[torch.Tensor | None] = [None] * self.num_layers
        self.reset_parameters()

    # ---- initialisation ----------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation of every layer, and every mask set to all ones."""
        self.reset_weights()
        self.reset_masks()

    @torch.no_grad()
    def reset_weights(self) -> None:
        """``nn.Linear``'s default initialisation (same draws as ``nn.Linear(K, N)``), masks unchanged."""
        for i in range(self.num_layers):
            w, b = getattr(self, f"weight_{i}"), getattr(self, f"bias_{i}")
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(self._sizes[i])
            nn.init.uniform_(b, -bound, bound)

    @torch.no_grad()
    def reset_masks(self) -> None:
        """Every subnetwork's masks to all ones, in place; the padding bits of the last byte stay
        0 (the same bytes :func:`pack_masks` gives for all-true masks)."""
        for i in range(self.num_layers):
            buf, k = getattr(self, f"masks_{i}"), self._sizes[i]
            buf.fill_(255)
            if k % 8:
                buf[..., -1] = (1 << (k % 8)) - 1

    # ---- masks ---------------------------------------------------------------------------------

    def packed_masks(self, layer: int) -> torch.Tensor:
        """The buffer of layer ``layer``: ``S x N x ceil(K/8)`` uint8 (not a copy)."""
        self._check_layer(layer)
        return getattr(self, f"masks_{layer}")

    def get_masks(self, layer: int) -> torch.Tensor:
        """Unpacked masks of every subnetwork at layer ``layer``: ``S x N x K`` bool (a new tensor)."""
        return unpack_masks(self.packed_masks(layer), self._sizes[layer])

    @torch.no_grad()
    def set_masks(self, layer: int, masks: torch.Tensor, subnets: Sequence[int] | None = None) -> None:
        """Writes masks into layer ``layer``'s buffer in place (no reallocation).

        Args:
            layer (int): layer index.
            masks (torch.Tensor): ``S' x N x K`` bool (or 0/1), one per listed subnet (``S x N x K``
                for all).
            subnets (Sequence[int] | None): subnetworks to overwrite, in ``masks`` order; None: all.
        """
        buf = self.packed_masks(layer)
        n, k = self._sizes[layer + 1], self._sizes[layer]
        sel = list(range(self.num_subnets)) if subnets is None else [int(s) for s in subnets]
        if masks.dim() != 3 or tuple(masks.shape) != (len(sel), n, k):
            raise ValueError(f"layer {layer} masks must be {len(sel)} x {n} x {k}, got {tuple(masks.shape)}")
        if any(not 0 <= s < self.num_subnets for s in sel) or len(set(sel)) != len(sel):
            raise ValueError(f"subnets must be distinct indices in [0, {self.num_subnets}), got {sel}")
        packed = pack_masks(masks.to(device=buf.device, dtype=torch.bool))  # S' x N x C
        if subnets is None:
            buf.copy_(packed)
        else:
            buf[torch.tensor(sel, device=buf.device)] = packed

    @torch.no_grad()
    def set_no_grad_masks(self, layer: int, subnets: Sequence[int] | None = None,
                          masks: torch.Tensor | None = None) -> None:
        """Weights of ``subnets`` that are read in the forward but get no gradient through them
        (CSRec's fused mode: a contrastive subnet ``M'_t`` passes gradient to ``M_t``'s weights
        only). ``masks``: ``S' x N x K`` bool, one per listed subnet (only their intersection with
        the subnet's mask matters); None clears the layer.
        """
        self._check_layer(layer)
        if masks is None:
            self._no_grad[layer] = None
            return
        buf = self.packed_masks(layer)
        sel = list(range(self.num_subnets)) if subnets is None else [int(s) for s in subnets]
        n, k = self._sizes[layer + 1], self._sizes[layer]
        if masks.dim() != 3 or tuple(masks.shape) != (len(sel), n, k):
            raise ValueError(f"layer {layer} no-grad masks must be {len(sel)} x {n} x {k}, got {tuple(masks.shape)}")
        current = self._no_grad[layer]
        if current is None:
            current = torch.zeros_like(buf)
        current[torch.tensor(sel, device=buf.device)] = pack_masks(masks.to(device=buf.device, dtype=torch.bool))
        self._no_grad[layer] = current

    def weights(self) -> list[torch.Tensor]:
        """The masked weight parameters, ``N x K`` per layer (biases are never masked)."""
        return [getattr(self, f"weight_{i}") for i in range(self.num_layers)]

    def biases(self) -> list[torch.Tensor]:
        """The bias parameters, ``N`` per layer."""
        return [getattr(self, f"bias_{i}") for i in range(self.num_layers)]

    def subnet_param_counts(self) -> list[int]:
        """Per subnetwork: weights its masks keep plus every bias (biases are always active)."""
        total_bias = sum(self._sizes[1:])
        counts = [total_bias] * self.num_subnets
        for i in range(self.num_layers):
            kept = self.get_masks(i).sum(dim=(1, 2)).tolist()  # S
            counts = [c + int(x) for c, x in zip(counts, kept)]
        return counts

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range for {self.num_layers} layers")

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, subnets: Sequence[int] | None = None) -> torch.Tensor:
        """Args:
            x (torch.Tensor): ``B x K`` read by every listed subnet, or ``S' x B x K`` (slice ``j``
                is the input of subnet ``subnets[j]``).
            subnets (Sequence[int] | None): subnetworks to compute, in output order; None: all
                ``S`` in index order.

        Returns:
            torch.Tensor: ``S' x B x H``, one slice per listed subnet.
        """
        sel = None if subnets is None else [int(s) for s in subnets]
        if sel is not None and (not sel or any(not 0 <= s < self.num_subnets for s in sel)):
            raise ValueError(f"subnets must be a non-empty list of indices in [0, {self.num_subnets}), got {sel}")
        h = x
        for i in range(self.num_layers):
            packed = _select(getattr(self, f"masks_{i}"), sel)  # S' x N x C
            w, b = getattr(self, f"weight_{i}"), getattr(self, f"bias_{i}")
            no_grad = self._no_grad[i]
            if no_grad is not None and self.training:
                h = _split_masked_relu_layer(h, w, b, packed, _select(no_grad, sel))  # S' x B x N
            else:
                h = _masked_relu_layer(h, w, b, packed)  # S' x B x N
        return h

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, layer_sizes={self.layer_sizes}, num_subnets={self.num_subnets}"


# ---- the pairs mode shared by the masked-sharing models ------------------------------------------

def pairs_subnets(pairs: Sequence[tuple[int, str]], num_subnets: int, tasks: Sequence[str]) -> list[int]:
    """The distinct subnetworks ``pairs`` reads, ascending (so a contiguous run selects a view of
    the mask buffers); checks every pair names a known subnet and task.

    Example::

        >>> pairs_subnets([(2, "click"), (0, "click"), (2, "like")], 4, ["click", "like"])
        [0, 2]
    """
    if not pairs:
        raise ValueError("pairs must name at least one (subnet, task) pair")
    for s, t in pairs:
        if not (isinstance(s, int) and 0 <= s < num_subnets) or t not in tasks:
            raise ValueError(f"pair {(s, t)!r}: subnet must be in [0, {num_subnets}) and task one of {list(tasks)}")
    return sorted({s for s, _ in pairs})


def pair_logits(
    towers: Mapping[str, nn.Module],
    pairs: Sequence[tuple[int, str]],
    subnets: Sequence[int],
    h: torch.Tensor,
    detached: frozenset[int] = frozenset(),
) -> dict[str, torch.Tensor]:
    """``{pair_key(s, task): towers[task](h_s)}`` for each pair, every tower in every logit's graph.

    The data-parallel wrapper may run with a static graph (TorchRec's default), which needs every
    parameter to take part in every forward, whichever towers ``pairs`` covers. So every tower also
    runs on a zero-row slice of ``h`` (no arithmetic) and the sum of those empty outputs (an
    exact ``0``) is added to every returned logit: the backward of any returned logit gives every
    tower parameter a gradient, zero for towers that logit does not read.

    Args:
        towers (Mapping[str, nn.Module]): task towers ``H -> logit``.
        pairs (Sequence[tuple[int, str]]): ``(subnet, tower task)`` pairs, output in this order.
        subnets (Sequence[int]): the subnetworks ``h`` holds, in its order.
        h (torch.Tensor): ``S' x B x H`` outputs of ``subnets``.
        detached (frozenset[int]): subnets whose towers run with detached parameters (their
            logits pass gradient to ``h`` only).

    Returns:
        dict[str, torch.Tensor]: ``B`` logits per pair.
    """
    row = {s: j for j, s in enumerate(subnets)}
    empty = h[0, :0]  # 0 x H
    zero = sum(towers[t](empty).sum() for t in towers)  # scalar 0, in the graph of every tower
    out: dict[str, torch.Tensor] = {}
    for s, t in pairs:
        key = pair_key(s, t)
        if key not in out and s in detached:
            params = {n: p.detach() for n, p in towers[t].named_parameters()}
            out[key] = torch.func.functional_call(towers[t], params, (h[row[s]],)) + zero  # B
        elif key not in out:
            out[key] = towers[t](h[row[s]]) + zero  # B
    return out
