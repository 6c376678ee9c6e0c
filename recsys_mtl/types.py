"""Core data types shared by the data path, the models and the train loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class MTLBatch(Pipelineable):
    """One multi-task mini-batch, movable by TorchRec's train pipelines.

    Args:
        dense (torch.Tensor): ``B x F`` float32 dense features (``F`` may be 0).
        sparse (KeyedJaggedTensor): sparse id features, one key per sparse feature.
        labels (torch.Tensor): ``B x T`` float32 labels in task order; 0 where masked.
        label_mask (torch.Tensor): ``B x T`` bool, True where the sample is in the task's
            sample space (PLE §4.3's δ); False where the label is null.

    Example::

        >>> import torch
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["user"], values=torch.tensor([3, 1]), lengths=torch.tensor([1, 1]))
        >>> b = MTLBatch(torch.zeros(2, 0), kjt, torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool))
        >>> b.batch_size
        2
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    label_mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device, non_blocking: bool = False) -> "MTLBatch":
        return MTLBatch(
            dense=self.dense.to(device=device, non_blocking=non_blocking),
            sparse=self.sparse.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            label_mask=self.label_mask.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense.record_stream(stream)
        self.sparse.record_stream(stream)
        self.labels.record_stream(stream)
        self.label_mask.record_stream(stream)

    def pin_memory(self) -> "MTLBatch":
        return MTLBatch(
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            labels=self.labels.pin_memory(),
            label_mask=self.label_mask.pin_memory(),
        )
