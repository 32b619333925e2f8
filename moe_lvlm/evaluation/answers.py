"""Resumable answer files: append-only JSONL, one `{"question_id", "prompt", "answer"}` a line.

A run killed mid-write leaves at most a partial last line; readers ignore it and the writer cuts
it off before appending, so re-running the same command answers exactly the missing questions.
Any other malformed line is an error naming the file and line. Files go through
`moe_lvlm.paths`: in gs:// (no appends) the writer rewrites the whole object after each batch.
"""

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from moe_lvlm import paths

QuestionId = int | str
ANSWER_GLOB = "answers*.jsonl"


def answer_path(out_dir: str | os.PathLike, process_index: int,
                process_count: int) -> epath.Path:
    """`answers.jsonl` for a single process, `answers.{index}.jsonl` for one of several."""
    name = "answers.jsonl" if process_count == 1 else f"answers.{process_index}.jsonl"
    return paths.path(out_dir) / name


def _parse_line(path: epath.Path, number: int, line: bytes) -> dict[str, Any]:
    record = json.loads(line)
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("question_id"), int | str)
        or not isinstance(record.get("answer"), str)
    ):
        raise ValueError(f"{path}:{number}: expected an object with question_id and answer")
    return record


def _complete_lines(path: epath.Path) -> tuple[list[bytes], int]:
    """The file's complete records as raw lines, and the byte length they (plus any complete but
    unterminated last record) occupy; a partial last line is left out."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    keep = len(data) - len(tail)
    if tail:
        try:
            _parse_line(path, len(lines) + 1, tail)
            lines.append(tail)
            keep = len(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # a write cut short by a kill: ignored, and cut off by AnswerWriter
    return lines, keep


def read_answers(path: str | os.PathLike) -> dict[QuestionId, str]:
    """question_id -> answer from one answer file (missing file: empty)."""
    path = paths.path(path)
    if not path.exists():
        return {}
    answers: dict[QuestionId, str] = {}
    for number, line in enumerate(_complete_lines(path)[0], start=1):
        if not line.strip():
            continue
        try:
            record = _parse_line(path, number, line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e})") from e
        answers[record["question_id"]] = record["answer"]
    return answers


def load_done(path: str | os.PathLike) -> set[QuestionId]:
    """The question ids already answered in one answer file."""
    return set(read_answers(path))


def read_all_answers(out_dir: str | os.PathLike) -> dict[QuestionId, str]:
    """Answers merged over every `answers*.jsonl` shard in `out_dir`.

    The same question answered differently in two shards is an error (two runs with different
    process counts wrote to the same directory at once).
    """
    merged: dict[QuestionId, str] = {}
    origin: dict[QuestionId, epath.Path] = {}
    for path in sorted(paths.path(out_dir).glob(ANSWER_GLOB)):
        for question_id, answer in read_answers(path).items():
            if question_id in merged and merged[question_id] != answer:
                raise ValueError(
                    f"question {question_id!r} has different answers in {origin[question_id]} "
                    f"and {path}; delete one of the files"
                )
            merged[question_id] = answer
            origin[question_id] = path
    return merged


class AnswerWriter:
    """Appends answers to a JSONL file, flushed and fsynced after every batch.

    Use as a context manager. Opening cuts off a partial last line left by a killed run.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = paths.path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remote = paths.is_remote(self.path)
        if self._remote:  # kept whole and rewritten: objects cannot be appended to
            data = self.path.read_bytes() if self.path.exists() else b""
            data = data[:_complete_lines(self.path)[1]] if data else b""
            self._data = data if not data or data.endswith(b"\n") else data + b"\n"
            return
        if self.path.exists():
            keep = _complete_lines(self.path)[1]
            with open(self.path, "r+b") as f:  # epath has no r+
                f.truncate(keep)
                if keep:
                    f.seek(keep - 1)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (closed in close)

    def write(self, records: Sequence[Mapping[str, Any]], answers: Sequence[str]) -> None:
        """Appends one line per (record, answer) and makes it durable."""
        if len(records) != len(answers):
            raise ValueError(f"{len(answers)} answers for {len(records)} questions")
        for record, answer in zip(records, answers, strict=True):
            if not isinstance(answer, str):
                raise TypeError(f"answer for {record['question_id']!r} is {type(answer).__name__}")
            line = {"question_id": record["question_id"], "prompt": record["prompt"],
                    "answer": answer}  # fmt: skip
            text = json.dumps(line, ensure_ascii=False) + "\n"
            if self._remote:
                self._data += text.encode("utf-8")
            else:
                self._file.write(text)
        if self._remote:
            self.path.write_bytes(self._data)
            return
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._remote:
            self._file.close()

    def __enter__(self) -> "AnswerWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
