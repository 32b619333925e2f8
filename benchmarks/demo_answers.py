"""Held-out answers of a demo model by what the scene holds: does it find the digit a question
names, or guess among what the scene holds?

    python -m moe_lvlm.evaluate --workdir=runs/demo
    PYTHONPATH=. python benchmarks/demo_answers.py runs/demo/eval/builtin_test/stage3_400

Reads `per_item.jsonl` of an evaluation of `builtin:test` and prints, for the questions that name
a digit, accuracy per scene size next to the accuracy of a guess among the scene's candidates:
colour questions by the number of distinct colours in the scene, position questions by the
number of digits (occupied cells), yes/no questions by the number of digits (a guess: 50%).
"""

import argparse
import collections
import json
from pathlib import Path

from benchmarks.common import table
from moe_lvlm.data import builtin


def candidates(question_type: str, objs: list[dict]) -> tuple[str, int] | None:
    """(what is counted, how many) of the scene's answers a guess picks from; None for question
    types that do not name a digit."""
    if question_type == "color":
        return "distinct colours", len({o["color"] for o in objs})
    if question_type == "position":
        return "digits", len(objs)
    if question_type == "yes_no":
        return "digits", len(objs)
    return None


def breakdown(items: list[dict], scenes: dict[str, list[dict]]) -> list[dict]:
    """Rows {type, scene, questions, accuracy, guess} (percent) over `items` (per_item.jsonl
    lines), grouped by question type and number of candidates in the scene."""
    groups = collections.defaultdict(list)
    for item in items:
        if item["question_id"] not in scenes:
            raise ValueError(f"{item['question_id']!r} is not a record of the built-in test split")
        found = candidates(item["question_type"], scenes[item["question_id"]])
        if found is not None:
            groups[(item["question_type"], *found)].append(bool(item["correct"]))
    return [{"type": kind, "scene": f"{what}: {n}", "questions": len(correct),
             "accuracy": 100.0 * sum(correct) / len(correct),
             "guess": 50.0 if kind == "yes_no" else 100.0 / n}
            for (kind, what, n), correct in sorted(groups.items())]


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
