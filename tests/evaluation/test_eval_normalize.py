"""VQA answer normalisation against hand-derived expectations (incl. the official quirks)."""

import pytest

from moe_lvlm.evaluation.normalize import (
    normalize_evalai_answer,
    normalize_vqa_answer,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("two", "2"),  # number words become digits
        ("Two", "2"),  # after lower-casing
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("a dog", "dog"),  # articles dropped
        ("The dog.", "dog"),
        ("an apple", "apple"),
        ("dog.", "dog"),  # trailing period removed
        ("Yes.", "yes"),
        ("yes!", "yes"),  # '!' not touching a space becomes a space, then split away
        ("3.5", "3.5"),  # a period before a digit is a decimal point and stays
        ("2.5.", "2.5"),
        ("1,000", "1000"),  # digit-comma-digit: commas deleted, not spaced
        ("t-shirt 1,2", "tshirt 12"),  # ... and then every punctuation mark is deleted
        ("black/white", "black white"),  # no space around '/': replaced by a space
        ("red - white", "red white"),  # '-' touches a space: deleted
        ("hello,world", "hello world"),
        ("dont", "don't"),  # contractions restored
        ("Isnt", "isn't"),
        ("Im", "im"),  # the official table's capitalised keys never match lower-case text
        ("\tthe  cat\n", "cat"),
        ("yes\nno", "yes no"),
        ("it's", "it's"),  # apostrophes are not punctuation here
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_at_most_32_periods_are_removed():
    # The official scorer passes re.UNICODE (32) as the `count` of re.sub.
    assert normalize_vqa_answer("." * 40) == "." * 8


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("What's up?", "what 's up"),  # "'s" split off, '?' dropped
        ("Coca-Cola", "coca cola"),
        ("1,000", "1000"),
        ("Two.", "2"),
        ("the Dog", "dog"),
    ],
)
def test_normalize_evalai_answer(raw, expected):
    assert normalize_evalai_answer(raw) == expected


@pytest.mark.parametrize(
    ("humans", "prediction", "expected"),
    [
        # 2 humans said "2": leaving out one of them leaves 1 match (1/3), leaving out one of the
        # 8 others leaves 2 matches (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6
        (["2"] * 2 + ["3"] * 8, "2", 0.6),
        # 3 matches: (3 * 2/3 + 7 * 1) / 10 = 0.9
        (["dog"] * 3 + ["cat"] * 7, "dog", 0.9),
        # 4 matches: at least 3 remain in every subset
        (["dog"] * 4 + ["cat"] * 6, "dog", 1.0),
        # 1 match: (1 * 0 + 9 * 1/3) / 10 = 0.3
        (["dog"] + ["cat"] * 9, "dog", 0.3),
        (["cat"] * 10, "dog", 0.0),
    ],
)
def test_vqa_accuracy(humans, prediction, expected):
    assert vqa_accuracy(prediction, humans) == pytest.approx(expected)
