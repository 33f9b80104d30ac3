"""Attribute-balanced identity descriptions and their prompts."""

from collections import Counter

import pytest

from facegen.config import DiffusionSettings
from facegen.identities.attributes import ATTRIBUTES, NEGATIVE_PROMPT, build_prompt, sample_attributes


def _counts(seed, ids):
    per_attribute = {name: Counter() for name in ATTRIBUTES}
    for identity_id in ids:
        for name, value in sample_attributes(seed, identity_id).items():
            per_attribute[name][value] += 1
    return per_attribute


def test_every_value_used_equally_over_whole_windows():
    for name, counts in _counts(seed=5, ids=range(420)).items():  # 420 is a multiple of every vocabulary size
        n = len(ATTRIBUTES[name])
        assert set(counts) == set(ATTRIBUTES[name])
        assert set(counts.values()) == {420 // n}, name


def test_balanced_within_one_from_zero_and_two_anywhere():
    for name, counts in _counts(seed=0, ids=range(100)).items():
        assert max(counts.values()) - min(counts.values()) <= 1, name
    for name, counts in _counts(seed=0, ids=range(1013, 1113)).items():
        assert len(counts) == len(ATTRIBUTES[name])
        assert max(counts.values()) - min(counts.values()) <= 2, name


def test_deterministic_and_seed_dependent():
    assert sample_attributes(3, 17) == sample_attributes(3, 17)
    assert [sample_attributes(3, i) for i in range(40)] != [sample_attributes(4, i) for i in range(40)]


def test_attributes_of_equal_size_still_mix():
    assert len(ATTRIBUTES["face_shape"]) == len(ATTRIBUTES["expression"])
    pairs = {(a["face_shape"], a["expression"]) for a in (sample_attributes(0, i) for i in range(360))}
    assert len(pairs) >= 30  # of 36; locked-step assignment would give 6


def test_prompt_names_every_attribute():
    attrs = sample_attributes(1, 2)
    attrs.update(face_shape="oval", accessory="eyeglasses", distinctive_feature="freckles")
    prompt = build_prompt(attrs)
    assert prompt.startswith(f"a close-up portrait photo of a {attrs['age']} {attrs['ethnicity']} {attrs['gender']}")
    assert "an oval face" in prompt and "wearing eyeglasses" in prompt and "with freckles" in prompt
    assert f"{attrs['hair_style']} {attrs['hair_colour']} hair" in prompt and attrs["expression"] in prompt
    assert "face exposed and clearly visible" in prompt
    attrs.update(accessory="none", distinctive_feature="none")
    assert "none" not in build_prompt(attrs)
    with pytest.raises(ValueError, match="hair_colour"):
        build_prompt({k: v for k, v in attrs.items() if k != "hair_colour"})


def test_negative_prompt_and_invalid_ids():
    assert NEGATIVE_PROMPT == DiffusionSettings().negative_prompt
    with pytest.raises(ValueError, match="identity_id"):
        sample_attributes(0, -3)
    with pytest.raises(ValueError, match="seed"):
        sample_attributes(-1, 3)
