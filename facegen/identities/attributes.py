"""Attribute-balanced identity descriptions and the text prompts built from them (ALGORITHMS.md 1.5).

Each identity gets one value per attribute (age, gender, ethnicity, hair colour and style,
accessory, face shape, expression, distinctive feature). Values are assigned by stratified
sampling: ids are cut into windows of ``n`` consecutive ids (``n`` = number of values of the
attribute) and every window uses each value exactly once, in an order given by a permutation seeded
by ``(seed, attribute, window)``. So every aligned window of ``n`` ids is exactly balanced, any
range of consecutive ids is balanced to within 2 per value (within 1 when it starts on a window
boundary, e.g. at id 0), and because each attribute and window has its own permutation the
combinations of attributes mix as if drawn independently.
"""

from __future__ import annotations

import numpy as np

from facegen.config import DiffusionSettings

#: Domain tag of the attribute permutations (keeps them independent of every other draw).
ATTRIBUTE_TAG = 0xA771

AGES = ("20-year-old", "30-year-old", "40-year-old", "50-year-old", "65-year-old")
GENDERS = ("man", "woman")
ETHNICITIES = ("East Asian", "South Asian", "Southeast Asian", "Black", "White", "Hispanic", "Middle Eastern")
HAIR_COLOURS = ("black", "dark brown", "light brown", "blonde", "red", "grey")
HAIR_STYLES = (
    "short straight", "long straight", "short curly", "long curly", "wavy shoulder-length", "buzz-cut", "tied-back",
)
ACCESSORIES = ("none", "eyeglasses", "thin-rimmed glasses", "small earrings", "a necklace", "a beanie")
FACE_SHAPES = ("oval", "round", "square", "heart-shaped", "long", "diamond-shaped")
EXPRESSIONS = (
    "a neutral expression", "a slight smile", "a broad smile", "a serious expression", "a surprised expression",
    "a thoughtful expression",
)
DISTINCTIVE_FEATURES = (
    "none", "freckles", "a mole on the cheek", "dimples", "a small scar on the chin", "thick eyebrows",
    "high cheekbones",
)

#: Every attribute and its vocabulary, in the order they are drawn and reported.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "age": AGES,
    "gender": GENDERS,
    "ethnicity": ETHNICITIES,
    "hair_colour": HAIR_COLOURS,
    "hair_style": HAIR_STYLES,
    "accessory": ACCESSORIES,
    "face_shape": FACE_SHAPES,
    "expression": EXPRESSIONS,
    "distinctive_feature": DISTINCTIVE_FEATURES,
}

#: Default negative prompt: the one of :class:`facegen.config.DiffusionSettings`, so there is one source.
NEGATIVE_PROMPT: str = DiffusionSettings.model_fields["negative_prompt"].default


def _check_ids(seed: int, identity_id: int) -> None:
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if int(identity_id) < 0:
        raise ValueError(f"identity_id must be >= 0, got {identity_id}")


def sample_attributes(seed: int, identity_id: int) -> dict[str, str]:
    """The attribute values of one identity: deterministic in ``(seed, identity_id)`` and balanced."""
    _check_ids(seed, identity_id)
    identity_id = int(identity_id)
    attrs: dict[str, str] = {}
    for index, (name, values) in enumerate(ATTRIBUTES.items()):
        n = len(values)
        window, position = divmod(identity_id, n)
        order = np.random.default_rng([int(seed), ATTRIBUTE_TAG, index, window]).permutation(n)
        attrs[name] = values[int(order[position])]
    return attrs


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def build_prompt(attrs: dict[str, str]) -> str:
    """A text-to-image prompt for one identity, e.g. "a close-up portrait photo of a 30-year-old ..."."""
    missing = [name for name in ATTRIBUTES if name not in attrs]
    if missing:
        raise ValueError(f"attributes lack {missing}")
    parts = [
        f"a close-up portrait photo of a {attrs['age']} {attrs['ethnicity']} {attrs['gender']}",
        f"with {_article(attrs['face_shape'])} {attrs['face_shape']} face",
        f"{attrs['hair_style']} {attrs['hair_colour']} hair",
    ]
    if attrs["accessory"] != "none":
        parts.append(f"wearing {attrs['accessory']}")
    parts.append(f"with {attrs['expression']}")
    if attrs["distinctive_feature"] != "none":
        parts.append(f"with {attrs['distinctive_feature']}")
    parts += ["face exposed and clearly visible", "looking at the camera", "sharp focus", "natural lighting"]
    parts.append("high quality photo")
    return ", ".join(parts)
