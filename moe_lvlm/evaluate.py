"""Score a trained workdir with batched greedy generation; prints one JSON line.

  python -m moe_lvlm.evaluate --workdir=runs/demo [--split=builtin:test] [--limit=N]
  python -m moe_lvlm.evaluate --workdir=runs/demo --benchmark=pope --data=/data/pope

Without --benchmark it answers a held-out split of the training data (default
`data.eval_source`) and reports exact match after normalisation, overall and per question type,
and POPE accuracy/precision/recall/F1/yes-ratio over the yes/no questions
(`scorers.score_short_answers`). With --benchmark it runs one of the official benchmarks from its
files on disk (`evaluation/runner.run_benchmark`, docs/evaluation.md).

Answers go to `{workdir}/eval/{split or benchmark}/{stage}_{step}/answers.jsonl` (or --out_dir),
scored items to `per_item.jsonl` beside it. Answering resumes: questions already answered there
are not asked again, so delete the folder to answer afresh (e.g. with other generation settings).
Several processes (launch/) each answer every n-th question and write their own answer shard.
"""

import argparse
import collections
import json
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from moe_lvlm import cli, host_memory, paths
from moe_lvlm.data import sources
from moe_lvlm.evaluation import runner, scorers
from moe_lvlm.evaluation.answers import read_all_answers
from moe_lvlm.evaluation.benchmarks import BENCHMARKS, Record
from moe_lvlm.generate import BatchGenerator, encode_question, generator_for, make_encoder
from moe_lvlm.parallel import distributed
from moe_lvlm.workdir import TrainedModel, WorkdirError, load_trained


def split_records(
    trained: TrainedModel, split: str, limit: int | None = None
) -> tuple[list[Record], dict[str, int]]:
    """The first `limit` (default: all) usable questions of a data source spec, and how many
    records were skipped by reason.

    Records: `question_id`, `prompt` (the last question's text), `prompt_ids` (the training
    template up to the assistant header), `image` (preprocessed [H, W, 3] or None), `answer`,
    `question_type`. Bad records are skipped (or raise, with data.bad_records='strict') exactly
    as in training; records without a reference `answer` are skipped as 'no_answer'.
    """
    encoder = make_encoder(trained)
    source = sources.open_source(split, trained.config.data.data_dir)
    records: list[Record] = []
    skipped: collections.Counter[str] = collections.Counter()
    for i in range(len(source)):
        if limit is not None and len(records) >= limit:
            break
        record = source[i]
        checked = encoder(record)
        if "skip" in checked:
            skipped[checked["skip"]] += 1
        elif not record["answer"].strip():
            skipped["no_answer"] += 1
        else:
            records.append({
                "question_id": record["id"],
                "prompt": record["turns"][-2][1],
                "prompt_ids": encoder.prompt(record),
                "image": checked["image"],
                "answer": record["answer"],
                "question_type": record["question_type"] or "none",
            })  # fmt: skip
    if not records:
        raise sources.DataError(f"{split}: no record with a reference answer to score "
                         f"(skipped: {dict(skipped)})")
    runner.check_unique(records, split)
    return records, dict(skipped)


def split_answer_fn(generator: BatchGenerator) -> runner.AnswerFn:
    """Answers `split_records` records (prompt ids and images already prepared)."""
    return lambda records: generator([r["prompt_ids"] for r in records],
                                     [r["image"] for r in records])


def benchmark_answer_fn(generator: BatchGenerator, trained: TrainedModel) -> runner.AnswerFn:
    """Answers benchmark records: `prompt` text after `<image>`, in the training template, and
    the `image` file preprocessed as in training."""
    encoder = make_encoder(trained)

    def answer(records: Sequence[Record]) -> list[str]:
        encoded = [encode_question(encoder, r["prompt"], r["image"]) for r in records]
        return generator([ids for ids, _ in encoded], [pixels for _, pixels in encoded])

    return answer


def evaluate_split(
    records: Sequence[Record],
    answer_fn: runner.AnswerFn,
    out_dir: paths.PathLike,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    barrier: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Answers `records` (resumably, sharded over processes), scores them with
    `scorers.score_short_answers`; process 0 writes `out_dir/per_item.jsonl`."""
    if process_count > 1 and barrier is None:
        raise ValueError("process_count > 1 needs a barrier so scoring waits for every shard")
    runner.answer_questions(records, answer_fn, out_dir, batch_size, process_index, process_count)
    if barrier is not None:
        barrier()
    summary, per_item = scorers.score_short_answers(read_all_answers(out_dir), records)
    if process_index == 0:
        runner.write_jsonl(paths.path(out_dir) / "per_item.jsonl", per_item)
    return summary


def default_out_dir(workdir: paths.PathLike, name: str, trained: TrainedModel) -> epath.Path:
    """`{workdir}/eval/{name}/{stage}_{step}`, with `name` made a safe folder name."""
    folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:100]
    return paths.path(workdir) / "eval" / folder / f"{trained.stage}_{trained.step}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moe_lvlm.evaluate",
        description="Score a training workdir's checkpoint on a held-out split or a benchmark.")
    parser.add_argument("--workdir", required=True, help="a `python -m moe_lvlm.train` workdir")
    parser.add_argument("--split", default=None,
                        help="data source spec with answers (default: the config's "
                             "data.eval_source, e.g. builtin:test)")
    parser.add_argument("--limit", type=int, default=None, help="score the first N questions")
    parser.add_argument("--benchmark", default=None, choices=sorted(BENCHMARKS),
                        help="an official benchmark instead of a split (needs --data)")
    parser.add_argument("--data", default=None, help="the benchmark's folder (docs/evaluation.md)")
    parser.add_argument("--out_dir", default=None,
                        help="where answers go (default: {workdir}/eval/{name}/{stage}_{step})")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="questions per generation batch on each process")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--stage", default=None, help="stage to load (default: the last trained)")
    parser.add_argument("--step", type=int, default=None, help="step (default: the newest)")
    args = parser.parse_args(argv)
    if args.benchmark is not None and args.data is None:
        parser.error("--benchmark needs --data=DIR (the benchmark's files)")
    if args.benchmark is None and args.data is not None:
        parser.error("--data is for --benchmark")
    if args.benchmark is not None and (args.split is not None or args.limit is not None):
        parser.error("--split and --limit apply to held-out splits, not to --benchmark")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit={args.limit} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the CLI; returns the summary it prints."""
    args = parse_args(argv)
    logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file at INFO
    host_memory.keep_freed_memory()  # before JAX starts its threads
    distributed.initialize_from_env()
    index, count = jax.process_index(), jax.process_count()
    barrier = None
    if count > 1:
        barrier = lambda: multihost_utils.sync_global_devices("moe_lvlm.evaluate")  # noqa: E731
    trained = load_trained(args.workdir, args.stage, args.step)
    generator = generator_for(trained, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens)
    name = args.benchmark or args.split or trained.config.data.eval_source
    out_dir = (paths.path(args.out_dir) if args.out_dir
               else default_out_dir(args.workdir, name, trained))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        hint = "" if args.out_dir else " (a read-only workdir?); pass --out_dir=DIR"
        raise WorkdirError(f"cannot write answers to {out_dir}: {e.strerror}{hint}") from None
    start = time.perf_counter()
    head: dict[str, Any] = {"workdir": str(args.workdir), "stage": trained.stage,
                            "step": trained.step}
    if args.benchmark is not None:
        summary = runner.run_benchmark(
            args.benchmark, args.data, benchmark_answer_fn(generator, trained), out_dir,
            generator.batch_size, index, count, barrier,
        )
    else:
        records, skipped = split_records(trained, name, args.limit)
        head.update(split=name, skipped=skipped)
        summary = evaluate_split(records, split_answer_fn(generator), out_dir,
                                 generator.batch_size, index, count, barrier)
    summary = {**head, **summary, "out_dir": str(out_dir),
               "seconds": round(time.perf_counter() - start, 1)}
    if index == 0:
        print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    cli.run_argparse(main)
