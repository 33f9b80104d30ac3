"""DisCo's directions fitted on the DCGAN's own samples (the real packaged generator, MTCNN's real
weights): the yaw direction must turn the face, as the detector sees it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from facegen.config import ConfigError, load_config  # noqa: E402
from facegen.faces.align import ARCFACE_TEMPLATE  # noqa: E402
from facegen.identities.directions import crop_lighting, fit_direction, landmark_pose  # noqa: E402


def test_landmark_pose_and_lighting_read_what_they_are_named_after():
    template = np.asarray(ARCFACE_TEMPLATE, np.float64)
    frontal = landmark_pose(template[None])
    mirrored = template.copy()
    mirrored[:, 0] = 112 - mirrored[:, 0]
    mirrored = mirrored[[1, 0, 2, 4, 3]]  # the mirror's left eye is the template's right
    turned = template.copy()
    turned[2, 0] += 8  # the nose moves right of the eyes' midpoint
    assert landmark_pose(turned[None])["yaw"][0] > frontal["yaw"][0] + 0.2
    np.testing.assert_allclose(landmark_pose(mirrored[None])["yaw"], -frontal["yaw"], atol=1e-9)
    angle = np.radians(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    assert landmark_pose((template @ rotation.T)[None])["roll"][0] == pytest.approx(frontal["roll"][0] + 10, abs=1e-6)
    lit = np.zeros((2, 112, 112, 3), np.uint8)
    lit[0, :, :56] = 200  # light on the image's left: the subject's right
    lit[0, :, 56:] = 50
    lit[1] = 125
    lighting = crop_lighting(lit)
    assert lighting["illumination"][0] == pytest.approx(150 / 125) and lighting["illumination"][1] == 0
    assert lighting["brightness"][1] == pytest.approx(125 / 255)


def test_fit_direction_finds_a_planted_direction_both_ways():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((600, 32))
    truth = np.zeros(32)
    truth[3] = 1.0
    values = latents @ truth + 0.1 * rng.standard_normal(600)
    values[:20] = np.nan  # unlabelled samples are left out
    for method in ("svm", "regression"):
        fitted = fit_direction("x", latents, values, np.zeros(32), method)
        assert abs(float(fitted.vector @ truth)) > 0.95 and fitted.samples == 580
        assert fitted.spread == pytest.approx(1.16, rel=0.15)  # mean |projection| of a 30 % tail of N(0, 1)
    with pytest.raises(ValueError, match="directions: x: 5 labelled samples"):
        fit_direction("x", latents[:5], values[20:25], np.zeros(32))


def _cfg(tmp_path, *extra):
    return load_config(None, [f"run.output_dir={tmp_path}/out", "tracking.mode=disabled", "generator.backend=dcgan",
                              "generator.device=cpu", "directions.samples=400", "directions.attributes=[yaw]",
                              "directions.check_identities=12", "directions.pool.num_cpus=0.5", *extra])


@pytest.mark.slow
def test_the_fitted_yaw_direction_turns_the_dcgan_face_monotonically(tmp_path, ray_local):
    from facegen import storage
    from facegen.config import DiscoSettings
    from facegen.generators.gan import build_gan
    from facegen.identities.directions import estimate_attributes
    from facegen.identities.variation import load_directions
    from facegen.generators.latent import render_latents
    from facegen.stages.directions import landmark_finder, run_directions, with_fitted_directions
    from facegen.train.generator_fit import spearman

    cfg = _cfg(tmp_path, "generator.variation=disco", "generator.disco.fit=true", "tracking.mode=offline", "run.name=dirs")
    with pytest.raises(FileNotFoundError, match="directions.npz: generator.disco.fit uses this run's fitted directions; run facegen directions"):
        with_fitted_directions(cfg)
    report = run_directions(cfg, progress=False)
    assert report.blocks_written == 1
    summary = storage.read_json(f"{tmp_path}/out/directions/directions.json")
    assert summary["detected"] >= 300 and summary["directions"]["yaw"]["check"]["spearman"] >= 0.8
    assert os.path.getsize(f"{tmp_path}/out/directions/directions.png") > 1000
    from facegen.tracking import run_id
    from wandb_offline import read_offline_run

    logged = read_offline_run(f"{tmp_path}/out/wandb", run_id=run_id("dirs", "directions"))  # the figures on W&B
    assert logged.summary["directions/yaw/check_spearman"] == summary["directions"]["yaw"]["check"]["spearman"]
    assert sum("directions/grid" in row for row in logged.history) == 1
    resolved = with_fitted_directions(cfg).generator.disco
    vectors, spreads = load_directions(resolved, 100)  # the .npz DisCo reads, names and all, no pickles
    assert vectors.shape == (1, 100) and np.linalg.norm(vectors[0]) == pytest.approx(1.0, abs=1e-5) and spreads[0] > 0.3
    assert list(np.load(resolved.directions, allow_pickle=False)["names"]) == ["yaw"]

    # measured here, on other latents: 9 steps along the direction turn the detected face one way
    gan = build_gan(cfg.generator)
    find = landmark_finder(cfg.directions.detector, cfg.directions.upscale)
    start = gan.gaussian_latents(123, np.arange(12))
    steps = np.linspace(-2, 2, 9)
    means = [np.nanmean(estimate_attributes(render_latents(gan, start + np.float32(s * spreads[0]) * vectors[0], 12), find)["yaw"])
             for s in steps]
    assert spearman(steps, means) >= 0.8, means
    assert means[-1] - means[0] > 0.2  # a real turn: the nose moves a fifth of the eye distance

    assert run_directions(cfg, progress=False).blocks_written == 0  # the same settings: done
    with pytest.raises(ConfigError, match="generator.disco.fit: the run's fitted directions replace disco.directions"):
        load_config(None, ["generator.disco.fit=true", "generator.disco.directions=d.npz"])
    with pytest.raises(ValueError, match="generator.backend: facegen directions fits a GAN's latent directions, not parametric"):
        run_directions(load_config(None, [f"run.output_dir={tmp_path}/p"]), progress=False)


def _dlib_fixed(gan, images):
    from facegen.config import EmbedderSettings
    from facegen.faces.align import align_face
    from facegen.faces.embed import build_embedder

    points = np.asarray(gan.crop.landmarks()).reshape(5, 2)  # the DCGAN's faces sit on its fixed crop
    return build_embedder(EmbedderSettings(kind="dlib")).embed(np.stack([align_face(im, points) for im in images]))


def test_inverting_dcgan_faces_recovers_latents_of_the_same_people_under_dlib():
    import torch

    from facegen.generators.gan import build_gan
    from facegen.generators.latent import render_latents
    from facegen.identities.inversion import invert

    torch.manual_seed(0)
    gan = build_gan(load_config(None, ["generator.backend=dcgan", "generator.device=cpu"]).generator)
    truth = gan.gaussian_latents(5, np.arange(4))
    originals = render_latents(gan, truth)
    found = invert(gan, originals, steps=150, lr=0.05, starts=16)
    assert found.latents.shape == truth.shape and (found.pixel_loss < 0.05).all()
    before, after = _dlib_fixed(gan, originals), _dlib_fixed(gan, render_latents(gan, found.latents))
    distances = np.linalg.norm(before[:, None] - after[None], axis=2)  # [original, reconstruction]
    assert (np.diag(distances) < 0.6).all(), np.diag(distances)  # dlib's same-person threshold
    others = distances[~np.eye(4, dtype=bool)].reshape(4, 3).mean(axis=1)
    assert (np.diag(distances) < others).all()  # closer to its own original than to the others
    with pytest.raises(ValueError, match="identity_weight: the identity term needs a differentiable embedder"):
        invert(gan, originals[:1], steps=1, identity_weight=1.0)


@pytest.mark.slow
def test_a_labelled_folder_is_inverted_and_its_direction_turns_the_face(tmp_path, ray_local):
    """The paper's route (MultiPIE): labelled photos projected into the latent space by inversion, one
    SVM on their labels. Here the photos are DCGAN faces labelled with their yaw as the detector
    measures it; the direction found must turn freshly drawn faces as the detector sees it."""
    import cv2

    from facegen import storage
    from facegen.generators.gan import build_gan
    from facegen.generators.latent import render_latents
    from facegen.identities.directions import estimate_attributes
    from facegen.stages.directions import landmark_finder, run_directions

    cfg = _cfg(tmp_path, f"directions.labelled={tmp_path}/photos", "directions.inversion.steps=50",
               "directions.inversion.batch_size=40", "directions.check_identities=6", "directions.check_steps=5")
    gan = build_gan(cfg.generator)
    images = render_latents(gan, gan.gaussian_latents(9, np.arange(40)))
    yaw = estimate_attributes(images, landmark_finder(cfg.directions.detector, cfg.directions.upscale))["yaw"]
    (tmp_path / "photos").mkdir()
    lines = ["file,yaw"]
    for i, image in enumerate(images):
        cv2.imwrite(str(tmp_path / "photos" / f"{i:02d}.png"), image[:, :, ::-1])
        lines.append(f"{i:02d}.png,{'' if np.isnan(yaw[i]) else f'{yaw[i]:.4f}'}")  # no face: no label
    lines.append("gone.png,0.1")  # a row whose file is missing is left out with its reason
    (tmp_path / "photos" / "labels.csv").write_text("\n".join(lines) + "\n")
    run_directions(cfg, progress=False)
    summary = storage.read_json(f"{tmp_path}/out/directions/directions.json")
    assert summary["source"] == "labelled" and summary["detected"] == 40 and summary["samples"] == 41
    assert summary["skipped"][0].startswith("labels.csv:42 gone.png: FileNotFoundError")
    assert summary["directions"]["yaw"]["check"]["spearman"] >= 0.8, summary["directions"]["yaw"]
    with pytest.raises(ConfigError, match=r"directions: attributes: \['planted'\] are not facegen's estimators"):
        load_config(None, ["directions.attributes=[planted]"])
