"""Held-out answers of a demo model by what the scene holds: does it find the digit a question
names, or guess among what the scene holds?

    python -m moe_lvlm.evaluate --workdir=runs/demo
    PYTHONPATH=. python benchmarks/demo_answers.py runs/demo/eval/builtin_test/stage3_1200

Reads `per_item.jsonl` of an evaluation of `builtin:test` and prints, per question type and
scene size, accuracy next to the accuracy of a guess among the scene's candidates: colour
questions by the number of distinct colours in the scene, position and digit questions by the
number of digits (occupied cells), yes/no questions by the number of digits (a guess: 50%), count
questions by the number of digits (a guess among 1-3: 33%). Each type's `all` row is its overall
accuracy next to the mean guess over its questions.
"""

import argparse
import collections
import json
from pathlib import Path

from benchmarks.common import table
from moe_lvlm.data import builtin


def candidates(question_type: str, objs: list[dict]) -> tuple[str, int, float]:
    """(what is counted, how many, accuracy % of a guess among the scene's candidates)."""
    if question_type == "color":
        n = len({o["color"] for o in objs})
        return "distinct colours", n, 100.0 / n
    if question_type in ("position", "digit"):
        return "digits", len(objs), 100.0 / len(objs)
    if question_type == "yes_no":
        return "digits", len(objs), 50.0
    if question_type == "count":
        return "digits", len(objs), 100.0 / 3
    raise ValueError(f"unknown question type {question_type!r}")


def breakdown(items: list[dict], scenes: dict[str, list[dict]]) -> list[dict]:
    """Rows {type, scene, questions, accuracy, guess} (percent) over `items` (per_item.jsonl
    lines), grouped by question type and number of candidates in the scene, then each type's
    `all` row."""
    groups = collections.defaultdict(list)
    for item in items:
        if item["question_id"] not in scenes:
            raise ValueError(f"{item['question_id']!r} is not a record of the built-in test split")
        what, n, guess = candidates(item["question_type"], scenes[item["question_id"]])
        groups[item["question_type"], what, n].append((bool(item["correct"]), guess))
    def row(kind: str, scene: str, pairs: list[tuple[bool, float]]) -> dict:
        return {"type": kind, "scene": scene, "questions": len(pairs),
                "accuracy": 100.0 * sum(c for c, _ in pairs) / len(pairs),
                "guess": sum(g for _, g in pairs) / len(pairs)}

    rows = []
    for kind in sorted({kind for kind, _, _ in groups}):
        keys = sorted(key for key in groups if key[0] == kind)
        rows += [row(kind, f"{what}: {n}", groups[kind, what, n]) for kind, what, n in keys]
        rows.append(row(kind, "all", [pair for key in keys for pair in groups[key]]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dir", help="an evaluation's out_dir on builtin:test")
    args = parser.parse_args()
    lines = (Path(args.eval_dir) / "per_item.jsonl").read_text().splitlines()
    rows = breakdown([json.loads(line) for line in lines], builtin.split_scenes("test"))
    print(table(rows, [("type", "type", ""), ("scene", "scene", ""),
                       ("questions", "questions", "d"), ("accuracy %", "accuracy", ".1f"),
                       ("guess among the scene's %", "guess", ".1f")]))


if __name__ == "__main__":
    main()
