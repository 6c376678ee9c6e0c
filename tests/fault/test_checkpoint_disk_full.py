"""Disk full while checkpointing: a clear error on every rank, the previous checkpoint intact,
no partial checkpoint directory left behind, and no metrics.json from the failed run."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from multirank import run_ranks


def _train_until_disk_fills(data: str, root: str) -> str:
    import torch.distributed as dist
    import torch.distributed.checkpoint.filesystem as fs

    from recsys_mtl.config import ModelConfig, TrainConfig
    from recsys_mtl.train.checkpoint import CheckpointError
    from recsys_mtl.train.loop import train

    disk = {"full": False}
    real_write_item = fs._write_item

    def write_item(transforms, stream, *args, **kwargs):
        if disk["full"] and dist.get_rank() == 1:  # only rank 1's disk fills up, mid-file
            stream.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_item(transforms, stream, *args, **kwargs)

    fs._write_item = write_item

    def on_step(step, loss):
        disk["full"] = step >= 3

    cfg = TrainConfig(data=data, output_dir=f"{root}/out", batch_size=64, steps=6, checkpoint_dir=f"{root}/ck",
                      checkpoint_every_steps=2, log_every=1000,
                      model=ModelConfig(name="mmoe", embedding_dim=4, expert_layer_sizes=(8,), tower_layer_sizes=(4,),
                                        num_experts=2))
    try:
        train(cfg, on_step=on_step)
    except CheckpointError as e:
        return str(e)
    return "no error"


@pytest.mark.multirank
def test_disk_full_while_checkpointing(tmp_path):
    from recsys_mtl.data.synth import generate_recsys
    from recsys_mtl.train.checkpoint import Checkpointer

    data = tmp_path / "data"
    generate_recsys(data, rows=700, seed=1, num_users=40, num_items=50, rows_per_file=350, row_group_size=100)
    errors = run_ranks(_train_until_disk_fills, 2, str(data), str(tmp_path))
    for msg in errors:  # every rank stops with the same clear message
        assert "writing checkpoint" in msg and "step_00000004" in msg, msg
        assert "No space left on device" in msg, msg
        assert "previous checkpoint intact" in msg and "step_00000002" in msg, msg
    ck = tmp_path / "ck"
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000002"]  # no .tmp_* or partial step_4
    assert Checkpointer(ck, rank=0, world_size=1, run_info={}, plan=None).latest() == ck / "step_00000002"
    assert json.loads((ck / "step_00000002" / "meta.json").read_text())["step"] == 2
    assert not (tmp_path / "out" / "metrics.json").exists()
