"""`python -m moe_lvlm.evaluate`: scoring plumbing against hand-computed numbers (a fake model),
then the CLI on a tiny workdir for a held-out split and for a fixture POPE benchmark."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from moe_lvlm import evaluate
from moe_lvlm.evaluation.benchmarks import SHORT_ANSWER_PROMPT
from tests.generate.tiny_workdir import make_workdir

ROOT = Path(__file__).resolve().parents[2]


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# (question_type, reference answer, model answer): exact match after normalisation, and POPE
# over the questions whose reference is yes/no ("No, there is not." reads as no).
CASES = [
    ("count", "2", "two"),                     # right: number word -> digit
    ("color", "red", "Red."),                  # right: case and trailing period
    ("position", "top left", "the top left"),  # right: article dropped
    ("digit", "7", "1"),                       # wrong
    ("yes_no", "yes", "Yes"),                  # right; TP
    ("yes_no", "no", "No, there is not."),     # wrong as exact match; TN
    ("yes_no", "no", "yes"),                   # wrong; FP
    ("yes_no", "yes", "no"),                   # wrong; FN
    ("yes_no", "yes", "Yes, there is a 3."),   # wrong as exact match; TP
]  # fmt: skip


def test_evaluate_split_scores_hand_computed(tmp_path):
    records = [{"question_id": f"q{i}", "prompt": f"question {i}", "question_type": kind,
                "answer": answer} for i, (kind, answer, _) in enumerate(CASES)]  # fmt: skip
    model_answers = {f"q{i}": said for i, (_, _, said) in enumerate(CASES)}
    batches = []

    def fake_model(batch):
        batches.append(len(batch))
        return [model_answers[r["question_id"]] for r in batch]

    summary = evaluate.evaluate_split(records, fake_model, tmp_path, batch_size=4)
    assert batches == [4, 4, 1]
    assert summary["num_questions"] == 9
    assert summary["exact_match"] == pytest.approx(100 * 4 / 9)
    assert summary["exact_match_per_type"] == pytest.approx(
        {"count": 100.0, "color": 100.0, "position": 100.0, "digit": 0.0, "yes_no": 20.0}
    )
    pope = summary["pope"]
    assert (pope["tp"], pope["tn"], pope["fp"], pope["fn"]) == (2, 1, 1, 1)
    assert pope["accuracy"] == pytest.approx(60.0)
    assert pope["precision"] == pytest.approx(200 / 3)
    assert pope["recall"] == pytest.approx(200 / 3)
    assert pope["f1"] == pytest.approx(200 / 3)
    assert pope["yes_ratio"] == pytest.approx(60.0)
    assert pope["num_questions"] == 5
    answers = _jsonl(tmp_path / "answers.jsonl")
    assert [(a["question_id"], a["prompt"], a["answer"]) for a in answers] == [
        (f"q{i}", f"question {i}", said) for i, (_, _, said) in enumerate(CASES)
    ]
    per_item = _jsonl(tmp_path / "per_item.jsonl")
    assert [p["correct"] for p in per_item] == [True, True, True] + [False, True] + [False] * 4

    # Run again: everything is answered already, so the model is not asked and scores agree.
    def no_model(batch):
        raise AssertionError("answers should have been reused")

    assert evaluate.evaluate_split(records[:5], no_model, tmp_path, batch_size=4) == {
        "exact_match": 80.0,
        "exact_match_per_type": {"color": 100.0, "count": 100.0, "digit": 0.0,
                                 "position": 100.0, "yes_no": 100.0},
        "pope": {"accuracy": 100.0, "precision": 100.0, "recall": 100.0, "f1": 100.0,
                 "yes_ratio": 100.0, "tp": 1, "fp": 0, "tn": 0, "fn": 0, "num_questions": 1},
        "num_questions": 5,
    }  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("evaluate_cli"))


def _image(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 12), color).save(path)


def _llava_split(root):
    """A held-out split in LLaVA JSONL form with `answer` and `question_type`: two bad records
    first (a missing image, no reference answer), then five good ones."""
    rows = [{"id": "missing", "image": "gone.png", "answer": "1", "question_type": "count",
             "question": "How many digits are in the image?"},
            {"id": "no-answer", "image": "a.png", "answer": "", "question_type": "caption",
             "question": "Describe the image."}]  # fmt: skip
    for i, (kind, answer, question) in enumerate([
        ("count", "2", "How many digits are in the image?"),
        ("color", "red", "What color is the 3?"),
        ("yes_no", "yes", "Is there a 5 in the image?"),
        ("yes_no", "no", "Is there a 7 in the image?"),
        ("position", "top left", "Where is the 3?"),
    ]):
        rows.append({"id": f"t{i}", "image": "a.png", "answer": answer, "question_type": kind,
                     "question": question})
    _image(root / "a.png", (200, 30, 30))
    lines = []
    for row in rows:
        question = f"<image>\n{row.pop('question')} {SHORT_ANSWER_PROMPT}"
        row["conversations"] = [{"from": "human", "value": question},
                                {"from": "gpt", "value": row["answer"] or "A red digit."}]
        lines.append(json.dumps(row))
    (root / "test.jsonl").write_text("\n".join(lines) + "\n")
    return f"llava:{root / 'test.jsonl'}?image_root={root}"


def test_evaluate_cli_split(workdir, tmp_path, capsys, caplog):
    split = _llava_split(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        summary = evaluate.main(["--workdir", str(workdir), f"--split={split}", "--limit=4",
                                 "--batch_size=3", "--max_new_tokens=4"])
    # Loading the checkpoint logs no warning (orbax's "Metadata file does not exist" had been).
    assert not [r.getMessage() for r in caplog.records if "checkpoint" in r.pathname], caplog.text
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == summary
    assert summary["stage"] == "stage3" and summary["step"] == 7
    assert summary["skipped"] == {"missing_image": 1, "no_answer": 1}
    assert summary["num_questions"] == 4
    out_dir = Path(summary["out_dir"])
    assert out_dir.parent.parent == workdir / "eval" and out_dir.name == "stage3_7"
    per_item = _jsonl(out_dir / "per_item.jsonl")
    assert [p["question_id"] for p in per_item] == ["t0", "t1", "t2", "t3"]
    answers = {a["question_id"]: a["answer"] for a in _jsonl(out_dir / "answers.jsonl")}
    assert {p["question_id"]: p["prediction"] for p in per_item} == answers
    assert summary["exact_match"] == pytest.approx(
        100 * sum(p["correct"] for p in per_item) / 4)
    yes_no = [p for p in per_item if p["question_type"] == "yes_no"]
    assert summary["pope"]["num_questions"] == len(yes_no) == 2
    assert summary["pope"]["yes_ratio"] == pytest.approx(
        100 * sum(p["parsed"] == "yes" for p in yes_no) / 2)


def _pope_dir(root):
    """POPE in its published layout: two split files (JSON lines) and COCO images."""
    rows = {"random": [(1, "a.jpg", "yes"), (2, "b.jpg", "no"), (3, "a.jpg", "no")],
            "adversarial": [(1, "b.jpg", "yes"), (2, "a.jpg", "yes"), (3, "b.jpg", "no")]}
    for split, items in rows.items():
        path = root / "coco" / f"coco_pope_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"question_id": q, "image": image, "label": label,
                                            "text": f"Is there a dog in the image? ({q})"}) + "\n"
                                for q, image, label in items))  # fmt: skip
    _image(root / "val2014" / "a.jpg", (10, 200, 10))
    _image(root / "val2014" / "b.jpg", (10, 10, 200))


def test_evaluate_cli_benchmark_subprocess(workdir, tmp_path):
    _pope_dir(tmp_path / "pope")
    result = subprocess.run(
        [sys.executable, "-m", "moe_lvlm.evaluate", f"--workdir={workdir}", "--benchmark=pope",
         f"--data={tmp_path / 'pope'}", f"--out_dir={tmp_path / 'out'}", "--batch_size=4",
         "--max_new_tokens=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    summary = json.loads(lines[0])
    assert summary["benchmark"] == "pope" and summary["num_questions"] == 6
    assert (summary["stage"], summary["step"]) == ("stage3", 7)
    answers = _jsonl(tmp_path / "out" / "answers.jsonl")
    assert len(answers) == 6
    assert all(a["prompt"].endswith(f")\n{SHORT_ANSWER_PROMPT}") for a in answers)
    per_item = _jsonl(tmp_path / "out" / "per_item.jsonl")
    assert {p["question_id"]: p["prediction"] for p in per_item} == {
        a["question_id"]: a["answer"] for a in answers}
    for split in ("random", "adversarial"):
        items = [p for p in per_item if p["category"] == split]
        said_yes = [p["parsed"] == "yes" for p in items]
        right = [p["parsed"] == p["label"] for p in items]
        got = summary["splits"][split]
        assert got["accuracy"] == pytest.approx(100 * sum(right) / 3)
        assert got["yes_ratio"] == pytest.approx(100 * sum(said_yes) / 3)
        tp = sum(y and p["label"] == "yes" for y, p in zip(said_yes, items, strict=True))
        assert got["tp"] == tp
    assert summary["accuracy_mean"] == pytest.approx(
        (summary["splits"]["random"]["accuracy"] + summary["splits"]["adversarial"]["accuracy"])
        / 2)
