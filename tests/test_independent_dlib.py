"""The independent expert with dlib's ResNet (a second, unrelated FR model) on real photos."""

import cv2
import numpy as np
from insightface.data import get_image

from facegen.clean.augment import augment_face
from facegen.clean.independent import IndependentExpert, IndependentSettings, load_embedder
from facegen.clean.view import block_view
from facegen.config import AugmentSettings, DetectorSettings, EmbedderSettings
from facegen.faces.align import align_face
from facegen.faces.detect import build_detector
from facegen.images import encode_image
from facegen.schema import rows_to_batch, sample_schema, table_from_batch


def test_dlib_flags_other_people_inside_an_identity():
    photo = cv2.cvtColor(get_image("t1"), cv2.COLOR_BGR2RGB)  # six different people
    faces = [d for d in build_detector(DetectorSettings(kind="mtcnn", device="cpu")).detect(photo) if d.score >= 0.9]
    crops = [align_face(photo, d.landmarks) for d in sorted(faces, key=lambda d: d.box[0])]
    assert len(crops) == 6
    rng = np.random.default_rng(0)
    light = AugmentSettings(color_jitter=(0.2, 0.2, 0.2, 0.02), grayscale_p=0.0, affine_degrees=5.0, low_res_factor=1.0)
    person = [crops[0]] + [augment_face(crops[0], rng, light) for _ in range(9)]  # ten photos of one person
    images = person + [crops[3], crops[5]]  # and two strangers filed under the same identity
    dlib = load_embedder(EmbedderSettings(kind="dlib"))
    embeddings = dlib(np.stack(images))
    assert embeddings.shape == (12, 128)
    rows = [{"identity_id": 7, "block_id": 0, "sample_idx": k, "seed": k, "source": "t1", "image": encode_image(img, "png"),
             "true_identity_id": 7 if k < 10 else 100 + k, "meta": "{}", "embedding": embeddings[k], "quality": np.float32(1.0),
             "difficulty": np.float32(np.nan), "status": "ok", "reason": "", "origin": "generated"} for k, img in enumerate(images)]
    schema = sample_schema(128)
    view = block_view(table_from_batch(rows_to_batch(rows, schema), schema))

    votes = IndependentExpert(dlib, IndependentSettings(percentile=15)).vote(view, [7])
    assert votes.vote.tolist() == [1] * 10 + [0] * 2  # the two strangers, and only they, fall below the threshold
    assert votes.info["judged"] == 12 and 0 < votes.info["threshold"] < 1
    assert all("independent: cos" in r for r in votes.reason)
