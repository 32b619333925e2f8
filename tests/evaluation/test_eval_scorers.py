"""Each scorer on small hand-made fixtures; expected scores are worked out by hand here."""

import pytest

from moe_lvlm.evaluation.scorers import (
    parse_mme_answer,
    parse_pope_answer,
    parse_scienceqa_choice,
    score_gqa,
    score_mme,
    score_pope,
    score_scienceqa,
    score_textvqa,
    score_vqav2,
)


def _vqa_record(qid, answers, answer_type="other"):
    return {"question_id": qid, "answers": answers, "answer_type": answer_type,
            "question_type": "what"}  # fmt: skip


def test_score_vqav2():
    records = [
        _vqa_record(1, ["2"] * 2 + ["3"] * 8, "number"),
        _vqa_record(2, ["dog"] * 3 + ["cat"] * 7),
        # All humans agree: their answers are compared raw, the prediction is normalised to
        # "t shirt" -> no match (the official scorer's behaviour).
        _vqa_record(3, ["t-shirt"] * 10),
        # Humans disagree: their answers get punctuation processing too -> 9 matches.
        _vqa_record(4, ["t-shirt"] * 9 + ["shirt"]),
    ]
    predictions = {1: "Two.", 2: "a dog", 3: "t-shirt", 4: "T-shirt"}
    summary, per_item = score_vqav2(predictions, records)
    # per question: 0.6 (see test_vqa_accuracy), 0.9, 0.0, 1.0
    assert [item["accuracy"] for item in per_item] == pytest.approx([0.6, 0.9, 0.0, 1.0])
    assert summary["accuracy"] == pytest.approx(100 * (0.6 + 0.9 + 0.0 + 1.0) / 4)
    assert summary["accuracy_per_answer_type"] == pytest.approx(
        {"number": 60.0, "other": 100 * 1.9 / 3}
    )
    assert per_item[0]["normalized"] == "2" and per_item[1]["normalized"] == "dog"
    assert summary["num_questions"] == 4


def test_scorers_reject_missing_answers():
    with pytest.raises(ValueError, match="1 of 2 questions have no answer"):
        score_vqav2({1: "yes"}, [_vqa_record(1, ["yes"] * 10), _vqa_record(2, ["no"] * 10)])


def test_score_textvqa():
    records = [
        # Human answers are normalised too: "Coca-Cola" == "coca cola" -> 3 matches -> 0.9
        {"question_id": 1, "answers": ["Coca-Cola"] * 2 + ["coca cola"] + ["pepsi"] * 7},
        # "two" -> "2" on the human side as well -> 1.0
        {"question_id": 2, "answers": ["two"] * 10},
        {"question_id": 3, "answers": ["stop"] * 10},
    ]
    predictions = {1: "Coca Cola.", 2: "2", 3: "go"}
    summary, per_item = score_textvqa(predictions, records)
    assert [i["accuracy"] for i in per_item] == pytest.approx([0.9, 1.0, 0.0])
    assert summary["accuracy"] == pytest.approx(100 * 1.9 / 3)


def test_score_gqa():
    records = [
        {"question_id": "a", "answer": "yes", "structural": "verify", "semantic": "attr"},
        {"question_id": "b", "answer": "no", "structural": "logical", "semantic": "rel"},
        {"question_id": "c", "answer": "table", "structural": "query", "semantic": "obj"},
        {"question_id": "d", "answer": "red", "structural": "query", "semantic": "attr"},
    ]
    predictions = {"a": "Yes.", "b": "yes", "c": "Table", "d": "a red one"}
    summary, per_item = score_gqa(predictions, records)
    assert [i["correct"] for i in per_item] == [True, False, True, False]
    assert summary["accuracy"] == pytest.approx(50.0)
    assert summary["accuracy_per_kind"] == pytest.approx({"binary": 50.0, "open": 50.0})
    assert summary["accuracy_per_semantic_type"] == pytest.approx(
        {"attr": 50.0, "obj": 100.0, "rel": 0.0}
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", 1),
        ("B. sample A", 1),  # letter, period, space
        ("The answer is C.", 2),
        ("A.", -1),  # neither a bare letter nor followed by ". "
        ("D", -1),  # only 3 choices
        ("The answer is B. The answer is C.", -1),  # ambiguous
        ("b", -1),
        ("I am not sure", -1),
    ],
)
def test_parse_scienceqa_choice(text, expected):
    assert parse_scienceqa_choice(text, num_choices=3) == expected


def test_score_scienceqa():
    records = [{"question_id": str(i), "choices": ["x", "y", "z"], "answer": 1} for i in range(4)]
    predictions = {"0": "B", "1": "A", "2": "The answer is B.", "3": "D"}
    summary, per_item = score_scienceqa(predictions, records)
    assert [i["parsed_choice"] for i in per_item] == [1, 0, 1, -1]
    assert summary["accuracy"] == pytest.approx(50.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", "yes"),
        ("yes", "yes"),
        ("No, there is no dog.", "no"),
        ("No.", "no"),
        ("no", "no"),
        ("There is not a cat in the image.", "no"),
        ("Yes, there is a dog. No other animals.", "yes"),  # only the first sentence counts
        ("Not at all", "yes"),  # 'Not' is not one of the words LLaVA's script looks for
        ("Nothing", "yes"),
    ],
)
def test_parse_pope_answer(text, expected):
    assert parse_pope_answer(text) == expected


def test_score_pope():
    labels = {"random": ["yes", "yes", "yes", "no", "no"], "popular": ["yes", "no", "yes"]}
    answers = {
        "random": ["Yes.", "No, there is no dog.", "yes", "There is not a cat.", "Not at all"],
        "popular": ["yes", "no.", "Yes, there is a dog. No other animals."],
    }
    records, predictions = [], {}
    for split in labels:
        for i, (label, answer) in enumerate(zip(labels[split], answers[split], strict=True)):
            records.append({"question_id": f"{split}/{i}", "label": label, "category": split})
            predictions[f"{split}/{i}"] = answer
    summary, per_item = score_pope(predictions, records)
    # random: parsed yes, no, yes, no, yes -> TP=2 FN=1 TN=1 FP=1
    random = summary["splits"]["random"]
    assert (random["tp"], random["fn"], random["tn"], random["fp"]) == (2, 1, 1, 1)
    assert random["accuracy"] == pytest.approx(60.0)
    assert random["precision"] == pytest.approx(200 / 3)
    assert random["recall"] == pytest.approx(200 / 3)
    assert random["f1"] == pytest.approx(200 / 3)
    assert random["yes_ratio"] == pytest.approx(60.0)
    # popular: parsed yes, no, yes -> all right
    popular = summary["splits"]["popular"]
    assert popular["accuracy"] == popular["f1"] == pytest.approx(100.0)
    assert popular["yes_ratio"] == pytest.approx(200 / 3)
    assert summary["f1_mean"] == pytest.approx((200 / 3 + 100) / 2)
    assert summary["accuracy_mean"] == pytest.approx(80.0)
    assert [i["parsed"] for i in per_item] == ["yes", "no", "yes", "no", "yes", "yes", "no", "yes"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("yes, it is", "yes"),
        ("No, it is not", "no"),
        ("None", "no"),  # 'no' within the first 4 characters
        ("I think so", "other"),
        ("There is no cat", "other"),  # 'no' is past the first 4 characters
    ],
)
def test_parse_mme_answer(text, expected):
    assert parse_mme_answer(text) == expected


def _mme(category, image, number, answer):
    return {"question_id": f"{category}/{image}/{number}", "category": category,
            "image_key": image, "answer": answer}  # fmt: skip


def test_score_mme():
    records = [
        _mme("existence", "1", 0, "Yes"), _mme("existence", "1", 1, "No"),
        _mme("existence", "2", 0, "Yes"), _mme("existence", "2", 1, "No"),
        _mme("code_reasoning", "7", 0, "Yes"), _mme("code_reasoning", "7", 1, "No"),
    ]  # fmt: skip
    answers = ["Yes", "No", "yes, there is", "Yes", "I think so", "None"]
    predictions = {r["question_id"]: a for r, a in zip(records, answers, strict=True)}
    summary, per_item = score_mme(predictions, records)
    # existence: 3 of 4 questions right (75), 1 of 2 images fully right (50) -> 125
    assert summary["subtasks"]["existence"] == pytest.approx(
        {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "num_questions": 4}
    )
    # code_reasoning: "I think so" -> other (wrong), "None" -> no (right): 50 + 0
    assert summary["subtasks"]["code_reasoning"]["score"] == pytest.approx(50.0)
    assert summary["perception"] == pytest.approx(125.0)
    assert summary["cognition"] == pytest.approx(50.0)
    assert "count" in summary["missing_subtasks"] and "existence" not in summary["missing_subtasks"]
    assert [i["correct"] for i in per_item] == [True, True, True, False, False, True]


def test_score_mme_needs_question_pairs():
    records = [_mme("count", "1", 0, "Yes")]
    with pytest.raises(ValueError, match="has 1 questions; expected 2"):
        score_mme({"count/1/0": "yes"}, records)
