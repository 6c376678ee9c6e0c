"""E experts evaluated as one batched op.

Mixture-of-experts models run many small MLPs of identical shape. Running them as a python
loop of ``nn.Linear`` costs E separate GEMMs per layer plus as many kernel launches; here all
experts' weights of a layer live in one ``E x D_in x D_out`` tensor and one (b)mm runs them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from recsys_mtl.modules.activations import relu
from recsys_mtl.ops import cpu_gemm
from recsys_mtl.ops.fused_expert import expert_linear_relu


def linear_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, batched: bool) -> torch.Tensor:
    """``relu(x @ weight + bias)``: ``B x K, K x N, 1 x N`` (one wide GEMM) or, ``batched``,
    ``G x B x K, G x K x N, G x 1 x N``: the batch-major expert layers after the first, and a first
    layer of one expert per group.
    (``batched`` is given, not read from the shapes, so ``torch.fx`` traces one path.)

    :func:`recsys_mtl.ops.fused_expert.expert_linear_relu` is the same function in one op and takes
    these arguments as they are; :class:`Experts` takes the op where float32 CPU GEMMs run on oneDNN
    (:mod:`recsys_mtl.ops.cpu_gemm`). With ATen's GEMMs the op measured at parity with this
    (2026-12-02, W1's pipelined step: eager 159.0 vs 159.5 ms, compiled head 141.8 vs 141.9 ms), so
    there the plain ops stay: no custom-op dispatch, and inductor sees the bias and ReLU.
    """
    if batched:
        return relu(torch.baddbmm(bias, x, weight))  # G x B x N
    return relu(torch.addmm(bias, x, weight))  # B x N


@torch.no_grad()
def uniform_rows_(weight: torch.Tensor, rows: int, bound: float) -> torch.Tensor:
    """``U(-bound, bound)`` in the first ``rows`` rows of ``weight``'s row axis (``-2``; a
    ``D x N`` or ``G x D x N`` weight), zeros in the rest; the random values are those an unpadded
    ``rows``-row weight would get from ``nn.init.uniform_`` (same shape, same draw order)."""
    if rows == weight.shape[-2]:
        return nn.init.uniform_(weight, -bound, bound)
    shape = (*weight.shape[:-2], rows, weight.shape[-1])
    real = torch.empty(shape, dtype=weight.dtype, device=weight.device).uniform_(-bound, bound)
    weight.zero_()
    weight.narrow(-2, 0, rows).copy_(real)
    return weight


class Experts(nn.Module):
    """``num_groups x num_experts`` MLP experts with identical layer sizes, ReLU after each layer.

    Experts are arranged in groups; with ``grouped_input`` group ``g`` reads ``x[g]`` (``G x B x D``),
    otherwise every expert reads the same ``B x D`` input and the first layer is one wide GEMM.
    The input layout is fixed at construction so the module stays ``torch.fx``-traceable (TorchRec's
    train pipelines trace the model).

    Args:
        in_features (int): input width ``D``.
        layer_sizes (Sequence[int]): widths of each expert's layers; output width ``H`` is the last.
        num_experts (int): experts per group ``n``.
        num_groups (int): groups ``G``; total experts ``E = G * n``.
        grouped_input (bool): input is ``G x B x D`` (one slice per group) instead of ``B x D``.
        zero_rows (int): the last ``zero_rows`` of the ``D`` input features are zero padding
            (:class:`~recsys_mtl.modules.embeddings.SparseDenseInput`): their first-layer weight
            rows are initialised to zero and, their inputs being zero, get zero gradients and stay
            zero; the other rows are initialised as for a ``D - zero_rows`` wide input.
        fused (bool | None): run every layer as :func:`~recsys_mtl.ops.fused_expert.expert_linear_relu`
            (oneDNN inner products with a ReLU post-op on CPU, backward from the saved output)
            instead of ``addmm`` / ``baddbmm`` + ReLU. None (default): where
            :func:`recsys_mtl.ops.cpu_gemm.backend` is ``"onednn"`` (it is read here, once; the
            forward has no device test, so ``torch.fx`` traces one path). The parameters and
            results are the same either way, to float32 rounding.

    Example::

        >>> Experts(8, [16, 4], num_experts=3, num_groups=2)(torch.randn(5, 8)).shape
        torch.Size([6, 5, 4])
        >>> Experts(8, [16, 4], 3, 2, grouped_input=True)(torch.randn(2, 5, 8)).shape
        torch.Size([6, 5, 4])
    """

    def __init__(
        self,
        in_features: int,
        layer_sizes: Sequence[int],
        num_experts: int,
        num_groups: int = 1,
        grouped_input: bool = False,
        zero_rows: int = 0,
        fused: bool | None = None,
    ) -> None:
        super().__init__()
        self.fused = cpu_gemm.backend() == "onednn" if fused is None else bool(fused)
        if num_experts <= 0 or num_groups <= 0 or not layer_sizes:
            raise ValueError("Experts needs num_experts >= 1, num_groups >= 1 and >= 1 layer")
        if not 0 <= zero_rows < in_features:
            raise ValueError(f"Experts: zero_rows must be in [0, {in_features}), got {zero_rows}")
        self.zero_rows = zero_rows
        self.num_experts = num_experts
        self.num_groups = num_groups
        self.grouped_input = grouped_input
        self.in_features = in_features
        self.out_features = layer_sizes[-1]
        e = num_experts * num_groups
        sizes = [in_features, *layer_sizes]
        self.num_layers = len(layer_sizes)
        self._sizes = sizes
        n, g = num_experts, num_groups
        # First layer stored in the layout its GEMM reads, so no per-step permute copy and
        # gradients match the parameter's strides (DDP buckets): D x (E*H1) for a shared input,
        # G x D x (n*H1) for grouped input. Later layers: E x H_in x H_out for bmm.
        if grouped_input:
            self.weight_0 = nn.Parameter(torch.empty(g, sizes[0], n * sizes[1]))
            self.bias_0 = nn.Parameter(torch.empty(g, 1, n * sizes[1]))
        else:
            self.weight_0 = nn.Parameter(torch.empty(sizes[0], e * sizes[1]))
            self.bias_0 = nn.Parameter(torch.empty(1, e * sizes[1]))
        # Registered directly (not in a ParameterList) so DistributedModelParallel's meta-device
        # initialisation, which calls reset_parameters() on the module owning them, reaches them.
        for i in range(1, self.num_layers):
            self.register_parameter(f"weight_{i}", nn.Parameter(torch.empty(e, sizes[i], sizes[i + 1])))
            self.register_parameter(f"bias_{i}", nn.Parameter(torch.empty(e, 1, sizes[i + 1])))
        self.reset_parameters()

    @property
    def total_experts(self) -> int:
        return self.num_experts * self.num_groups

    def padding_numel(self) -> int:
        """Entries of the zero padding rows (structural zeros, not model parameters)."""
        w = self.weight_0
        return self.zero_rows * w.numel() // w.shape[-2]

    def reset_parameters(self) -> None:
        # nn.Linear's default init, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in without
        # the zero padding rows (which start at zero).
        for i in range(self.num_layers):
            fan_in = self._sizes[i] - (self.zero_rows if i == 0 else 0)
            bound = 1.0 / math.sqrt(fan_in)
            uniform_rows_(getattr(self, f"weight_{i}"), fan_in, bound)
            nn.init.uniform_(getattr(self, f"bias_{i}"), -bound, bound)

    def expert_index(self, layer: int, expert: int) -> tuple[tuple, tuple]:
        """Indices of one expert's ``D_in x D_out`` weight and ``D_out`` bias inside the
        parameters ``weight_{layer}`` / ``bias_{layer}`` (apply them to ``.grad`` too). The
        first layer's rows exclude the ``zero_rows`` padding."""
        d_out = self._sizes[layer + 1]
        if layer > 0:
            return (expert,), (expert, 0)
        rows = slice(0, self._sizes[0] - self.zero_rows)
        if self.grouped_input:
            grp, j = divmod(expert, self.num_experts)
            cols = slice(j * d_out, (j + 1) * d_out)
            return (grp, rows, cols), (grp, 0, cols)
        cols = slice(expert * d_out, (expert + 1) * d_out)
        return (rows, cols), (0, cols)

    def expert_parameters(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one expert's ``D_in x D_out`` weight and ``D_out`` bias."""
        wi, bi = self.expert_index(layer, expert)
        return getattr(self, f"weight_{layer}")[wi], getattr(self, f"bias_{layer}")[bi]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x (torch.Tensor): ``B x D``, or ``G x B x D`` with ``grouped_input``.

        Returns:
            torch.Tensor: ``E x B x H`` expert outputs, group-major (group 0's experts first);
            contiguous with ``fused``, else, with grouped input and ``n > 1`` experts per group, a
            transposed view of an ``E x H x B`` tensor (see :meth:`_grouped_feature_major`).
        """
        e, n = self.total_experts, self.num_experts
        d_out = self._sizes[1]
        if self.fused:
            return self._fused_forward(x)
        if self.grouped_input and n > 1:
            return self._grouped_feature_major(x)
        if self.grouped_input:  # one expert per group: G x B x H1 is E x B x H1
            h = linear_relu(x, self.weight_0, self.bias_0, True)  # E x B x H1
        else:
            h = torch.addmm(self.bias_0, x, self.weight_0)  # B x (E*H1)
            # The ReLU after the transposing view: its output is then the next layer's bmm input
            # itself, which a compiled backward keeps; ReLU first, the backward would keep the
            # bmm's copy of it and a bool mask for the ReLU (tests/train/test_compiled_head.py).
            h = relu(h.view(x.shape[0], e, d_out).transpose(0, 1))  # E x B x H1 (a view)
        for i in range(1, self.num_layers):
            h = linear_relu(h, getattr(self, f"weight_{i}"), getattr(self, f"bias_{i}"), True)  # E x B x H_next
        return h

    def _grouped_feature_major(self, x: torch.Tensor) -> torch.Tensor:
        """Grouped input with ``n > 1`` experts per group, computed feature-major.

        Batch-major, the first layer's ``G x B x (n*H1)`` output needs a transposing copy to
        become ``E x B x H1`` (each expert's ``B x H1`` block is strided inside it). Transposed,
        ``(x W)^T = W^T x^T`` is ``G x (n*H1) x B``, whose rows are already ``E x H1 x B``; every
        layer is then a ``bmm`` of the transposed weights (views of the same parameters) and the
        result is returned as an ``E x B x H`` view. No activation is copied, forward or backward.

        Measured 2026-12-02 (2-core AMD EPYC, shared machine): W1's second-level task experts
        (G = 2, n = 2, [256, 128], B = 2048) forward + backward 28-32 ms batch-major, 23-25 ms
        this way; the pipelined W1 step 1.025x eager, 1.017x with the compiled head (8 rounds of
        5 interleaved steps, medians; the noise is about 2 %).
        """
        e, g, bsz = self.total_experts, self.num_groups, x.shape[1]
        xt = x.transpose(1, 2)  # G x D x B (view)
        # Biases as column views (G x 1 x N -> G x N x 1 is a contiguous view: their gradients
        # keep the parameters' strides, as DDP's gradient buckets expect).
        h = torch.baddbmm(self.bias_0.view(g, -1, 1), self.weight_0.transpose(1, 2), xt)  # G x (n*H1) x B
        h = relu(h.view(e, self._sizes[1], bsz))  # E x H1 x B
        for i in range(1, self.num_layers):
            w, b = getattr(self, f"weight_{i}"), getattr(self, f"bias_{i}")
            h = relu(torch.baddbmm(b.view(e, -1, 1), w.transpose(1, 2), h))  # E x H_next x B
        return h.transpose(1, 2)  # E x B x H (view)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every layer one :func:`~recsys_mtl.ops.fused_expert.expert_linear_relu`, batch-major.

        oneDNN multiplies one group's ``B x K`` by its ``K x N`` weight per call and reads only
        plain row- or column-major operands in place, so the experts' ``B x H1`` blocks, strided
        inside the first layer's ``B x (n*H1)`` output, are gathered into one contiguous
        ``E x B x H1`` tensor (one copy forward, one backward) that the next layer reads and keeps.
        """
        e, n, bsz, h1 = self.total_experts, self.num_experts, x.shape[-2], self._sizes[1]
        h = expert_linear_relu(x, self.weight_0, self.bias_0)  # B x (E*H1) or G x B x (n*H1)
        if self.grouped_input:
            if n > 1:
                h = h.view(self.num_groups, bsz, n, h1).transpose(1, 2).reshape(e, bsz, h1)  # E x B x H1 (copy)
        elif e > 1:
            h = h.view(bsz, e, h1).transpose(0, 1).contiguous()  # E x B x H1 (copy)
        else:
            h = h.unsqueeze(0)  # 1 x B x H1 (view)
        for i in range(1, self.num_layers):
            h = expert_linear_relu(h, getattr(self, f"weight_{i}"), getattr(self, f"bias_{i}"))  # E x B x H_next
        return h
