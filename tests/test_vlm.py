"""The VLM expert against a real chat-completions server on loopback (slow, failing, malformed answers)."""

import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.compute as pc

from facegen import storage
from facegen.clean.view import block_view
from facegen.clean.vlm import VlmExpert, VlmSettings, parse_answer, render_grid
from planted import ChatServer, judge, planted_block

THUMB = 64


def test_parse_answer_accepts_only_the_asked_form():
    assert parse_answer("004, 017", 20) == [4, 17]
    assert parse_answer(" NONE. ", 20) == []
    assert parse_answer("017,004 004", 20) == [4, 17]
    for bad in ("4, 17", "The person 004", "", None, "021", "none of them"):
        assert parse_answer(bad, 20) is None, bad


def test_grid_has_a_numbered_cell_per_face():
    faces = [np.full((112, 112, 3), 10 * k, np.uint8) for k in range(10)]
    grid = render_grid(faces, THUMB)
    assert grid.shape == (3 * (THUMB + 22), 4 * THUMB, 3)
    assert (grid[THUMB + 5 : THUMB + 20, :THUMB] < 128).any()  # the number's ink under face 000


def make_block():
    table = planted_block(8, 10, 0.2, seed=5, pixel_noise=(5, 20))
    # identity 7 keeps 7 faces: the server answers prose for 7-face grids (unparsable)
    keep = pc.or_(pc.not_equal(table.column("identity_id"), 7), pc.less(table.column("sample_idx"), 7))
    return table.filter(keep)


def settings(**kw):
    base = dict(model="stand-in", thumbnail=THUMB, timeout_s=0.5, max_attempts=8, backoff_s=0.05,
                backoff_max_s=0.2, concurrency=2, requests_per_minute=300)
    return VlmSettings(**{**base, **kw})


def scripted(n):
    return {1: "500", 2: "malformed", 3: "slow", 6: "429"}.get(n % 7, "ok")


def test_answers_survive_failures_and_respect_the_limits(tmp_path):
    view = block_view(make_block())
    identities = sorted(view.groups)
    with ChatServer(THUMB, scripted, slow_s=1.0, unparsable_count=7) as server:
        expert = VlmExpert(settings(base_url=server.base_url), str(tmp_path / "cache"))
        votes = expert.vote(view, identities)
        first = list(server.requests)
        again = expert.vote(view, identities)
        assert len(server.requests) == len(first)  # every outcome came from the cache
    assert votes.info["asked"] == 8 and votes.info["answered"] == 7 and votes.info["unparsable"] == 1 and votes.info["failed"] == 0
    assert again.info["cached"] == 8 and np.array_equal(again.vote, votes.vote)
    failures = [scripted(n) for n in range(len(first))]
    assert {"500", "malformed", "slow", "429"} <= set(failures)  # every kind of misbehaviour was served
    starts = np.sort([r["start"] for r in first])
    in_any_second = max(np.searchsorted(starts, t + 1.0) - i for i, t in enumerate(starts))
    assert in_any_second <= 6  # 300 requests per minute: 5 a second (+1 for arrival jitter)
    assert (starts[-1] - starts[0]) >= 0.2 * (len(starts) - 1) - 0.1
    assert server.max_in_flight <= 2
    assert {r["temperature"] for r in first if "temperature" in r} == {0}

    unparsable = view.groups[7]
    assert (votes.vote[unparsable] == -1).all() and "unparsable" in votes.reason[unparsable[0]]
    judged = np.concatenate([view.groups[i] for i in identities if i != 7])
    wrong = view.true_identity[judged] != view.identity[judged]
    dropped = votes.vote[judged] == 0
    assert wrong.sum() >= 8
    precision, recall = (wrong & dropped).sum() / dropped.sum(), (wrong & dropped).sum() / wrong.sum()
    assert precision >= 0.85 and recall >= 0.85, (precision, recall)
    for ident in identities[:-1]:  # every answer arrived intact: the votes are exactly the server's judgement
        rows = view.groups[ident]
        expected = set(judge(render_grid([view.image(r) for r in rows], THUMB), len(rows), THUMB))
        assert set(np.flatnonzero(votes.vote[rows] == 0)) == expected


KILLED_RUN = """
import sys
from facegen import storage
from facegen.clean.view import block_view
from facegen.clean.vlm import VlmExpert, VlmSettings
view = block_view(storage.read_table(sys.argv[1]))
settings = VlmSettings.model_validate_json(sys.argv[2])
VlmExpert(settings, sys.argv[3]).vote(view, sorted(view.groups))
"""


def cached_files(cache):
    return [os.path.join(d, f) for d, _, files in os.walk(cache) for f in files if f.endswith(".json")]


def test_cache_resumes_after_a_kill(tmp_path):
    table = make_block()
    block_path, cache = str(tmp_path / "block.parquet"), str(tmp_path / "cache")
    storage.write_table_atomic(table, block_path)
    view = block_view(table)
    with ChatServer(THUMB, lambda n: "slow", slow_s=0.4) as server:
        cfg = settings(base_url=server.base_url, concurrency=1, timeout_s=5.0, requests_per_minute=6000)
        child = subprocess.Popen([sys.executable, "-c", KILLED_RUN, block_path, cfg.model_dump_json(), cache])
        deadline = time.monotonic() + 60
        while len(cached_files(cache)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        child.kill()
        child.wait()
        done_before = len(cached_files(cache))
        assert 3 <= done_before < 8
        asked_before = len(server.requests)
        votes = VlmExpert(cfg, cache).vote(view, sorted(view.groups))
        asked_after = len(server.requests) - asked_before
    assert votes.info["cached"] == done_before and votes.info["asked"] == 8
    assert votes.info["answered"] + votes.info["unparsable"] == 8
    assert asked_after == 8 - done_before  # only the unanswered identities were asked again
    assert len(cached_files(cache)) == 8
