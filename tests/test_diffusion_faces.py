"""A diffusion run on the tiny test pipeline goes through detection: images without a face become
error rows with the reason, and the job still commits every block."""

import pytest

from facegen import blocks as blk
from facegen import storage
from facegen.config import config_from_dict
from facegen.testing.tiny_diffusers import build_tiny_sd

pytestmark = pytest.mark.slow


def test_diffusion_images_without_faces_are_error_rows(ray_local, tmp_path):
    from facegen.stages.generate import run_generate

    model = build_tiny_sd(str(tmp_path / "tiny_sd"))
    cfg = config_from_dict({
        "run": {"name": "sd-faces", "output_dir": str(tmp_path / "run")},
        "identities": {"num_identities": 3, "block_size": 2},
        "generator": {"backend": "diffusion", "images_per_identity": 2, "batch_size": 2, "pool": {"num_cpus": 0.5},
                      "diffusion": {"model": model, "num_inference_steps": 2, "height": 64, "width": 64, "local_files_only": True}},
        "faces": {"detector": {"kind": "mtcnn", "device": "cpu"}, "embedder": {"kind": "dlib"}, "pool": {"num_cpus": 0.25}},
    })
    report = run_generate(cfg, progress=False)
    assert report.blocks_written == 2 and report.totals == {"identities": 3, "images": 6, "images_ok": 0, "images_error": 6,
                                                                  "faces_rejected": 6, "injected_wrong": 0}  # all six: no face
    raw = cfg.stage_dir("raw")
    table = storage.read_table(blk.block_path(raw, 0))
    reasons = table.column("reason").to_pylist()
    assert all(r.startswith(f"faces: identity {i} sample {k}: no face") for r, (i, k) in zip(reasons, [(0, 0), (0, 1), (1, 0), (1, 1)]))
    assert table.column("embedding").null_count == 4 and table.schema.field("embedding").type.list_size == 128
    assert storage.read_json(blk.stats_path(raw, 1))["error_reasons"] == {"no face": 2}
