"""im2markup's image metrics: column edit distance and exact match, with and without blank columns."""

from __future__ import annotations

import numpy as np

from markup2image.evaluation.image_edit import image_edit_scores, summarize_image_edit


def _image(cols: dict[int, list[int]], h: int = 8, w: int = 20) -> np.ndarray:
    img = np.full((h, w), 255, dtype=np.uint8)
    for x, rows in cols.items():
        img[rows, x] = 0
    return img


def test_identical_images_match_and_have_no_edits():
    gold = _image({3: [1, 2, 3], 4: [2], 10: [5, 6]})
    s = image_edit_scores(gold, gold)
    assert s["edit_distance"] == 0 and s["edit_ref"] == 20 and s["exact_match"] == 1
    assert s["edit_ref_nonblank"] == 3 and s["exact_match_nonblank"] == 1


def test_binarisation_at_128_and_fuzzy_columns():
    gold = _image({3: [1, 2, 3]})
    light = gold.copy()
    light[light == 0] = 129  # not ink under im2markup's <= 128
    s = image_edit_scores(light, gold)
    assert s["edit_distance"] == 1 and s["exact_match"] == 1  # one column off: a run shorter than 5 columns
    assert s["exact_match_nonblank"] == 0  # no ink at all in the prediction vs ink in the gold


def test_a_long_wrong_run_breaks_the_match_and_blank_columns_are_dropped():
    gold = _image({x: [1, 2, 3, 4, 5, 6] for x in range(2, 9)})
    pred = _image({x: [0, 7] for x in range(2, 9)})  # 7 columns differ in 8 pixels each
    s = image_edit_scores(pred, gold)
    assert s["edit_distance"] == 7 and s["exact_match"] == 0 and s["exact_match_nonblank"] == 0
    shifted = _image({x: [1, 2, 3, 4, 5, 6] for x in range(10, 17)})  # same ink, moved right
    s = image_edit_scores(shifted, gold)
    assert s["edit_distance"] > 0 and s["exact_match_nonblank"] == 1 and s["edit_distance_nonblank"] == 0


def test_summary_is_one_minus_total_distance_over_total_ref():
    rows = [
        {"edit_distance": 2.0, "edit_ref": 10.0, "exact_match": 1.0, "edit_distance_nonblank": 1.0,
         "edit_ref_nonblank": 4.0, "exact_match_nonblank": 0.0},
        {"edit_distance": 6.0, "edit_ref": 10.0, "exact_match": 0.0, "edit_distance_nonblank": 3.0,
         "edit_ref_nonblank": 4.0, "exact_match_nonblank": 0.0},
    ]  # fmt: skip
    s = summarize_image_edit(rows)
    assert s["edit_accuracy"] == 1 - 8 / 20 and s["edit_accuracy_nonblank"] == 1 - 4 / 8
    assert s["exact_match"] == 0.5 and s["exact_match_nonblank"] == 0.0
    assert summarize_image_edit([])["edit_accuracy"] is None
