"""Answer a benchmark's questions in resumable batches, then score the answers."""

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moe_lvlm import paths
from moe_lvlm.evaluation.answers import AnswerWriter, answer_path, read_all_answers
from moe_lvlm.evaluation.benchmarks import Record, get_benchmark

AnswerFn = Callable[[Sequence[Record]], Sequence[str]]


def check_unique(records: Sequence[Record], name: str) -> None:
    """Raises if two records of `name` share a question id."""
    seen: set[Any] = set()
    for record in records:
        if record["question_id"] in seen:
            raise ValueError(f"{name}: question id {record['question_id']!r} appears twice")
        seen.add(record["question_id"])


def write_jsonl(path: str | os.PathLike, items: Sequence[dict[str, Any]]) -> None:
    """Writes one JSON object a line, replacing `path` only once the file is complete."""
    if paths.is_remote(path):  # an object appears whole once written
        paths.write_text(path, "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))
        return
    path = Path(path)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    tmp.replace(path)


def answer_questions(
    records: Sequence[Record],
    answer_fn: AnswerFn,
    out_dir: str | os.PathLike,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> int:
    """Answers this process's unanswered questions; returns how many it answered.

    Process `i` of `n` takes the questions at positions `i, i + n, ...` and appends to its own
    shard (`answers.jsonl`, or `answers.{i}.jsonl` when n > 1); questions answered in any shard
    of `out_dir` are skipped, so an interrupted run resumes where it stopped. `answer_fn` gets
    1..batch_size records (pad the last batch yourself if shapes must be static) and returns one
    string per record; answers are stored stripped of surrounding whitespace.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    done = read_all_answers(out_dir)
    todo = [
        r for i, r in enumerate(records)
        if i % process_count == process_index and r["question_id"] not in done
    ]  # fmt: skip
    with AnswerWriter(answer_path(out_dir, process_index, process_count)) as writer:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            answers = list(answer_fn(batch))
            if len(answers) != len(batch):
                raise ValueError(f"answer_fn returned {len(answers)} answers for {len(batch)}")
            writer.write(batch, [a.strip() if isinstance(a, str) else a for a in answers])
    return len(todo)


def score_answers(
    name: str, records: Sequence[Record], out_dir: str | os.PathLike
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Scores every answer shard in `out_dir` against `records`."""
    answers = read_all_answers(out_dir)
    known = {r["question_id"] for r in records}
    stray = [q for q in answers if q not in known]
    if stray:
        raise ValueError(
            f"{out_dir} holds {len(stray)} answers to questions not in {name} (first: "
            f"{stray[:3]}); use a fresh output directory for each benchmark and data set"
        )
    summary, per_item = get_benchmark(name).score(answers, list(records))
    return {"benchmark": name, **summary}, per_item


def run_benchmark(
    name: str,
    data_dir: str | os.PathLike,
    answer_fn: AnswerFn,
    out_dir: str | os.PathLike,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    barrier: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Reads benchmark `name` from `data_dir`, answers it (resumably, sharded over processes),
    scores it and returns the summary; process 0 writes `out_dir/per_item.jsonl`.

    With several processes, `barrier` must block until every process has finished answering
    (e.g. `lambda: multihost_utils.sync_global_devices("eval")`); every process then scores
    all shards and returns the same summary.
    """
    if process_count > 1 and barrier is None:
        raise ValueError("process_count > 1 needs a barrier so scoring waits for every shard")
    benchmark = get_benchmark(name)
    records = benchmark.load(data_dir)
    check_unique(records, name)
    answer_questions(records, answer_fn, out_dir, batch_size, process_index, process_count)
    if barrier is not None:
        barrier()
    summary, per_item = score_answers(name, records, out_dir)
    if process_index == 0:
        write_jsonl(paths.path(out_dir) / "per_item.jsonl", per_item)
    return summary
