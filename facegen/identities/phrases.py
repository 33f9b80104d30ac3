"""Per-sample variation phrases (pose, expression, lighting, camera, background) for text backends.

HybridGen re-renders each reference with such phrases (ALGORITHMS.md 1.5) so one person appears
under many conditions. A sample's phrase is a pure function of its sample seed: one value per
category, drawn independently from the sample's own stream.
"""

from __future__ import annotations

import numpy as np

#: Domain tag of the phrase draws.
VARIATION_TAG = 0x7A61

POSES = (
    "frontal view", "head turned slightly to the left", "head turned slightly to the right",
    "three-quarter view from the left", "three-quarter view from the right", "head tilted slightly",
    "looking slightly up", "looking slightly down",
)
EXPRESSIONS = (
    "neutral expression", "gentle smile", "broad smile showing teeth", "serious expression",
    "surprised expression", "laughing", "pensive expression", "squinting slightly",
)
LIGHTING = (
    "soft natural light", "bright daylight", "warm indoor light", "side lighting", "overcast light",
    "studio lighting", "evening light", "backlit with rim light",
)
CAMERAS = (
    "85mm portrait lens", "50mm lens", "smartphone photo", "DSLR photo", "close-up shot", "medium close-up",
)
BACKGROUNDS = (
    "plain grey background", "blurred city street", "office interior", "park with trees", "white wall",
    "living room", "outdoor cafe", "bookshelf background",
)

#: Categories in the order they are drawn and joined.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "pose": POSES,
    "expression": EXPRESSIONS,
    "lighting": LIGHTING,
    "camera": CAMERAS,
    "background": BACKGROUNDS,
}


def variation_phrase(sample_seed: int) -> str:
    """A phrase such as ``"three-quarter view from the left, gentle smile, side lighting, ..."``."""
    rng = np.random.default_rng([int(sample_seed), VARIATION_TAG])
    return ", ".join(values[int(rng.integers(len(values)))] for values in CATEGORIES.values())


def with_variation(prompt: str, sample_seed: int) -> str:
    """``prompt`` with the sample's variation phrase appended."""
    return f"{prompt}, {variation_phrase(sample_seed)}"
