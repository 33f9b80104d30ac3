"""Block planning, atomic writes and done-markers."""

import pyarrow as pa
import pytest

from facegen import blocks as blk
from facegen import storage
from facegen.config import IdentitySettings


def test_plan_blocks_covers_ids_exactly_once():
    planned = blk.plan_blocks(IdentitySettings(num_identities=23, first_id=7, block_size=5))
    ids = [i for b in planned for i in range(b.first_id, b.end_id)]
    assert ids == list(range(7, 30))
    assert [b.block_id for b in planned] == [1, 2, 3, 4, 5]
    assert all(b.block_id == b.first_id // 5 for b in planned)


def test_commit_marks_done_and_reset_forgets(tmp_path):
    stage = str(tmp_path / "raw")
    table = pa.table({"identity_id": [1, 2]})
    assert not blk.is_done(stage, 3)
    record = blk.commit_block(stage, 3, table, {"images": 2})
    assert blk.is_done(stage, 3)
    assert record["rows"] == 2 and record["sha256"] == storage.sha256_of(blk.block_path(stage, 3))
    assert blk.done_block_ids(stage) == [3]
    assert blk.read_stats(stage)[0]["images"] == 2
    assert blk.sum_stats(blk.read_stats(stage), ["images", "absent"]) == {"images": 2, "absent": 0}
    blk.reset_blocks(stage, [3])
    assert blk.done_block_ids(stage) == []


def test_data_file_without_stats_is_not_done(tmp_path):
    stage = str(tmp_path / "raw")
    storage.write_table_atomic(pa.table({"a": [1]}), blk.block_path(stage, 0))
    assert not blk.is_done(stage, 0)
    assert blk.done_block_ids(stage) == []


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = str(tmp_path / "d" / "x.json")
    storage.write_json_atomic({"a": 1}, path)
    assert storage.read_json(path) == {"a": 1}
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["x.json"]


def test_read_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="bad.parquet: not a readable Parquet file"):
        storage.read_table(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.json: no such file"):
        storage.read_json(str(tmp_path / "missing.json"))
    (tmp_path / "b.json").write_text("{")
    with pytest.raises(ValueError, match="b.json: not valid JSON"):
        storage.read_json(str(tmp_path / "b.json"))
