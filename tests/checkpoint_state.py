"""Reading a DCP checkpoint back as full tensors, for tests that compare checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch


def full_state(path: Path, tmp: Path) -> dict[str, object]:
    """Every tensor of the DCP checkpoint at ``path``, unsharded (single process, no process group),
    keyed by its dotted name; ``tmp`` holds the intermediate torch.save file."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{path.parent.name}_{path.name}.pt"
    dcp_to_torch_save(path, out)
    flat: dict[str, object] = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + k] = v

    walk(torch.load(out, weights_only=False), "")
    return flat
