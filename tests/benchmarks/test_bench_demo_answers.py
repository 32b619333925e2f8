"""benchmarks/demo_answers.py: accuracy by what the scene holds, against hand-counted groups."""

import pytest

from benchmarks import demo_answers

SCENES = {
    "test-0": [{"digit": 3, "cell": 0, "color": "red"}, {"digit": 5, "cell": 3, "color": "red"}],
    "test-1": [{"digit": 1, "cell": 1, "color": "blue"}, {"digit": 7, "cell": 2, "color": "red"},
               {"digit": 8, "cell": 3, "color": "green"}],
}


def item(question_id, question_type, correct):
    return {"question_id": question_id, "question_type": question_type, "correct": correct}


def test_groups_by_scene_candidates():
    items = [item("test-0", "color", True), item("test-1", "color", False),
             item("test-1", "color", True), item("test-0", "position", False),
             item("test-1", "yes_no", True), item("test-0", "count", True),
             item("test-1", "digit", False)]
    rows = demo_answers.breakdown(items, SCENES)
    assert rows == [
        {"type": "color", "scene": "distinct colours: 1", "questions": 1, "accuracy": 100.0,
         "guess": 100.0},
        {"type": "color", "scene": "distinct colours: 3", "questions": 2, "accuracy": 50.0,
         "guess": pytest.approx(100 / 3)},
        {"type": "color", "scene": "all", "questions": 3, "accuracy": pytest.approx(200 / 3),
         "guess": pytest.approx((100 + 2 * 100 / 3) / 3)},
        {"type": "count", "scene": "digits: 2", "questions": 1, "accuracy": 100.0,
         "guess": pytest.approx(100 / 3)},
        {"type": "count", "scene": "all", "questions": 1, "accuracy": 100.0,
         "guess": pytest.approx(100 / 3)},
        {"type": "digit", "scene": "digits: 3", "questions": 1, "accuracy": 0.0,
         "guess": pytest.approx(100 / 3)},
        {"type": "digit", "scene": "all", "questions": 1, "accuracy": 0.0,
         "guess": pytest.approx(100 / 3)},
        {"type": "position", "scene": "digits: 2", "questions": 1, "accuracy": 0.0,
         "guess": 50.0},
        {"type": "position", "scene": "all", "questions": 1, "accuracy": 0.0, "guess": 50.0},
        {"type": "yes_no", "scene": "digits: 3", "questions": 1, "accuracy": 100.0,
         "guess": 50.0},
        {"type": "yes_no", "scene": "all", "questions": 1, "accuracy": 100.0, "guess": 50.0},
    ]


def test_an_unknown_record_is_named():
    with pytest.raises(ValueError, match="'stage3-4'"):
        demo_answers.breakdown([item("stage3-4", "color", True)], SCENES)

