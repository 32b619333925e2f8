"""Benchmark scorers: pure functions from answers and annotations to scores.

Every scorer has the signature `score_x(predictions, records) -> (summary, per_item)`:
- `predictions`: question_id -> the model's answer text (as generated, stripped).
- `records`: the question records of `benchmarks.py` (each has `question_id` and the annotation
  fields the scorer reads, named as in the official files).
- `summary`: JSON-ready dict of headline numbers, in percent like the papers report them
  (unrounded; the official scripts print them rounded to 2 decimals).
- `per_item`: one JSON-ready dict per record, in record order.
Each follows the official scorer (or, where the LLaVA family wrote its own answer parsing, the
LLaVA script the MoE-LLaVA numbers come from); the differences are listed in the docstrings.
"""

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from moe_lvlm.evaluation.normalize import (
    normalize_evalai_answer,
    normalize_vqa_answer,
    process_punctuation,
    vqa_accuracy,
)

QuestionId = int | str
Predictions = Mapping[QuestionId, str]
Record = Mapping[str, Any]
ScoreResult = tuple[dict[str, Any], list[dict[str, Any]]]

MME_SUBTASKS: dict[str, tuple[str, ...]] = {
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                   "landmark", "artwork", "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation",
                  "code_reasoning"),
}  # fmt: skip
SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
POPE_SPLITS = ("random", "popular", "adversarial")


def _predictions_for(predictions: Predictions, records: Sequence[Record]) -> list[str]:
    """The prediction of every record, in order; a clear error if any is missing."""
    if not records:
        raise ValueError("no questions to score")
    missing = [r["question_id"] for r in records if r["question_id"] not in predictions]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(records)} questions have no answer (first: {missing[:3]}); "
            "finish generation (it resumes) before scoring"
        )
    return [predictions[r["question_id"]] for r in records]


def _percent(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values)


def _grouped_percent(keys: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for key, value in zip(keys, values, strict=True):
        groups[key].append(value)
    return {key: _percent(group) for key, group in sorted(groups.items())}


def score_vqav2(predictions: Predictions, records: Sequence[Record]) -> ScoreResult:
    """VQA accuracy as the VQA challenge scorer computes it.

    Records: `answers` (the 10 human answer strings), `answer_type`, `question_type`.
    The prediction is normalised in full; the human answers get only punctuation processing,
    and only when they are not all identical (the official scorer's behaviour).
    """
    scores, per_item = [], []
    for record, raw in zip(records, _predictions_for(predictions, records), strict=True):
        prediction = normalize_vqa_answer(raw)
        humans = [a.replace("\n", " ").replace("\t", " ").strip() for a in record["answers"]]
        if len(set(humans)) > 1:
            humans = [process_punctuation(a) for a in humans]
        score = vqa_accuracy(prediction, humans)
        scores.append(score)
        per_item.append({"question_id": record["question_id"], "prediction": raw,
                         "normalized": prediction, "answer_type": record["answer_type"],
                         "question_type": record["question_type"], "accuracy": score})  # fmt: skip
    summary = {
        "accuracy": _percent(scores),
        "accuracy_per_answer_type": _grouped_percent([r["answer_type"] for r in records], scores),
        "num_questions": len(records),
    }
    return summary, per_item


def score_textvqa(predictions: Predictions, records: Sequence[Record]) -> ScoreResult:
    """TextVQA accuracy (the EvalAI/m4c scorer that LLaVA's `eval_textvqa.py` uses).

    Records: `answers` (the 10 human answer strings). Prediction and human answers are both
    normalised with `normalize_evalai_answer`, then scored with `vqa_accuracy`.
    """
    scores, per_item = [], []
    for record, raw in zip(records, _predictions_for(predictions, records), strict=True):
        prediction = normalize_evalai_answer(raw)
        score = vqa_accuracy(prediction, [normalize_evalai_answer(a) for a in record["answers"]])
        scores.append(score)
        per_item.append({"question_id": record["question_id"], "prediction": raw,
                         "normalized": prediction, "accuracy": score})  # fmt: skip
    return {"accuracy": _percent(scores), "num_questions": len(records)}, per_item


def normalize_gqa_answer(text: str) -> str:
    """LLaVA's `convert_gqa_for_eval.py`: drop trailing periods and lower-case."""
    return text.strip().rstrip(".").lower()


def score_gqa(predictions: Predictions, records: Sequence[Record]) -> ScoreResult:
    """GQA accuracy: exact match with `answer`, as the official GQA `eval.py`.

    Records: `answer`, `structural` and `semantic` (the question's `types`). Binary questions are
    those whose structural type is not "query", as in the official script.
    """
    scores, per_item = [], []
    for record, raw in zip(records, _predictions_for(predictions, records), strict=True):
        prediction = normalize_gqa_answer(raw)
        score = float(prediction == record["answer"])
        scores.append(score)
        per_item.append({"question_id": record["question_id"], "prediction": raw,
                         "normalized": prediction, "answer": record["answer"],
                         "correct": bool(score)})  # fmt: skip
    kinds = ["open" if r["structural"] == "query" else "binary" for r in records]
    structural, semantic = [r["structural"] for r in records], [r["semantic"] for r in records]
    summary = {
        "accuracy": _percent(scores),
        "accuracy_per_kind": _grouped_percent(kinds, scores),
        "accuracy_per_structural_type": _grouped_percent(structural, scores),
        "accuracy_per_semantic_type": _grouped_percent(semantic, scores),
        "num_questions": len(records),
    }
    return summary, per_item


_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_scienceqa_choice(text: str, num_choices: int) -> int:
    """The option index in an answer, or -1, as LLaVA's `eval_science_qa.py` parses it.

    Accepted: the bare letter ("B"), a letter then ". " ("B. sample A"), or exactly one
    "The answer is X." in the text; letters past the number of choices count as wrong.
    """
    if text in SCIENCEQA_OPTIONS:
        letter = text
    elif len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _THE_ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else ""
    valid = SCIENCEQA_OPTIONS[:num_choices]
    return valid.index(letter) if letter in valid else -1


def score_scienceqa(predictions: Predictions, records: Sequence[Record]) -> ScoreResult:
    """ScienceQA multiple-choice accuracy (LLaVA's IMG-accuracy when the records are the test
    problems that have an image). Records: `choices` (option texts), `answer` (correct index)."""
    scores, per_item = [], []
    for record, raw in zip(records, _predictions_for(predictions, records), strict=True):
        choice = parse_scienceqa_choice(raw, len(record["choices"]))
        score = float(choice == record["answer"])
        scores.append(score)
        per_item.append({"question_id": record["question_id"], "prediction": raw,
                         "parsed_choice": choice, "answer": record["answer"],
                         "correct": bool(score)})  # fmt: skip
    return {"accuracy": _percent(scores), "num_questions": len(records)}, per_item


def parse_pope_answer(text: str) -> str:
    """'yes' or 'no' as LLaVA's `eval_pope.py` reads an answer: keep the text before the first
    period, drop commas, and answer 'no' if a space-separated word is 'No', 'no' or 'not'."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def _binary_metrics(predicted_yes: Sequence[bool], label_yes: Sequence[bool]) -> dict[str, Any]:
    pairs = list(zip(predicted_yes, label_yes, strict=True))
    tp = sum(p and y for p, y in pairs)
    fp = sum(p and not y for p, y in pairs)
    tn = sum(not p and not y for p, y in pairs)
    fn = sum(not p and y for p, y in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": 100.0 * (tp + tn) / len(pairs), "precision": 100.0 * precision,
            "recall": 100.0 * recall, "f1": 100.0 * f1,
            "yes_ratio": 100.0 * sum(predicted_yes) / len(pairs),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "num_questions": len(pairs)}  # fmt: skip


def score_pope(predictions: Predictions, records: Sequence[Record]) -> ScoreResult:
    """POPE accuracy, precision, recall, F1 and yes-ratio per split (as LLaVA's `eval_pope.py`,
    which prints them as fractions; here in percent), plus their means over the splits.

    Records: `label` ('yes'/'no'), `category` (the split: random, popular, adversarial).
    Precision, recall and F1 with a zero denominator are 0 (the LLaVA script divides by zero).
    """
    parsed = [parse_pope_answer(p) for p in _predictions_for(predictions, records)]
    per_item = [
        {"question_id": r["question_id"], "category": r["category"],
         "prediction": predictions[r["question_id"]], "parsed": answer, "label": r["label"],
         "correct": answer == r["label"]}
        for r, answer in zip(records, parsed, strict=True)
    ]  # fmt: skip
    by_split: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in per_item:
        by_split[item["category"]].append(item)
    splits = {
        name: _binary_metrics([i["parsed"] == "yes" for i in items],
                              [i["label"] == "yes" for i in items])
        for name, items in sorted(by_split.items())
    }  # fmt: skip
    summary: dict[str, Any] = {
        f"{metric}_mean": sum(s[metric] for s in splits.values()) / len(splits)
        for metric in ("accuracy", "precision", "recall", "f1", "yes_ratio")
    }
    summary.update(splits=splits, num_questions=len(records))
    return summary, per_item


def parse_mme_answer(text: str) -> str:
    """'yes', 'no' or 'other' as the official MME `calculation.py` reads an answer: the whole
    answer if it is yes/no, else 'yes' or 'no' found in its first 4 characters (lower-cased)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def score_mme(predictions: Predictions, records: Sequence[Record]) -> ScoreResult:
    """MME scores as the official `calculation.py`: per subtask, acc (per question) and acc+
    (per image, both of its two questions right), score = 100 * (acc + acc+); perception and
    cognition are the sums over their subtasks (maxima 2000 and 800).

    Records: `category` (subtask), `image_key` (pairs the two questions of one image),
    `answer` ('Yes'/'No'). Subtasks absent from the records are listed in `missing_subtasks`.
    """
    known = {t for tasks in MME_SUBTASKS.values() for t in tasks}
    unknown = sorted({r["category"] for r in records} - known)
    if unknown:
        raise ValueError(f"unknown MME subtasks {unknown}; expected {MME_SUBTASKS}")
    parsed = [parse_mme_answer(p) for p in _predictions_for(predictions, records)]
    per_item = []
    by_image: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for record, answer in zip(records, parsed, strict=True):
        correct = answer == record["answer"].lower()
        per_item.append({"question_id": record["question_id"], "category": record["category"],
                         "prediction": predictions[record["question_id"]], "parsed": answer,
                         "answer": record["answer"], "correct": correct})  # fmt: skip
        by_image[(record["category"], record["image_key"])].append(correct)
    for (category, image_key), results in by_image.items():
        if len(results) != 2:
            raise ValueError(
                f"MME {category} image {image_key} has {len(results)} questions; expected 2"
            )
    subtasks: dict[str, dict[str, float]] = {}
    for category in sorted({r["category"] for r in records}):
        questions = [i["correct"] for i in per_item if i["category"] == category]
        images = [all(v) for (c, _), v in by_image.items() if c == category]
        acc, acc_plus = _percent(questions), _percent(images)
        subtasks[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
                              "num_questions": len(questions)}  # fmt: skip
    summary: dict[str, Any] = {
        kind: sum(subtasks[t]["score"] for t in tasks if t in subtasks)
        for kind, tasks in MME_SUBTASKS.items()
    }
    summary.update(
        subtasks=subtasks,
        missing_subtasks=[t for ts in MME_SUBTASKS.values() for t in ts if t not in subtasks],
        num_questions=len(records),
    )
    return summary, per_item


def score_short_answers(predictions: Predictions, records: Sequence[Record]) -> ScoreResult:
    """Held-out short-answer questions (the built-in `test` split, or any split whose records
    carry `answer` and `question_type`): exact match after normalising both sides with
    `normalize_vqa_answer` ("Two." = "2", "the red" = "red"), overall and per question type;
    over the questions whose reference is yes or no, POPE accuracy, precision, recall, F1 and
    yes-ratio with answers read as `parse_pope_answer` reads them ("No, there is not." = no).
    """
    per_item = []
    for record, raw in zip(records, _predictions_for(predictions, records), strict=True):
        prediction, reference = normalize_vqa_answer(raw), normalize_vqa_answer(record["answer"])
        item = {"question_id": record["question_id"], "question_type": record["question_type"],
                "answer": record["answer"], "prediction": raw, "normalized": prediction,
                "correct": prediction == reference}  # fmt: skip
        if reference in ("yes", "no"):
            item["parsed"] = parse_pope_answer(raw)
        per_item.append(item)
    scores = [float(i["correct"]) for i in per_item]
    summary: dict[str, Any] = {
        "exact_match": _percent(scores),
        "exact_match_per_type": _grouped_percent([i["question_type"] for i in per_item], scores),
    }
    yes_no = [i for i in per_item if "parsed" in i]
    if yes_no:
        summary["pope"] = _binary_metrics([i["parsed"] == "yes" for i in yes_no],
                                          [normalize_vqa_answer(i["answer"]) == "yes"
                                           for i in yes_no])  # fmt: skip
    summary["num_questions"] = len(records)
    return summary, per_item
