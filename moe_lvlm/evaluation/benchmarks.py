"""Readers for each benchmark's published files, yielding uniform question records.

A record is a JSON-ready dict: `question_id` (int or str, unique in the benchmark), `image`
(absolute path), `prompt` (the question with the LLaVA-1.5 evaluation suffix, without the
`<image>` placeholder: the generator puts it first, as LLaVA does) and the annotation fields
its scorer reads. The on-disk layouts are documented in docs/evaluation.md.
"""

import dataclasses
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe_lvlm.evaluation import scorers

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."

Record = dict[str, Any]
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".JPG", ".PNG", ".JPEG")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; see docs/evaluation.md for the layout")
    with path.open(encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; see docs/evaluation.md for the layout")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e})") from e
    return rows


def _require(row: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")


def _check_images(records: list[Record], name: str) -> list[Record]:
    missing = [r["image"] for r in records if not os.path.isfile(r["image"])]
    if missing:
        raise FileNotFoundError(
            f"{name}: {len(missing)} of {len(records)} images are missing (first: {missing[:3]})"
        )
    return records


def _short_answer(question: str) -> str:
    return f"{question}\n{SHORT_ANSWER_PROMPT}"


def load_vqav2(data_dir: str | os.PathLike) -> list[Record]:
    """VQAv2 val: `v2_OpenEnded_mscoco_val2014_questions.json`,
    `v2_mscoco_val2014_annotations.json` and `val2014/COCO_val2014_<12-digit id>.jpg`."""
    root = Path(data_dir)
    questions_path = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    annotations_path = root / "v2_mscoco_val2014_annotations.json"
    questions = _read_json(questions_path)["questions"]
    annotations = {a["question_id"]: a for a in _read_json(annotations_path)["annotations"]}
    records = []
    for q in questions:
        _require(q, ("question_id", "image_id", "question"), f"{questions_path}")
        a = annotations.get(q["question_id"])
        if a is None:
            raise ValueError(f"{annotations_path}: no annotation for question {q['question_id']}")
        records.append({
            "question_id": q["question_id"],
            "image": str(root / "val2014" / f"COCO_val2014_{q['image_id']:012d}.jpg"),
            "prompt": _short_answer(q["question"]),
            "answers": [x["answer"] for x in a["answers"]],
            "answer_type": a["answer_type"],
            "question_type": a["question_type"],
        })  # fmt: skip
    return _check_images(records, "vqav2")


def load_gqa(data_dir: str | os.PathLike) -> list[Record]:
    """GQA test-dev balanced: `testdev_balanced_questions.json` and `images/<imageId>.jpg`."""
    root = Path(data_dir)
    path = root / "testdev_balanced_questions.json"
    records = []
    for question_id, q in _read_json(path).items():
        _require(q, ("imageId", "question", "answer", "types"), f"{path} question {question_id}")
        if not q.get("isBalanced", True):
            continue
        records.append({
            "question_id": question_id,
            "image": str(root / "images" / f"{q['imageId']}.jpg"),
            "prompt": _short_answer(q["question"]),
            "answer": q["answer"],
            "structural": q["types"]["structural"],
            "semantic": q["types"]["semantic"],
        })  # fmt: skip
    return _check_images(records, "gqa")


def llava_textvqa_question(text: str) -> str:
    """The question inside a LLaVA TextVQA prompt, lower-cased (MoE-LLaVA's eval_textvqa.py
    prompt_processor): '{question}\nReference OCR token: ...\n{suffix}' (or the OCR line first),
    'OCR tokens: ... Question: {question} Short answer:', or '{question}\n{suffix}'."""
    lines = text.split("\n")
    if text.startswith("OCR tokens: "):
        question = re.search(r"Question: (.*) Short answer:", text, re.DOTALL)
        return (question.group(1) if question else text).strip().lower()
    if "Reference OCR token: " in text and len(lines) == 3:
        return (lines[1] if text.startswith("Reference OCR token:") else lines[0]).lower()
    return lines[0].lower()


def _llava_textvqa_prompts(path: Path) -> dict[tuple[str, str], str]:
    """(image id, lower-cased question) -> prompt of LLaVA's `llava_textvqa_val_v051_ocr.jsonl`,
    whose `question_id` field holds the TextVQA *image id* (not the question id)."""
    prompts = {}
    for number, row in enumerate(_read_jsonl(path), start=1):
        _require(row, ("question_id", "text"), f"{path}:{number}")
        prompts[str(row["question_id"]), llava_textvqa_question(row["text"])] = row["text"]
    return prompts


def load_textvqa(data_dir: str | os.PathLike) -> list[Record]:
    """TextVQA val: `TextVQA_0.5.1_val.json` and `train_images/<image_id>.jpg` (the val images
    ship in the train_val zip). With LLaVA's `llava_textvqa_val_v051_ocr.jsonl` beside them, its
    prompts (question + OCR tokens + suffix, what LLaVA-1.5 reports) are used instead, matched on
    (image id, lower-cased question) as MoE-LLaVA's eval_textvqa.py matches them."""
    root = Path(data_dir)
    path = root / "TextVQA_0.5.1_val.json"
    llava_path = root / "llava_textvqa_val_v051_ocr.jsonl"
    llava_prompts = _llava_textvqa_prompts(llava_path) if llava_path.is_file() else None
    records = []
    for q in _read_json(path)["data"]:
        _require(q, ("question_id", "image_id", "question", "answers"), f"{path}")
        key = (str(q["image_id"]), q["question"].lower())
        if llava_prompts is None:
            prompt = _short_answer(q["question"])
        elif key in llava_prompts:
            prompt = llava_prompts[key]
        else:
            raise ValueError(
                f"{llava_path}: no prompt for image {key[0]} and question {q['question']!r} "
                f"(question {q['question_id']} of {path.name})"
            )
        records.append({
            "question_id": q["question_id"],
            "image": str(root / "train_images" / f"{q['image_id']}.jpg"),
            "prompt": prompt,
            "answers": q["answers"],
        })  # fmt: skip
    return _check_images(records, "textvqa")


def scienceqa_prompt(problem: dict[str, Any]) -> str:
    """The LLaVA-1.5 ScienceQA prompt: context (the hint, when there is one), question, lettered
    options, multiple-choice suffix."""
    lines = [f"Context: {problem['hint']}"] if problem["hint"].strip() else []
    lines.append(problem["question"])
    lines += [f"{letter}. {choice}" for letter, choice in
              zip(scorers.SCIENCEQA_OPTIONS, problem["choices"], strict=False)]  # fmt: skip
    lines.append(MULTIPLE_CHOICE_PROMPT)
    return "\n".join(lines)


def load_scienceqa_img(data_dir: str | os.PathLike) -> list[Record]:
    """ScienceQA-IMG: the test problems with an image. `problems.json`, `pid_splits.json` and
    `images/test/<pid>/image.png`. With LLaVA's `llava_test_CQM-A.json` beside them, its question
    texts are used (plus the multiple-choice suffix, as LLaVA's `--single-pred-prompt`)."""
    root = Path(data_dir)
    problems_path = root / "problems.json"
    problems = _read_json(problems_path)
    llava_path = root / "llava_test_CQM-A.json"
    llava_questions = (
        {row["id"]: row["conversations"][0]["value"] for row in _read_json(llava_path)}
        if llava_path.is_file() else None
    )  # fmt: skip
    records = []
    for pid in _read_json(root / "pid_splits.json")["test"]:
        if pid not in problems:
            raise ValueError(f"{problems_path}: no problem {pid!r} (listed in pid_splits.json)")
        problem, where = problems[pid], f"{problems_path} problem {pid}"
        _require(problem, ("question", "choices", "answer", "hint", "image"), where)
        if not problem["image"]:
            continue
        if not 0 <= problem["answer"] < len(problem["choices"]) <= len(scorers.SCIENCEQA_OPTIONS):
            raise ValueError(f"{where}: needs 1-5 choices and a valid answer index")
        if llava_questions is None:
            prompt = scienceqa_prompt(problem)
        elif pid in llava_questions:
            text = llava_questions[pid].replace("<image>", "").strip()
            prompt = f"{text}\n{MULTIPLE_CHOICE_PROMPT}"
        else:
            raise ValueError(f"{llava_path}: no question for problem {pid!r}")
        records.append({
            "question_id": pid,
            "image": str(root / "images" / "test" / pid / problem["image"]),
            "prompt": prompt,
            "choices": problem["choices"],
            "answer": problem["answer"],
        })  # fmt: skip
    return _check_images(records, "scienceqa_img")


def load_pope(data_dir: str | os.PathLike) -> list[Record]:
    """POPE (COCO): `coco/coco_pope_{random,popular,adversarial}.json` (JSON lines with
    question_id, image, text, label) and the COCO images in `val2014/`. Question ids restart in
    each split file, so records use "<split>/<question_id>"."""
    root = Path(data_dir)
    records = []
    for split in scorers.POPE_SPLITS:
        path = root / "coco" / f"coco_pope_{split}.json"
        if not path.is_file():
            continue
        for number, row in enumerate(_read_jsonl(path), start=1):
            _require(row, ("question_id", "image", "text", "label"), f"{path}:{number}")
            if row["label"] not in ("yes", "no"):
                raise ValueError(f"{path}:{number}: label {row['label']!r} is not yes/no")
            records.append({
                "question_id": f"{split}/{row['question_id']}",
                "image": str(root / "val2014" / row["image"]),
                "prompt": _short_answer(row["text"]),
                "label": row["label"],
                "category": split,
            })  # fmt: skip
    if not records:
        raise FileNotFoundError(f"no {root / 'coco'}/coco_pope_<split>.json files found")
    return _check_images(records, "pope")


def _mme_subtask(root: Path, subtask: str) -> list[Record]:
    folder = root / subtask
    if (folder / "images").is_dir():
        image_dir, qa_dir = folder / "images", folder / "questions_answers_YN"
    else:
        image_dir = qa_dir = folder
    images = {p.stem: p for p in image_dir.iterdir() if p.suffix in _IMAGE_SUFFIXES}
    records = []
    for txt in sorted(qa_dir.glob("*.txt")):
        if txt.stem not in images:
            raise FileNotFoundError(f"{txt}: no image named {txt.stem}.<png|jpg> in {image_dir}")
        lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
        for number, line in enumerate(lines):
            parts = line.strip().split("\t")
            if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                raise ValueError(f"{txt}:{number + 1}: expected 'question<TAB>Yes|No'")
            records.append({
                "question_id": f"{subtask}/{txt.stem}/{number}",
                "image": str(images[txt.stem]),
                "prompt": _short_answer(parts[0].strip()),
                "answer": parts[1].strip(),
                "category": subtask,
                "image_key": txt.stem,
            })  # fmt: skip
    return records


def load_mme(data_dir: str | os.PathLike) -> list[Record]:
    """MME: the `MME_Benchmark_release_version` folder, one folder per subtask holding either
    images and same-named `.txt` files, or `images/` and `questions_answers_YN/`; each txt has
    the image's two `question<TAB>Yes|No` lines."""
    root = Path(data_dir)
    subtasks = [t for ts in scorers.MME_SUBTASKS.values() for t in ts if (root / t).is_dir()]
    if not subtasks:
        raise FileNotFoundError(f"no MME subtask folders (e.g. {root / 'existence'}) found")
    return [r for t in subtasks for r in _mme_subtask(root, t)]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A benchmark: how to read its files and how to score answers to them."""

    name: str
    load: Callable[[str | os.PathLike], list[Record]]
    score: Callable[[scorers.Predictions, list[Record]], scorers.ScoreResult]


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("vqav2", load_vqav2, scorers.score_vqav2),
        Benchmark("gqa", load_gqa, scorers.score_gqa),
        Benchmark("textvqa", load_textvqa, scorers.score_textvqa),
        Benchmark("scienceqa_img", load_scienceqa_img, scorers.score_scienceqa),
        Benchmark("pope", load_pope, scorers.score_pope),
        Benchmark("mme", load_mme, scorers.score_mme),
    )
}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called `name`, or an error listing the supported ones."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; supported: {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]
