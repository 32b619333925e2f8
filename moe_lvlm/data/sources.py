"""Random-access record sources and the spec strings that name them.

A source spec is `kind:target?key=value&...`:
  llava:/data/llava_v1_5_mix665k.json?image_root=/data/images  LLaVA JSON (array) or JSONL
  tfds:name[/config][:version]?split=train&data_dir=DIR         a TFDS dataset in ArrayRecord form
       optional keys: image_key (default 'image'), conversations_key ('conversations', a JSON string
       in LLaVA form), or question_key + answer_key for single-turn VQA data, id_key ('id')
  builtin:SPLIT?question_type=yes_no,color                      the built-in digit scenes
       (question_type, optional: only records of these question types)
A mixture is a list of (spec, weight) pairs, or a string `spec@weight;spec@weight` (weight 1 if
left out).

Every source yields records: dicts with `id`, `origin` (the file or dataset, for messages), `turns`
[(role, text)], `image` (None, a path, encoded bytes or a uint8 array), `answer`, `question_type`
(reference fields of evaluation splits, '' when absent). A record that cannot be parsed comes back
as {'id', 'origin', 'bad': reason, 'message'} so the pipeline can count or reject it.
"""

import json
import os
import urllib.parse
from collections.abc import Sequence

import numpy as np

from moe_lvlm import paths
from moe_lvlm.cli import UserError
from moe_lvlm.data.conversation import BadRecord, count_image_placeholders, turns_from_llava

KINDS = ("llava", "tfds", "builtin")


class DataError(UserError, ValueError):
    """Data that cannot be read or used; the message names the file or record and the problem."""


def bad(record_id: str, origin: str, reason: str, message: str) -> dict:
    return {"id": record_id, "origin": origin, "bad": reason, "message": message}


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return _text(value.item())
    return str(value)


def make_record(
    record_id: str, origin: str, conversations, image, answer: str = "", question_type: str = ""
) -> dict:
    """Validates a LLaVA-style record; returns the record or a bad-record marker."""
    try:
        turns = turns_from_llava(conversations)
        placeholders = count_image_placeholders(turns)
        if image is not None and placeholders == 0:
            raise BadRecord("image_without_placeholder", "has an image but no <image> in its text")
        if image is None and placeholders:
            raise BadRecord("placeholder_without_image", "has <image> in its text but no image")
        if placeholders > 1:
            raise BadRecord("malformed_record", f"{placeholders} <image> placeholders; one allowed")
    except BadRecord as e:
        return bad(record_id, origin, e.reason, str(e))
    return {"id": record_id, "origin": origin, "turns": turns, "image": image,
            "answer": answer, "question_type": question_type}


class LlavaJsonSource:
    """LLaVA records from a JSON array or a JSONL file; images under `image_root`.

    JSONL lines are parsed when read, so a malformed line (bad JSON or not UTF-8) is one bad
    record; a JSON array file that does not parse is an error for the whole file.
    """

    def __init__(self, path: str, image_root: str = ""):
        self.path = os.fspath(paths.path(path))
        self.image_root = os.fspath(paths.path(image_root)) if image_root else ""
        try:
            raw = paths.read_bytes(self.path)
        except OSError as e:
            raise DataError(f"cannot read {self.path}: {e.strerror or e}") from None
        if self.path.endswith(".jsonl"):
            self._items = [(i + 1, line) for i, line in enumerate(raw.split(b"\n"))
                           if line.strip()]
            self._jsonl = True
        else:
            try:
                items = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{self.path} is not UTF-8 text (byte {e.start}: {e.reason}); "
                                "save it as UTF-8, or as JSONL to skip bad lines one by one"
                                ) from None
            except json.JSONDecodeError as e:
                raise DataError(f"{self.path} is not valid JSON ({e}); use JSONL to skip bad "
                                "lines one by one") from None
            if not isinstance(items, list):
                raise DataError(f"{self.path} must hold a JSON array of records")
            self._items = items
            self._jsonl = False
        if not self._items:
            raise DataError(f"{self.path} holds no records")

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        name = os.path.basename(self.path)
        if self._jsonl:
            line_no, line = self._items[index]
            fallback = f"{name}:{line_no}"
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                return bad(fallback, self.path, "malformed_record",
                           f"line {line_no}: not UTF-8 (byte {e.start}: {e.reason})")
            except json.JSONDecodeError as e:
                return bad(fallback, self.path, "malformed_record",
                           f"line {line_no}: bad JSON ({e})")
        else:
            obj, fallback = self._items[index], f"{name}[{index}]"
        if not isinstance(obj, dict):
            return bad(fallback, self.path, "malformed_record", "record is not a JSON object")
        record_id = str(obj.get("id", fallback))
        image = obj.get("image")
        if image is not None and not isinstance(image, str):
            return bad(record_id, self.path, "malformed_record", "'image' must be one file name")
        if image is not None:
            image = paths.join(self.image_root, image)
        return make_record(record_id, self.path, obj.get("conversations"), image,
                           _text(obj.get("answer", "")), _text(obj.get("question_type", "")))


class TfdsSource:
    """Records from a TFDS dataset prepared in ArrayRecord format (`tfds.data_source`, no TF).

    Image features are read as encoded bytes and decoded by the pipeline (so a corrupt image is a
    counted bad record, not a crash).
    """

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None = None,
        image_key: str = "image",
        conversations_key: str = "conversations",
        question_key: str = "",
        answer_key: str = "",
        id_key: str = "id",
    ):
        import tensorflow_datasets as tfds  # slow import, only when used

        data_dir = os.fspath(paths.path(data_dir)) if data_dir else None
        features = tfds.builder(name, data_dir=data_dir).info.features
        decoders = None
        if image_key in features and isinstance(features[image_key], tfds.features.Image):
            decoders = {image_key: tfds.decode.SkipDecoding()}
        if data_dir and paths.is_remote(data_dir):
            # ArrayRecord's reader opens local files only: read a local copy of the dataset.
            folder = name.split(":")[0].split("/")[0]
            data_dir = os.path.dirname(paths.local_copy(paths.join(data_dir, folder)))
        self._ds = tfds.data_source(name, split=split, data_dir=data_dir, decoders=decoders)
        self.origin = f"tfds:{name}/{split}"
        self._keys = dict(image=image_key, conversations=conversations_key,
                          question=question_key, answer=answer_key, id=id_key)
        if conversations_key not in features and not (question_key and answer_key):
            raise DataError(f"{self.origin} has no feature {conversations_key!r}; set "
                             f"conversations_key or question_key and answer_key "
                             f"(features: {sorted(features)})")

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict:
        ex, k = self._ds[index], self._keys
        record_id = _text(ex[k["id"]]) if k["id"] in ex else f"{self.origin}:{index}"
        image = ex.get(k["image"])
        if isinstance(image, bytes | np.ndarray) and len(image) == 0:
            image = None
        if k["conversations"] in ex:
            try:
                conversations = json.loads(_text(ex[k["conversations"]]))
            except json.JSONDecodeError as e:
                return bad(record_id, self.origin, "malformed_record", f"bad conversations: {e}")
            answer = _text(ex.get("answer", ""))
        else:
            question = _text(ex[k["question"]])
            answer = _text(ex[k["answer"]])
            question = f"<image>\n{question}" if image is not None else question
            conversations = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        return make_record(record_id, self.origin, conversations, image, answer,
                           _text(ex.get("question_type", "")))


class Subset:
    """The records of `source` whose question_type is one of `question_types`."""

    def __init__(self, source, question_types: Sequence[str]):
        self._source, wanted = source, set(question_types)
        self._index = [i for i in range(len(source)) if source[i].get("question_type") in wanted]
        self.origin = f"{source.origin}?question_type={','.join(question_types)}"

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict:
        return self._source[self._index[index]]


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """'kind:target?k=v&...' -> (kind, target, options)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS:
        raise DataError(f"source spec {spec!r} must start with one of {[k + ':' for k in KINDS]}")
    target, _, query = rest.partition("?")
    return kind, target, dict(urllib.parse.parse_qsl(query, strict_parsing=bool(query)))


def open_source(spec: str, data_dir: str):
    """The random-access source named by `spec`; `data_dir` is the TFDS data dir by default."""
    kind, target, opts = parse_spec(spec)
    if kind == "llava":
        source = LlavaJsonSource(target, **opts)
    elif kind == "tfds":
        opts.setdefault("data_dir", data_dir)
        opts.setdefault("split", "train")
        source = TfdsSource(target, **opts)
    else:
        from moe_lvlm.data import builtin  # imports tensorflow_datasets

        if unknown := set(opts) - {"question_type"}:
            raise DataError(f"source spec {spec!r}: unknown keys {sorted(unknown)} "
                            f"(builtin takes only question_type)")
        builtin.ensure_built(data_dir)
        source = TfdsSource(builtin.NAME, split=target, data_dir=data_dir)
        if "question_type" in opts:
            source = Subset(source, opts["question_type"].split(","))
    if len(source) == 0:
        raise DataError(f"source {spec} holds no records")
    return source


def parse_mixture(mixture: str | Sequence) -> list[tuple[str, float]]:
    """A mixture as (spec, weight) pairs, from pairs or from 'spec@weight;spec@weight'."""
    if isinstance(mixture, str):
        pairs = []
        for item in filter(None, (s.strip() for s in mixture.split(";"))):
            spec, sep, weight = item.rpartition("@")
            pairs.append((spec, float(weight)) if sep else (item, 1.0))
    else:
        pairs = [(str(spec), float(weight)) for spec, weight in mixture]
    if not pairs:
        raise DataError("the data mixture is empty; give at least one source spec")
    for spec, weight in pairs:
        parse_spec(spec)
        if weight <= 0:
            raise DataError(f"mixture weight of {spec!r} is {weight}; weights must be positive")
    return pairs
