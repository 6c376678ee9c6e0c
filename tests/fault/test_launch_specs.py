"""torchx launch: a real ``-j 2x2`` job on this host (two simulated nodes x 2 ranks, with
checkpoints), and dry-runs of the README's 2-node x 8-GPU Slurm and Kubernetes commands."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENV = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")

# The README's cluster commands, verbatim (test_readme_commands_are_the_tested_ones keeps them in sync).
SLURM = """torchx run -s slurm -cfg partition=gpu,time=08:00:00 launch/components.py:train \\
  --nnodes 2 --nproc_per_node 8 --gpu 8 --cpu 64 --memMB 480000 --max_restarts 3 --max_retries 2 \\
  -- --data /shared/data/ali_ccp --model ple --batch-size 4096 --output-dir /shared/runs/ple \\
  --checkpoint-dir /shared/ckpt/ple --checkpoint-every-minutes 30"""
KUBERNETES = """torchx run -s kubernetes -cfg queue=default,namespace=recsys launch/components.py:train \\
  --image registry.example.com/recsys-mtl:0.1.0 --nnodes 2 --nproc_per_node 8 --gpu 8 --cpu 64 --memMB 480000 \\
  --max_restarts 3 --max_retries 2 --mounts type=volume,src=recsys-pvc,dst=/mnt \\
  -- --data /mnt/data/ali_ccp --model stem --batch-size 4096 --output-dir /mnt/runs/stem \\
  --checkpoint-dir /mnt/ckpt/stem --checkpoint-every-minutes 30"""


def _dryrun(command: str) -> str:
    """stdout of ``torchx run --dryrun`` for a README command (the spec; warnings go to stderr)."""
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:2] == ["torchx", "run"]
    argv = [str(BIN / "torchx"), "run", "--dryrun", *(["--workspace", ""] if "kubernetes" in command else []),
            *argv[2:]]
    proc = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_readme_commands_are_the_tested_ones():
    readme = (ROOT / "README.md").read_text()
    assert SLURM in readme and KUBERNETES in readme


def test_slurm_dryrun_2_nodes_x_8_gpus():
    out = _dryrun(SLURM)
    script = out[out.index("#!/bin/bash"):]
    assert script.count("#SBATCH --job-name=trainer-") == 2 and "#SBATCH hetjob" in script  # 2 nodes
    for flag in ("--partition=gpu", "--time=08:00:00", "--gpus-per-task=8", "--cpus-per-task=64", "--mem=480000",
                 "--requeue"):
        assert script.count(flag) == 2, flag
    assert "TORCHX_MAX_RETRIES=2" in script  # sbatch requeue on failure
    assert script.count("PET_MAX_RESTARTS=3") == 2 and script.count("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1") == 2
    assert script.count("torchrun --rdzv_backend c10d --rdzv_endpoint ${SLURM_JOB_NODELIST_HET_GROUP_0") == 2
    assert script.count("--nnodes 2 --nproc_per_node 8") == 2
    assert script.count("-m recsys_mtl.cli train --data /shared/data/ali_ccp --model ple --batch-size 4096") == 2
    assert script.count("--checkpoint-dir /shared/ckpt/ple --checkpoint-every-minutes 30") == 2


def test_kubernetes_dryrun_2_pods_x_8_gpus():
    import kubernetes  # noqa: F401  (in the test extra: torchx renders Kubernetes specs with it)
    import yaml

    out = _dryrun(KUBERNETES)
    spec = yaml.safe_load(out[out.index("apiVersion: batch.volcano.sh"):])
    assert spec["kind"] == "Job" and spec["spec"]["queue"] == "default"
    tasks = spec["spec"]["tasks"]
    assert [t["name"] for t in tasks] == ["trainer-0", "trainer-1"] and all(t["replicas"] == 1 for t in tasks)
    for t in tasks:
        assert t["maxRetry"] == 2
        (c,) = t["template"]["spec"]["containers"]
        assert c["image"] == "registry.example.com/recsys-mtl:0.1.0"
        assert c["resources"]["limits"] == {"cpu": "64000m", "memory": "480000M", "nvidia.com/gpu": "8"}
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["PET_MAX_RESTARTS"] == "3" and env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
        cmd = " ".join(c["command"])
        assert "torchrun --rdzv_backend c10d" in cmd and "--nnodes 2 --nproc_per_node 8" in cmd
        assert "-m recsys_mtl.cli train --data /mnt/data/ali_ccp --model stem" in " ".join(cmd.split())
        assert {"mountPath": "/mnt", "name": "mount-0", "readOnly": False} in c["volumeMounts"]
        volume = {"name": "mount-0", "persistentVolumeClaim": {"claimName": "recsys-pvc"}}
        assert volume in t["template"]["spec"]["volumes"]


def test_component_appdef_for_kubernetes_without_the_client():
    """What the Kubernetes scheduler renders from, checked even where the kubernetes client is absent."""
    spec = importlib.util.spec_from_file_location("recsys_launch_components", ROOT / "launch" / "components.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    app = mod.train("--data", "/mnt/data", "--output-dir", "/mnt/out", nnodes=2, nproc_per_node=8, gpu=8, cpu=64,
                    memMB=480000, image="registry.example.com/recsys-mtl:0.1.0", max_retries=2, max_restarts=3,
                    mounts=["type=volume", "src=recsys-pvc", "dst=/mnt"])  # the CLI splits on commas
    (role,) = app.roles
    assert role.name == "trainer" and role.num_replicas == 2 and role.max_retries == 2
    assert role.image == "registry.example.com/recsys-mtl:0.1.0"
    assert (role.resource.gpu, role.resource.cpu, role.resource.memMB) == (8, 64, 480000)
    assert role.env["PET_MAX_RESTARTS"] == "3"
    cmd = " ".join(role.args)
    assert "--nnodes 2 --nproc_per_node 8" in cmd and "-m recsys_mtl.cli train --data /mnt/data" in cmd
    assert role.mounts[0].src == "recsys-pvc" and role.mounts[0].dst_path == "/mnt"


@pytest.mark.e2e
def test_torchx_local_2x2_with_checkpoints(tmp_path):
    from recsys_mtl.data.synth import generate_recsys
    from recsys_mtl.distributed.env import free_port

    data = tmp_path / "data"
    generate_recsys(data, rows=2000, seed=4, num_users=80, num_items=100, rows_per_file=500, row_group_size=125)
    out, ck = tmp_path / "out", tmp_path / "ck"
    proc = subprocess.run(
        [str(BIN / "torchx"), "run", "-s", "local_cwd", "launch/components.py:train", "--nnodes", "2",
         "--nproc_per_node", "2", "--rdzv_port", str(free_port()), "--", "--data", str(data), "--model", "mmoe",
         "--output-dir", str(out), "--batch-size", "64", "--steps", "6", "--embedding-dim", "4",
         "--expert-layer-sizes", "8", "--tower-layer-sizes", "4", "--sharding", "row_wise",
         "--checkpoint-dir", str(ck), "--checkpoint-every-steps", "3"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 4 and metrics["steps"] == 6
    meta = json.loads((ck / "step_00000006" / "meta.json").read_text())
    assert meta["world_size"] == 4 and len(meta["data_positions"]) == 4
    assert "ranks=[0, 1, 2, 3]" in meta["plan_summary"]
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000003", "step_00000006"]
