"""Every third-party import under recsys_mtl/ resolves to a dependency declared in pyproject.toml:
module-level imports to a core dependency (so `pip install .` alone runs every command), imports
inside functions (optional peers, such as the benchmark's torch-rechub) at least to an extra."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    req = lambda spec: _norm(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0])  # noqa: E731
    core = {req(s) for s in project["dependencies"]}
    extras = {req(s) for specs in project.get("optional-dependencies", {}).values() for s in specs}
    return core, extras


def _imports() -> list[tuple[str, str, bool]]:
    """(module top-level name, file:line, imported at module level) for every absolute import."""
    out = []
    for path in sorted((ROOT / "recsys_mtl").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(n) for n in tree.body} | {id(c) for n in tree.body if isinstance(n, ast.If) for c in n.body}
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                out.append((n.split(".")[0], f"{path.relative_to(ROOT)}:{node.lineno}", id(node) in top_level))
    return out


def test_every_third_party_import_is_declared():
    core, extras = _declared()
    # Distributions that provide an import package; fbgemm_gpu comes from torchrec's fbgemm
    # requirement, met by the cpu or gpu extra (the same package built for each device).
    provides = {k: {_norm(d) for d in v} for k, v in md.packages_distributions().items()}
    problems = []
    for module, where, module_level in _imports():
        if module in sys.stdlib_module_names or module in ("recsys_mtl", "__future__"):
            continue
        dists = provides.get(module, {_norm(module)})
        if module == "fbgemm_gpu":
            ok = bool(dists & (core | extras))
        elif module == "triton" and where.startswith("recsys_mtl/ops/triton/"):
            # Kernel modules: imported only by the op dispatchers, inside functions, when a GPU
            # (or the forced Triton path) needs them (checked below); triton comes with an extra.
            ok = bool(dists & (core | extras))
        elif module_level:
            ok = bool(dists & core)
        else:
            ok = bool(dists & (core | extras))
        if not ok:
            problems.append(f"{where}: {module} ({', '.join(sorted(dists))}) is not a "
                            f"{'core dependency' if module_level else 'declared dependency or extra'}")
    assert not problems, "\n".join(problems)


def test_the_check_sees_imports():
    mods = {m for m, _, _ in _imports()}
    assert {"torch", "torchrec", "pyarrow", "numpy"} <= mods


def test_kernel_modules_are_imported_lazily():
    """No module imports ``recsys_mtl.ops.triton`` at module level: without triton installed every
    command still runs (the ops use their CPU path)."""
    eager = []
    for path in sorted((ROOT / "recsys_mtl").rglob("*.py")):
        if "ops/triton" in path.as_posix():
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            eager += [f"{path.relative_to(ROOT)}:{node.lineno}" for m in mods if m.startswith("recsys_mtl.ops.triton")]
    assert not eager, eager
