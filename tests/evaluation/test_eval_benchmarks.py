"""Benchmark readers on fixtures written in the official layouts, and run_benchmark end to end
with a fake answer_fn (resume after a kill, sharding over two processes)."""

import json
import threading

import pytest
from PIL import Image

from moe_lvlm.evaluation.benchmarks import (
    MULTIPLE_CHOICE_PROMPT,
    SHORT_ANSWER_PROMPT,
    get_benchmark,
    llava_textvqa_question,
    load_gqa,
    load_mme,
    load_pope,
    load_scienceqa_img,
    load_textvqa,
    load_vqav2,
)
from moe_lvlm.evaluation.runner import run_benchmark


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path)


def _json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _by_id(answers):
    """A fake model: answers looked up by question id; records every batch it gets."""
    batches = []

    def answer_fn(batch):
        batches.append([r["question_id"] for r in batch])
        return [" " + answers[r["question_id"]] + "\n" for r in batch]

    return answer_fn, batches


def _vqav2_dir(root):
    _json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": [
        {"image_id": 9, "question": "How many dogs?", "question_id": 90},
        {"image_id": 1234, "question": "What animal?", "question_id": 91},
    ]})  # fmt: skip

    def annotation(qid, image_id, answers, answer_type):
        return {"question_id": qid, "image_id": image_id, "question_type": "what",
                "answer_type": answer_type, "multiple_choice_answer": answers[0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(answers)]}  # fmt: skip

    _json(root / "v2_mscoco_val2014_annotations.json", {"annotations": [
        annotation(90, 9, ["2"] * 2 + ["3"] * 8, "number"),
        annotation(91, 1234, ["dog"] * 3 + ["cat"] * 7, "other"),
    ]})  # fmt: skip
    _image(root / "val2014" / "COCO_val2014_000000000009.jpg")
    _image(root / "val2014" / "COCO_val2014_000000001234.jpg")


def test_vqav2(tmp_path):
    _vqav2_dir(tmp_path / "data")
    records = load_vqav2(tmp_path / "data")
    assert records[0]["prompt"] == f"How many dogs?\n{SHORT_ANSWER_PROMPT}"
    assert records[1]["image"].endswith("val2014/COCO_val2014_000000001234.jpg")
    answer_fn, _ = _by_id({90: "Two.", 91: "a dog"})
    summary = run_benchmark("vqav2", tmp_path / "data", answer_fn, tmp_path / "out", 8)
    assert summary["accuracy"] == pytest.approx(100 * (0.6 + 0.9) / 2)
    assert summary["benchmark"] == "vqav2" and summary["num_questions"] == 2


def test_gqa(tmp_path):
    root = tmp_path / "data"
    _json(root / "testdev_balanced_questions.json", {
        "201": {"imageId": "n1", "question": "Is it red?", "answer": "yes", "isBalanced": True,
                "types": {"structural": "verify", "semantic": "attr", "detailed": "x"}},
        "202": {"imageId": "n2", "question": "What is it?", "answer": "cup", "isBalanced": True,
                "types": {"structural": "query", "semantic": "obj", "detailed": "x"}},
        "203": {"imageId": "n2", "question": "Unbalanced?", "answer": "no", "isBalanced": False,
                "types": {"structural": "verify", "semantic": "attr", "detailed": "x"}},
    })  # fmt: skip
    _image(root / "images" / "n1.jpg")
    _image(root / "images" / "n2.jpg")
    records = load_gqa(root)
    assert [r["question_id"] for r in records] == ["201", "202"]  # unbalanced ones are left out
    answer_fn, _ = _by_id({"201": "Yes.", "202": "mug"})
    summary = run_benchmark("gqa", root, answer_fn, tmp_path / "out", 8)
    assert summary["accuracy"] == pytest.approx(50.0)


def test_textvqa_uses_llava_ocr_prompts_when_present(tmp_path):
    """LLaVA's llava_textvqa_val_v051_ocr.jsonl keys its rows by the TextVQA *image id* in
    `question_id` (several questions share an image); the question is the prompt's first line."""
    root = tmp_path / "data"
    _json(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "What brand?",
         "answers": ["Coca-Cola"] * 2 + ["coca cola"] + ["pepsi"] * 7},
        {"question_id": 34603, "image_id": "003a8ae2ef43b901", "question": "what color is it?",
         "answers": ["red"] * 10},
    ]})  # fmt: skip
    _image(root / "train_images" / "003a8ae2ef43b901.jpg")
    assert load_textvqa(root)[0]["prompt"] == f"What brand?\n{SHORT_ANSWER_PROMPT}"
    brand = f"what brand?\nReference OCR token: coca, cola\n{SHORT_ANSWER_PROMPT}"
    color = f"what color is it?\nReference OCR token: coca, cola\n{SHORT_ANSWER_PROMPT}"
    _jsonl(root / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg", "text": color,
         "category": "default"},
        {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg", "text": brand,
         "category": "default"},
    ])  # fmt: skip
    assert [r["prompt"] for r in load_textvqa(root)] == [brand, color]
    answer_fn, _ = _by_id({34602: "Coca Cola", 34603: "red"})
    summary = run_benchmark("textvqa", root, answer_fn, tmp_path / "out", 8)
    assert summary["accuracy"] == pytest.approx(95.0)


def test_textvqa_llava_prompt_missing_names_image_and_question(tmp_path):
    root = tmp_path / "data"
    _json(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "abc", "question": "what brand?", "answers": ["x"]},
    ]})  # fmt: skip
    _image(root / "train_images" / "abc.jpg")
    _jsonl(root / "llava_textvqa_val_v051_ocr.jsonl",
           [{"question_id": "abd", "image": "abd.jpg", "text": "what brand?\nAnswer."}])
    with pytest.raises(ValueError, match="no prompt for image abc and question 'what brand\\?'"):
        load_textvqa(root)


@pytest.mark.parametrize("text, question", [
    ("What Is It?\nReference OCR token: a, b\nAnswer briefly.", "what is it?"),
    ("Reference OCR token: a, b\nWhat is it?\nAnswer briefly.", "what is it?"),
    ("What is it?\nAnswer briefly.", "what is it?"),
    ("OCR tokens: a b Question: What is it? Short answer:", "what is it?"),
])  # fmt: skip
def test_llava_textvqa_question(text, question):
    assert llava_textvqa_question(text) == question


def test_scienceqa_img(tmp_path):
    root = tmp_path / "data"
    problem = {"question": "Which is a solid?", "choices": ["milk", "rock", "juice"],
               "answer": 1, "hint": "", "image": "image.png", "split": "test"}  # fmt: skip
    _json(root / "problems.json", {
        "11": problem,
        "12": {**problem, "hint": "Look closely.", "answer": 2},
        "13": {**problem, "image": None},  # no image: not part of SQA-IMG
        "14": problem,  # train split
    })  # fmt: skip
    _json(root / "pid_splits.json", {"test": ["11", "12", "13"], "train": ["14"]})
    _image(root / "images" / "test" / "11" / "image.png")
    _image(root / "images" / "test" / "12" / "image.png")
    records = load_scienceqa_img(root)
    assert [r["question_id"] for r in records] == ["11", "12"]
    assert records[0]["prompt"] == (
        f"Which is a solid?\nA. milk\nB. rock\nC. juice\n{MULTIPLE_CHOICE_PROMPT}"
    )
    assert records[1]["prompt"].startswith("Context: Look closely.\nWhich is a solid?\n")
    _json(root / "llava_test_CQM-A.json", [
        {"id": pid, "image": f"{pid}/image.png",
         "conversations": [{"from": "human", "value": f"<image>\nLLaVA text {pid}"},
                           {"from": "gpt", "value": "B"}]}
        for pid in ("11", "12", "13")
    ])  # fmt: skip
    assert load_scienceqa_img(root)[0]["prompt"] == f"LLaVA text 11\n{MULTIPLE_CHOICE_PROMPT}"
    answer_fn, _ = _by_id({"11": "B", "12": "The answer is A."})
    summary = run_benchmark("scienceqa_img", root, answer_fn, tmp_path / "out", 8)
    assert summary["accuracy"] == pytest.approx(50.0)


def _pope_dir(root, labels):
    for split, split_labels in labels.items():
        _jsonl(root / "coco" / f"coco_pope_{split}.json", [
            {"question_id": i + 1, "image": f"COCO_val2014_{i:012d}.jpg",
             "text": f"Is there a thing {i} in the image?", "label": label}
            for i, label in enumerate(split_labels)
        ])  # fmt: skip
        for i in range(len(split_labels)):
            if not (root / "val2014" / f"COCO_val2014_{i:012d}.jpg").exists():
                _image(root / "val2014" / f"COCO_val2014_{i:012d}.jpg")


POPE_LABELS = {"random": ["yes", "no", "yes", "no"], "adversarial": ["yes", "no", "no"]}
POPE_ANSWERS = {
    "random/1": "Yes.", "random/2": "No, there is no dog.", "random/3": "No.",
    "random/4": "yes", "adversarial/1": "Yes, there is.", "adversarial/2": "There is not.",
    "adversarial/3": "no",
}  # fmt: skip


def test_pope_records(tmp_path):
    _pope_dir(tmp_path, POPE_LABELS)
    records = load_pope(tmp_path)
    assert [r["question_id"] for r in records][:2] == ["random/1", "random/2"]
    assert records[-1] == {
        "question_id": "adversarial/3",
        "image": str(tmp_path / "val2014" / "COCO_val2014_000000000002.jpg"),
        "prompt": f"Is there a thing 2 in the image?\n{SHORT_ANSWER_PROMPT}",
        "label": "no", "category": "adversarial",
    }  # fmt: skip


def test_run_benchmark_resumes_after_a_kill(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    _pope_dir(data, POPE_LABELS)
    calls = []

    def dies_after_first_batch(batch):
        if calls:
            raise KeyboardInterrupt  # the job is killed during the second batch
        calls.append(batch)
        return [POPE_ANSWERS[r["question_id"]] for r in batch]

    with pytest.raises(KeyboardInterrupt):
        run_benchmark("pope", data, dies_after_first_batch, out, batch_size=3)
    with (out / "answers.jsonl").open("a") as f:
        f.write('{"question_id": "random/4", "pro')  # and a half-written line is left behind
    answer_fn, batches = _by_id(POPE_ANSWERS)
    summary = run_benchmark("pope", data, answer_fn, out, batch_size=3)
    assert batches == [["random/4", "adversarial/1", "adversarial/2"], ["adversarial/3"]]
    # random: parsed yes, no, no, yes vs yes, no, yes, no -> TP=1 TN=1 FN=1 FP=1
    assert summary["splits"]["random"]["accuracy"] == pytest.approx(50.0)
    assert summary["splits"]["random"]["f1"] == pytest.approx(50.0)
    # adversarial: yes, no, no all right
    assert summary["splits"]["adversarial"]["f1"] == pytest.approx(100.0)
    assert summary["splits"]["adversarial"]["yes_ratio"] == pytest.approx(100 / 3)
    assert summary["accuracy_mean"] == pytest.approx(75.0)
    per_item = [json.loads(line) for line in (out / "per_item.jsonl").read_text().splitlines()]
    assert len(per_item) == summary["num_questions"] == 7
    for split, metrics in summary["splits"].items():
        correct = [i["correct"] for i in per_item if i["category"] == split]
        assert 100 * sum(correct) / len(correct) == pytest.approx(metrics["accuracy"])
    # A third run has nothing left to answer and gives the same summary.
    answer_fn, batches = _by_id(POPE_ANSWERS)
    assert run_benchmark("pope", data, answer_fn, out, batch_size=3) == summary
    assert batches == []


def test_run_benchmark_over_two_processes(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    _pope_dir(data, POPE_LABELS)
    barrier = threading.Barrier(2, timeout=30)
    results, batches = {}, {}

    def process(index):
        answer_fn, batches[index] = _by_id(POPE_ANSWERS)
        results[index] = run_benchmark("pope", data, answer_fn, out, batch_size=2,
                                       process_index=index, process_count=2,
                                       barrier=barrier.wait)  # fmt: skip

    threads = [threading.Thread(target=process, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [f"random/{i}" for i in range(1, 5)] + [f"adversarial/{i}" for i in range(1, 4)]
    assert sum(batches[0], []) == ids[0::2] and sum(batches[1], []) == ids[1::2]
    assert (out / "answers.0.jsonl").exists() and (out / "answers.1.jsonl").exists()
    assert results[0] == results[1]
    assert results[0]["accuracy_mean"] == pytest.approx(75.0)


def test_run_benchmark_errors(tmp_path):
    data = tmp_path / "data"
    _pope_dir(data, {"random": ["yes", "no"]})
    answer_fn, _ = _by_id(POPE_ANSWERS)
    with pytest.raises(ValueError, match="needs a barrier"):
        run_benchmark("pope", data, answer_fn, tmp_path / "out", 2, 0, 2)
    with pytest.raises(ValueError, match="unknown benchmark 'mmvet'"):
        get_benchmark("mmvet")
    _jsonl(tmp_path / "stale" / "answers.jsonl", [{"question_id": 5, "answer": "x"}])
    with pytest.raises(ValueError, match="1 answers to questions not in pope"):
        run_benchmark("pope", data, answer_fn, tmp_path / "stale", 2)
    (data / "val2014" / "COCO_val2014_000000000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 2 images are missing"):
        load_pope(data)


def _mme_dir(root):
    # 'existence': images and txt files side by side; 'artwork': images/ + questions_answers_YN/
    _image(root / "existence" / "000.png")
    (root / "existence" / "000.txt").write_text(
        "Is there a car in this image? Please answer yes or no.\tYes\n"
        "Is there a bus in this image? Please answer yes or no.\tNo\n"
    )
    _image(root / "artwork" / "images" / "10.jpg")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10.txt").write_text(
        "Is this artwork by Monet? Please answer yes or no.\tYes\n"
        "Is this artwork by Dali? Please answer yes or no.\tNo\n"
    )


def test_mme(tmp_path):
    _mme_dir(tmp_path)
    records = load_mme(tmp_path)
    assert [r["question_id"] for r in records] == [
        "existence/000/0", "existence/000/1", "artwork/10/0", "artwork/10/1"]
    assert records[2]["image"] == str(tmp_path / "artwork" / "images" / "10.jpg")
    assert records[0]["prompt"] == (
        f"Is there a car in this image? Please answer yes or no.\n{SHORT_ANSWER_PROMPT}"
    )
    answer_fn, _ = _by_id({"existence/000/0": "Yes", "existence/000/1": "No",
                           "artwork/10/0": "Yes", "artwork/10/1": "Yes"})  # fmt: skip
    summary = run_benchmark("mme", tmp_path, answer_fn, tmp_path / "out", 4)
    # existence 100 + 100; artwork 50 + 0 -> perception 250; no cognition subtask present
    assert summary["perception"] == pytest.approx(250.0)
    assert summary["cognition"] == 0
    assert summary["subtasks"]["artwork"]["acc_plus"] == 0


def test_mme_bad_line_names_the_file(tmp_path):
    _mme_dir(tmp_path)
    (tmp_path / "existence" / "000.txt").write_text("Is there a car?\tMaybe\n")
    with pytest.raises(ValueError, match=r"000.txt:1: expected 'question<TAB>Yes\|No'"):
        load_mme(tmp_path)
