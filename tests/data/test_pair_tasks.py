"""Pair tasks declared from side tables (recsys_mtl.data.pair_tasks): `data add-pair-task` checks and
writes, the sampled positives follow the table (pairs both ways, groups), the roles reach the
training schema, MF's logits and the graph encoders' bags, a declared co-view task is learnt, bad
tables are refused without touching the dataset, and the trainer runs a declared task on 2 ranks."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys_mtl.config import ModelConfig
from recsys_mtl.data.convert.trust import convert_trust
from recsys_mtl.data.interactions import InteractionBatches, InteractionData, load_training_schema, sample_batch
from recsys_mtl.data.pair_tasks import BUILTIN, add_pair_task, pair_tasks
from recsys_mtl.data.reader import DataError
from recsys_mtl.data.schema import Schema, TaskSpec
from recsys_mtl.models import build_model
from recsys_mtl.testing import write_trust_release
from recsys_mtl.train.losses import MultiTaskLoss

CLUSTERS = 5  # planted co-view clusters: item k with the items k' ≡ k (mod 5), across the rating groups


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pair_tasks")
    convert_trust("ciao", list(write_trust_release(d / "raw")), d / "data", quiet=True)
    return d / "data"


def _copy(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ds"
    shutil.copytree(base, out)
    return out


def _coview_pairs(num_items: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Within-cluster item pairs ``a < b``, split into a half for the side table and a held-out half."""
    a, b = np.triu_indices(num_items, 1)
    same = (a % CLUSTERS) == (b % CLUSTERS)
    a, b = a[same], b[same]
    perm = np.random.default_rng(seed).permutation(a.size)
    keep, held = perm[: a.size // 2], perm[a.size // 2:]
    return a[keep], b[keep], a[held], b[held]


def _write(path: Path, **cols) -> Path:
    pq.write_table(pa.table({k: pa.array(np.asarray(v)) for k, v in cols.items()}), path)
    return path


def test_converter_declares_its_tasks(base: Path) -> None:
    s = Schema.load(base)
    assert s.metadata["pair_tasks"] == {n: t.to_dict() for n, t in BUILTIN.items()}
    assert pair_tasks(s) == BUILTIN
    undeclared = dataclasses.replace(s, metadata={k: v for k, v in s.metadata.items() if k != "pair_tasks"})
    assert pair_tasks(undeclared) == BUILTIN  # datasets converted before the declaration existed


def test_add_pair_task_and_sampling(base: Path, tmp_path: Path) -> None:
    d = _copy(base, tmp_path)
    ni = Schema.load(d).feature("item").num_embeddings
    nu = Schema.load(d).feature("user").num_embeddings
    a, b, _, _ = _coview_pairs(ni)
    before = InteractionData.load(d)
    assert set(before.sides) == {"social", "category"}
    added = add_pair_task(d, "coview", "item", _write(tmp_path / "cv.parquet", item=a, other=b), ("item", "other"),
                          symmetric=True)
    assert added.pairs == 2 * a.size  # both ways
    # users: a directed "follows" relation u -> u + 1 for even u; groups: brands of 3 items (item 0 alone)
    follows = _write(tmp_path / "f.parquet", src=np.arange(0, nu - 1, 2), dst=np.arange(1, nu, 2))
    add_pair_task(d, "follows", "user", follows, ("src", "dst"))
    brand_items = np.arange(1, ni)
    add_pair_task(d, "brand", "item", _write(tmp_path / "b.parquet", item=brand_items, brand=brand_items // 3),
                  ("item", "brand"), groups=True)
    s = load_training_schema(d)
    assert s.task_names == ["rec", "social", "category", "coview", "follows", "brand"]
    assert s.metadata["tables"] == {
        "user_emb": ["user", "friend", "neg_friend", "follows_user", "neg_follows_user"],
        "item_emb": ["item", "neg_item", "cat_item", "neg_cat_item", "coview_item", "neg_coview_item",
                     "brand_item", "neg_brand_item"]}
    assert s.metadata["task_roles"]["follows"] == ["user", "follows_user", "neg_follows_user"]
    assert (d / "side" / "coview.parquet").is_file() and (d / "side" / "brand.parquet").is_file()

    data = InteractionData.load(d)  # a new schema version: the new sides are read
    assert set(data.sides) == {"social", "category", "coview", "follows", "brand"}
    u, i = data.splits["train"]
    batch = sample_batch(data, u, i, s.task_names, s.sparse_names, np.random.default_rng(0))
    f = {k: v.values().numpy() for k, v in batch.sparse.to_dict().items()}
    mask = batch.label_mask.numpy()
    pairs = {(int(x), int(y)) for x, y in zip(a, b)} | {(int(y), int(x)) for x, y in zip(a, b)}
    partners = {int(x) for x, _ in pairs}
    k = s.task_names.index("coview")
    assert (mask[:, k] == np.isin(i, list(partners))).all()
    assert all((int(x), int(y)) in pairs for x, y in zip(i[mask[:, k]], f["coview_item"][mask[:, k]]))
    k = s.task_names.index("follows")
    assert (mask[:, k] == ((u % 2 == 0) & (u < nu - 1))).all()
    assert (f["follows_user"][mask[:, k]] == u[mask[:, k]] + 1).all()  # directed: odd users have no partner
    k = s.task_names.index("brand")
    ok = mask[:, k]
    assert ((f["brand_item"][ok] // 3 == i[ok] // 3) & (f["brand_item"][ok] != i[ok])).all()
    assert not ok[i == 0].any()  # item 0 is in no brand
    assert ok[(i > 0) & (i < (ni - 1) // 3 * 3)].all()  # every full brand has another member
    for role, n in (("neg_coview_item", ni), ("neg_follows_user", nu), ("neg_brand_item", ni)):
        assert f[role].min() >= 0 and f[role].max() < n

    # MF scores every declared task as its anchor/positive against anchor/negative
    torch.manual_seed(0)
    model = build_model(s, ModelConfig(name="mf", embedding_dim=8))
    out = model(batch.dense, batch.sparse)
    ue = model.ebc.embedding_bags["user_emb"].weight
    ie = model.ebc.embedding_bags["item_emb"].weight
    t = {kk: torch.from_numpy(v) for kk, v in f.items()}
    torch.testing.assert_close(out["coview"], (ie[t["item"]] * ie[t["coview_item"]]).sum(1)
                               - (ie[t["item"]] * ie[t["neg_coview_item"]]).sum(1))
    torch.testing.assert_close(out["follows"], (ue[t["user"]] * ue[t["follows_user"]]).sum(1)
                               - (ue[t["user"]] * ue[t["neg_follows_user"]]).sum(1))

    # graph encoders: the declared roles are bags of the right kind (item roles: the item's rows of P)
    g = load_training_schema(d, ModelConfig(name="lightgcn", graph_layers=1))
    assert {"coview_item__u", "coview_item__i", "follows_user__u"} <= set(g.sparse_names)
    gb = list(InteractionBatches(d, g, batch_size=32))[0]
    lengths = {kk: v.lengths().numpy() for kk, v in gb.sparse.to_dict().items()}
    first = list(InteractionBatches(d, s, batch_size=32))[0].sparse.to_dict()
    graph = InteractionBatches(d, g, batch_size=32).graph
    _, want, _ = graph.bag("coview_item__u", first["coview_item"].values().numpy())
    np.testing.assert_array_equal(lengths["coview_item__u"], want)


def test_declared_coview_task_is_learnt(base: Path, tmp_path: Path) -> None:
    """MF trained with BPR + a co-view task ranks held-out co-view pairs above other items; BPR alone
    does not (the clusters cut across the rating groups)."""
    d = _copy(base, tmp_path)
    ni = Schema.load(d).feature("item").num_embeddings
    a, b, ha, hb = _coview_pairs(ni)
    add_pair_task(d, "coview", "item", _write(tmp_path / "cv.parquet", item=a, other=b), ("item", "other"),
                  symmetric=True)
    full = Schema.load(d)

    def held_out_auc(tasks: tuple[str, ...]) -> float:
        schema = dataclasses.replace(full, tasks=tuple(TaskSpec(t) for t in tasks))
        s = load_training_schema(d) if tasks == tuple(full.task_names) else _training(schema)
        torch.manual_seed(0)
        model = build_model(s, ModelConfig(name="mf", embedding_dim=16))
        loss = MultiTaskLoss(s.tasks)
        opt = torch.optim.Adam(model.parameters(), lr=0.03)
        for epoch in range(40):
            for batch in InteractionBatches(d, s, batch_size=64, epoch=epoch):
                opt.zero_grad()
                total, _ = loss(model(batch.dense, batch.sparse), batch.labels, batch.label_mask)
                total.backward()
                opt.step()
        e = model.ebc.embedding_bags["item_emb"].weight.detach()
        rng = np.random.default_rng(1)
        neg = rng.integers(0, ni, (ha.size, 8))
        neg = np.where(neg % CLUSTERS == ha[:, None] % CLUSTERS, (neg + 1) % ni, neg)  # other clusters
        pos = (e[ha] * e[hb]).sum(1)  # P
        other = (e[ha][:, None] * e[torch.from_numpy(neg)]).sum(-1)  # P x 8
        return float((pos[:, None] > other).float().mean())

    with_task = held_out_auc(("rec", "social", "category", "coview"))
    without = held_out_auc(("rec", "social", "category"))
    assert with_task > 0.65 and with_task > without + 0.15, (with_task, without)  # measured 0.74 vs 0.47


def _training(schema: Schema) -> Schema:
    from recsys_mtl.data.interactions import training_schema

    return training_schema(schema)


def test_bad_tables_are_refused_and_nothing_is_written(base: Path, tmp_path: Path) -> None:
    d = _copy(base, tmp_path)
    ni = Schema.load(d).feature("item").num_embeddings
    schema_text = (d / "schema.json").read_text()
    side = sorted(p.name for p in (d / "side").iterdir())
    cases = [
        (dict(table=_write(tmp_path / "r.parquet", item=[0, ni], other=[1, 2])), f"item = {ni} is outside"),
        (dict(table=_write(tmp_path / "c.parquet", item=[0], x=[1])), "no column(s) ['other']"),
        (dict(table=_write(tmp_path / "f.parquet", item=[0], other=[1.5])), "must hold integer ids"),
        (dict(table=tmp_path / "missing.parquet"), "side table missing"),
        (dict(name="social"), "task 'social' exists"),
        (dict(name="rec"), "task 'rec' exists"),
        (dict(roles=("friend", "neg_x")), "role 'friend' of task 'coview' is already a role of task 'social'"),
        (dict(kind="shop"), "kind must be one of user, item"),
        (dict(name="co view"), "a task name is a letter"),
        (dict(groups=True, columns=("item", "grp"),
              table=_write(tmp_path / "g.parquet", item=[0, 3, 5, 3], grp=[0, 1, 1, 2])), "item 3 is in several rows"),
        (dict(groups=True, columns=("item", "grp"), table=_write(tmp_path / "n.parquet", item=[0, 1], grp=[0, -1])),
         "group ids are >= 0"),
    ]
    good = _write(tmp_path / "ok.parquet", item=[0, 1], other=[1, 2])
    for over, message in cases:
        kw = dict(name="coview", kind="item", table=good, columns=("item", "other"))
        kw.update(over)
        with pytest.raises(DataError) as e:
            add_pair_task(d, kw.pop("name"), kw.pop("kind"), kw.pop("table"), kw.pop("columns"), **kw)
        assert message in str(e.value), (message, str(e.value))
        assert (d / "schema.json").read_text() == schema_text
        assert sorted(p.name for p in (d / "side").iterdir()) == side  # no temporary file left either
    # a census-style dataset is not an interaction dataset
    from recsys_mtl.data.synth import generate_recsys

    other = tmp_path / "synth"
    generate_recsys(other, rows=200, num_users=20, num_items=20)
    with pytest.raises(DataError, match="not an interaction dataset"):
        add_pair_task(other, "coview", "item", good, ("item", "other"))
    # a hand-written schema naming a task without a declaration
    s = Schema.load(d)
    broken = dataclasses.replace(s, tasks=(*s.tasks, TaskSpec("coview")))
    with pytest.raises(DataError, match="task 'coview' has no pair-task declaration"):
        pair_tasks(broken)


def test_overwrite_replaces_a_task(base: Path, tmp_path: Path) -> None:
    d = _copy(base, tmp_path)
    t = _write(tmp_path / "t.parquet", item=[0, 1], other=[1, 2])
    add_pair_task(d, "coview", "item", t, ("item", "other"))
    again = add_pair_task(d, "coview", "item", t, ("item", "other"), symmetric=True, overwrite=True)
    assert again.schema.task_names.count("coview") == 1 and again.pairs == 4
    assert InteractionData.load(d).sides["coview"].task.symmetric


def test_cli(base: Path, tmp_path: Path, capsys) -> None:
    from recsys_mtl.cli import main

    d = _copy(base, tmp_path)
    t = _write(tmp_path / "t.parquet", user=[0, 2], other=[1, 3])
    assert main(["data", "add-pair-task", str(d), "cofollow", "--kind", "user", "--pairs", str(t),
                 "--columns", "user", "other", "--symmetric"]) == 0
    out = capsys.readouterr().out
    assert "added task cofollow" in out and "4 pairs" in out and "4 of" in out and "cofollow_user" in out
    assert main(["data", "add-pair-task", str(d), "cofollow", "--kind", "user", "--pairs", str(t),
                 "--columns", "user", "other"]) == 2
    assert "task 'cofollow' exists" in capsys.readouterr().err
    assert json.loads((d / "schema.json").read_text())["metadata"]["pair_tasks"]["cofollow"]["symmetric"] is True


@pytest.mark.e2e
@pytest.mark.multirank
def test_declared_task_trains_on_two_ranks(base: Path, tmp_path: Path) -> None:
    from recsys_mtl.cli import main

    d = _copy(base, tmp_path)
    a, b, _, _ = _coview_pairs(Schema.load(d).feature("item").num_embeddings)
    add_pair_task(d, "coview", "item", _write(tmp_path / "cv.parquet", item=a, other=b), ("item", "other"))
    out = tmp_path / "out"
    rc = main(["train", "--data", str(d), "--model", "mf", "--embedding-dim", "8", "--output-dir", str(out),
               "--nproc-per-node", "2", "--epochs", "2", "--batch-size", "32", "--grad-combiner", "pmtrec",
               "--sharding", "row_wise", "--eval-every", "0"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "recall@20" in m["tasks"]["rec"] and "recall@20" in m["test"]["rec"]
