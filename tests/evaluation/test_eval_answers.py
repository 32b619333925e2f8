"""Resumable answer files: appends, truncated last lines from a kill, bad lines."""

import json

import pytest

from moe_lvlm.evaluation.answers import (
    AnswerWriter,
    answer_path,
    load_done,
    read_all_answers,
    read_answers,
)


def _records(*ids):
    return [{"question_id": q, "prompt": f"question {q}"} for q in ids]


def test_write_and_read_back(tmp_path):
    path = tmp_path / "answers.jsonl"
    with AnswerWriter(path) as writer:
        writer.write(_records(1, "b"), ["yes", "ünïcode"])
    with AnswerWriter(path) as writer:  # a second run appends
        writer.write(_records(3), ["no"])
    assert read_answers(path) == {1: "yes", "b": "ünïcode", 3: "no"}
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines[0] == {"question_id": 1, "prompt": "question 1", "answer": "yes"}


def test_truncated_last_line_is_ignored_then_repaired(tmp_path):
    path = tmp_path / "answers.jsonl"
    with AnswerWriter(path) as writer:
        writer.write(_records(1, 2), ["a", "b"])
    with path.open("a", encoding="utf-8") as f:
        f.write('{"question_id": 3, "prompt": "question 3", "ans')  # killed mid-write
    assert load_done(path) == {1, 2}
    with AnswerWriter(path) as writer:
        writer.write(_records(3), ["c"])
    assert read_answers(path) == {1: "a", 2: "b", 3: "c"}
    assert len(path.read_text().splitlines()) == 3


def test_truncated_multibyte_character_is_ignored(tmp_path):
    path = tmp_path / "answers.jsonl"
    full = json.dumps({"question_id": 1, "prompt": "p", "answer": "é"}, ensure_ascii=False)
    path.write_bytes(full.encode("utf-8")[:-3])  # cut inside the two-byte 'é'
    assert load_done(path) == set()


def test_complete_last_record_without_newline_counts(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 1, "prompt": "p", "answer": "a"}', encoding="utf-8")
    assert load_done(path) == {1}
    with AnswerWriter(path) as writer:
        writer.write(_records(2), ["b"])
    assert read_answers(path) == {1: "a", 2: "b"}


def test_bad_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "answers.jsonl"
    good = '{"question_id": 1, "answer": "a"}\n'
    path.write_text(good + "not json\n" + good)
    with pytest.raises(ValueError, match=r"answers.jsonl:2: not valid JSON"):
        read_answers(path)
    path.write_text('{"question_id": 1}\n')
    with pytest.raises(ValueError, match=r"answers.jsonl:1: expected an object"):
        read_answers(path)


def test_shards_merge_and_conflicts_are_errors(tmp_path):
    assert answer_path(tmp_path, 0, 1).name == "answers.jsonl"
    assert answer_path(tmp_path, 1, 2).name == "answers.1.jsonl"
    with AnswerWriter(answer_path(tmp_path, 0, 2)) as writer:
        writer.write(_records(1), ["a"])
    with AnswerWriter(answer_path(tmp_path, 1, 2)) as writer:
        writer.write(_records(2), ["b"])
    assert read_all_answers(tmp_path) == {1: "a", 2: "b"}
    with AnswerWriter(answer_path(tmp_path, 0, 1)) as writer:
        writer.write(_records(2), ["different"])
    with pytest.raises(ValueError, match="different answers"):
        read_all_answers(tmp_path)


def test_writer_checks_answers(tmp_path):
    with AnswerWriter(tmp_path / "answers.jsonl") as writer:
        with pytest.raises(ValueError, match="1 answers for 2 questions"):
            writer.write(_records(1, 2), ["a"])
        with pytest.raises(TypeError, match="answer for 1 is int"):
            writer.write(_records(1), [3])
