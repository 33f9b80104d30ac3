"""Semi-hard selection (CemiFace): samples of moderate similarity to the centre are kept first."""

import numpy as np

from facegen.clean.finish import finish_block
from facegen.clean.block import vote_block
from facegen.clean.selection import band_summary, select, selection_order
from facegen.config import CleanSettings, SelectionSettings
from planted import planted_block


def test_band_first_then_too_easy_then_too_hard():
    cos = np.array([0.95, 0.72, 0.5, 0.2, 0.85, 0.79, 0.31, 0.1])
    order = selection_order(cos, np.arange(8), SelectionSettings(band=(0.3, 0.8), target=0.7))
    assert order.tolist() == [1, 5, 2, 6, 4, 0, 3, 7]
    central = selection_order(cos, np.arange(8), SelectionSettings(mode="central"))
    assert central.tolist() == [0, 4, 5, 1, 2, 6, 3, 7]
    assert select(cos, np.arange(8), 3, SelectionSettings()).tolist() == [False, True, True, False, False, True, False, False]


def test_trim_keeps_semi_hard_samples_and_reports_the_distribution():
    table = planted_block(4, 40, 0.0, seed=7, pixel_noise=(5, 90))  # a wide spread of similarity to the centre
    semi = CleanSettings(min_images=5, target_images=12)
    central = CleanSettings(min_images=5, target_images=12, selection={"mode": "central"})
    voted, _, _ = vote_block(table, 0, semi)
    out_semi, stats_semi = finish_block(voted, semi, seed=0)
    out_central, stats_central = finish_block(voted, central, seed=0)
    before, after = stats_semi["similarity_to_centre"]["before_selection"], stats_semi["similarity_to_centre"]["after_selection"]
    assert before["count"] > after["count"] == 4 * 12
    assert sum(before["histogram"]) == before["count"] and sum(after["histogram"]) == after["count"]
    central_after = stats_central["similarity_to_centre"]["after_selection"]
    print("cos to centre, mean: before", round(before["mean"], 3), "semi-hard", round(after["mean"], 3), "central", round(central_after["mean"], 3))
    assert after["in_band"] > before["in_band"] and after["in_band"] >= central_after["in_band"]
    assert after["mean"] < central_after["mean"]  # the most central samples are no longer preferred
    trimmed = [r for r in out_semi.to_pylist() if r["decided_by"] == "selection"]
    assert trimmed and all(r["status"] == "dropped" and "semi_hard" in r["reason"] for r in trimmed)
    assert band_summary(np.array([0.1, 0.5, 0.9, np.nan]), SelectionSettings())["in_band"] == 1 / 3
