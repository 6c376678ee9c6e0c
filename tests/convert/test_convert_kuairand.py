"""KuaiRand converter on small files in the raw release format."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys_mtl.data.convert import ConvertError, convert
from recsys_mtl.data.reader import check_dataset, make_dataloader
from recsys_mtl.data.schema import Schema

LOG_COLUMNS = ["user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow", "is_comment",
               "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms", "profile_stay_time",
               "comment_stay_time", "is_profile_enter", "is_rand", "tab"]
USER_COLUMNS = ["user_id", "user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
                "follow_user_num", "follow_user_num_range", "fans_user_num", "fans_user_num_range",
                "friend_user_num", "friend_user_num_range", "register_days", "register_days_range",
                "onehot_feat0", "onehot_feat1", "onehot_feat2"]
VIDEO_COLUMNS = ["video_id", "author_id", "video_type", "upload_dt", "upload_type", "visible_status",
                 "video_duration", "server_width", "server_height", "music_id", "music_type", "tag"]
DATES = [20220408, 20220409, 20220410, 20220411]


def _write(tmp: Path) -> tuple[list[Path], list[dict]]:
    rng = np.random.default_rng(1)
    users = tmp / "user_features_1k.csv"
    users.write_text(",".join(USER_COLUMNS) + "\n" + "".join(
        f"{u},{['high_active', 'full_active'][u % 2]},0,0,{u % 2},{u * 3},\"(0,10]\",{u},\"[0,10)\",0,0,{100 + u},"
        f"61-90,{u % 3},{'' if u == 2 else 5},1\n" for u in range(6)))  # user 6 has no features row
    videos = tmp / "video_features_basic_1k.csv"
    videos.write_text(",".join(VIDEO_COLUMNS) + "\n" + "".join(
        f"{v},{50 + v % 4},NORMAL,2022-03-01,LONG_VIDEO,public,{1000 * v},720,1280,{'' if v == 3 else 9000 + v},"
        f"{v % 2},\"{v % 3},{10 + v % 2}\"\n" for v in range(10)))
    rows, lines = [], []
    for i in range(240):
        u, v, d = int(rng.integers(0, 7)), int(rng.integers(0, 12)), DATES[i * 4 // 240]
        lab = {t: int(rng.random() < 0.4) for t in ("is_click", "is_like", "is_follow", "is_comment", "is_forward",
                                                    "is_hate", "long_view", "is_profile_enter")}
        rows.append({"user": u, "video": v, "date": d, "hour": (i % 24), **lab})
        rec = {"user_id": u, "video_id": v, "date": d, "hourmin": (i % 24) * 100, "time_ms": 1649376000000 + i,
               "play_time_ms": 500, "duration_ms": 1000 + v, "profile_stay_time": 0, "comment_stay_time": 0,
               "is_rand": 0, "tab": i % 3, **lab}
        lines.append(",".join(str(rec[c]) for c in LOG_COLUMNS) + "\n")
    log1 = tmp / "log_standard_4_08_to_4_09_1k.csv.gz"
    with gzip.open(log1, "wt") as f:
        f.write(",".join(LOG_COLUMNS) + "\n" + "".join(lines[:120]))
    log2 = tmp / "log_standard_4_10_to_4_11_1k.csv"
    log2.write_text(",".join(LOG_COLUMNS) + "\n" + "".join(lines[120:]))
    return [log1, log2, users, videos], rows


def _decoder(d: Path, feature: str) -> dict:
    v = pq.read_table(d / "vocab" / f"{feature}.parquet").to_pydict()
    return dict(zip(v["id"], v["value"]))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kuairand")
    files, rows = _write(tmp)
    out = tmp / "ds"
    convert("kuairand", files, out, eval_fraction=0.2, row_group_size=50)
    return out, rows, files


def test_date_split_labels_and_reader(converted):
    out, rows, _ = converted
    schema = Schema.load(out)
    assert schema.metadata["split_date"] == 20220411  # the last day holds 25% >= 20% of rows
    assert check_dataset(out) == {"train": 180, "eval": 60}
    assert schema.task_names == ["is_click", "is_like", "is_follow", "is_comment", "is_forward", "long_view"]
    assert schema.user_id_feature == "user_id"
    sides = {f.name: f.side for f in schema.sparse}
    assert sides["user_active_degree"] == sides["onehot_feat1"] == "user"
    assert sides["video_id"] == sides["author_id"] == sides["tag"] == "item" and sides["tab"] == "context"
    assert [f.name for f in schema.sparse if f.multi_hot] == ["tag"]
    assert set(schema.dense_names) == {"duration_ms", "follow_user_num", "fans_user_num", "friend_user_num",
                                       "register_days"}
    train = pq.read_table(sorted((out / "train").glob("*.parquet"))).to_pydict()
    for t in schema.task_names:
        assert train[t] == [float(r[t]) for r in rows if r["date"] < 20220411]
    assert sum(b.batch_size for b in make_dataloader(out, "eval", batch_size=16)) == 60


def test_side_table_joins(converted):
    out, rows, _ = converted
    train_rows = [r for r in rows if r["date"] < 20220411]
    t = pq.read_table(sorted((out / "train").glob("*.parquet"))).to_pydict()
    author, tag, degree, user = (_decoder(out, f) for f in ("author_id", "tag", "user_active_degree", "user_id"))
    music = _decoder(out, "music_id")
    for i, r in enumerate(train_rows):
        assert user[t["user_id"][i]] == r["user"]
        v = r["video"]
        if v < 10:
            assert author[t["author_id"][i]] == 50 + v % 4
            assert sorted(tag[j] for j in t["tag"][i]) == sorted([str(v % 3), str(10 + v % 2)])
            assert t["music_id"][i] == 0 if v == 3 else music[t["music_id"][i]] == 9000 + v  # empty -> 0
        else:  # video without a features row
            assert t["author_id"][i] == 0 and t["tag"][i] == []
        if r["user"] < 6:
            assert degree[t["user_active_degree"][i]] == ["high_active", "full_active"][r["user"] % 2]
        else:
            assert t["user_active_degree"][i] == 0
            assert t["follow_user_num"][i] == 0.0  # missing dense -> the train mean


def test_split_date_tasks_and_min_count(converted, tmp_path):
    _, rows, files = converted
    out = tmp_path / "ds"
    schema = convert("kuairand", files, out, split_date=20220410, tasks="is_click,is_hate", min_count=100)
    assert check_dataset(out) == {"train": 120, "eval": 120}
    assert schema.task_names == ["is_click", "is_hate"]
    assert schema.feature("video_id").num_embeddings == 1  # every id rarer than 100 -> 0
    ev = pq.read_table(sorted((out / "eval").glob("*.parquet"))).to_pydict()
    assert set(ev["video_id"]) == {0} and ev["is_hate"] == [float(r["is_hate"]) for r in rows[120:]]
    with pytest.raises(ConvertError, match="unknown tasks"):
        convert("kuairand", files, out, tasks="is_click,watch")


def test_malformed_log(tmp_path):
    files, _ = _write(tmp_path)
    log = files[1]
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:3]) + lines[3].replace("20220410", "2022-04-10", 1) + "".join(lines[4:]))
    with pytest.raises(ConvertError, match=r"log_standard_4_10_to_4_11_1k\.csv, line 4: column 'date'"):
        convert("kuairand", files, tmp_path / "a")
    log.write_text(",".join(c for c in LOG_COLUMNS if c != "tab") + "\n")
    with pytest.raises(ConvertError, match=r"missing columns \['tab'\]"):
        convert("kuairand", files, tmp_path / "b")
