"""The grain input pipeline: mixture of sources -> fixed-shape batches -> global jax.Arrays.

  sources (each shuffled with its own seed, repeated) -> weighted mix -> shard by JAX process
  -> encode (template, `<image>` expansion, loss mask, image preprocessing; bad records become
     skip markers or raise) -> [worker processes] batch to [B, S] with padding or packing
  -> main process: count skips, make global arrays on the mesh's batch axes.

`make_iterator` returns a `DataIterator`, a grain `DatasetIterator` whose state (positions, worker
states, skip counts) orbax saves with `grain.checkpoint.CheckpointSave(iterator)`; after restoring
it yields exactly the batch that would have come next.

Batch (per host, then global [B, S] arrays; B = global batch size):
  input_ids int32, targets int32 (targets[:, t] = input_ids[:, t + 1] within a sample, else 0),
  loss_mask float32 (1 where the target is an assistant token), segment_ids int32 (0 = padding,
  1..n = packed samples), positions int32 (restart at 0 per sample),
  images float32 [B, M, H, W, 3] (M = max images per row: 1, or data.max_images_per_row when
  packing; in the order of their placeholders; zeros where there is no image).
"""

import dataclasses
from collections.abc import Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_lvlm import config as config_lib
from moe_lvlm import paths
from moe_lvlm.data import conversation, image, sources
from moe_lvlm.data import tokenizer as tokenizer_lib
from moe_lvlm.data.tokenizer import Tokenizer
from moe_lvlm.parallel.mesh import BATCH_AXES

SKIP_REASONS = (
    "missing_image",
    "corrupt_image",
    "malformed_record",
    "not_alternating",
    "image_without_placeholder",
    "placeholder_without_image",
    "too_long",
)
# Counted with the skips but not skips: samples cut to seq_len (their image tokens kept).
COUNTERS = SKIP_REASONS + ("truncated",)
BAD_RECORD_MODES = config_lib.BAD_RECORD_MODES
# Consecutive skipped records that end the pipeline with an error (data.max_consecutive_skips).
DEFAULT_MAX_SKIPS = 2000
# A bad record in strict mode, a source that yields nothing usable, an unreadable file.
DataError = sources.DataError


def load_tokenizer(
    data_cfg: ml_collections.ConfigDict, workdir: paths.PathLike | None = None
) -> Tokenizer:
    """`data.tokenizer` (a SentencePiece .model, tokenizer.json or *.tiktoken path, `{workdir}/...`
    inside `workdir`) or, when empty, the built-in one."""
    if data_cfg.tokenizer:
        return tokenizer_lib.load(data_cfg.tokenizer, None if workdir is None else str(workdir))
    from moe_lvlm.data import builtin  # imports tensorflow_datasets

    return builtin.load_tokenizer(data_cfg.data_dir)


@dataclasses.dataclass(frozen=True)
class Encoder:
    """Record -> {'ids', 'train', 'image', 'truncated'}, or {'skip': reason} (raises if strict)."""

    tokenizer: Tokenizer
    template: str
    system: str | None
    num_image_tokens: int
    seq_len: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    aspect: str
    truncate: bool
    strict: bool

    @classmethod
    def from_config(
        cls, data_cfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict,
        tokenizer: Tokenizer,
    ) -> "Encoder":
        error = config_lib.ConfigError
        if data_cfg.bad_records not in BAD_RECORD_MODES:
            raise error(f"data.bad_records={data_cfg.bad_records!r}; use {BAD_RECORD_MODES}")
        if data_cfg.template not in conversation.TEMPLATES:
            raise error(f"data.template={data_cfg.template!r}; use {conversation.TEMPLATES}")
        if data_cfg.aspect not in image.ASPECT_MODES:
            raise error(f"data.aspect={data_cfg.aspect!r}; use one of {image.ASPECT_MODES}")
        if tokenizer.vocab_size > model_cfg.decoder.vocab_size:
            raise config_lib.ConfigError(
                f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} pieces but "
                f"model.decoder.vocab_size={model_cfg.decoder.vocab_size}; raise the vocab size"
            )
        return cls(
            tokenizer=tokenizer,
            template=data_cfg.template,
            system=data_cfg.system_prompt,
            num_image_tokens=config_lib.num_image_tokens(model_cfg),
            seq_len=data_cfg.seq_len,
            image_size=model_cfg.vision.image_size,
            mean=tuple(float(x) for x in model_cfg.vision.mean),
            std=tuple(float(x) for x in model_cfg.vision.std),
            aspect=data_cfg.aspect,
            truncate=data_cfg.truncate,
            strict=data_cfg.bad_records == "strict",
        )

    def __call__(self, record: dict) -> dict:
        return self.fit(self.full(record))

    def full(self, record: dict) -> dict:
        """The record encoded whole, whatever `seq_len`: {'ids', 'train', 'image', 'id',
        'origin'}, or {'skip': reason, ...} (raises if strict). What `data.cache_encoded` keeps:
        stages that differ only in seq_len share it."""
        def encode():
            if "bad" in record:
                raise conversation.BadRecord(record["bad"], record["message"])
            return dict(self.encode(record), id=record["id"], origin=record["origin"])

        return self._guarded(encode, record.get("id"), record.get("origin"))

    def fit(self, encoded: dict) -> dict:
        """A `full` encoding cut to `seq_len`: {'ids', 'train', 'image', 'truncated'}, or
        {'skip': reason, ...} (raises if strict)."""
        if "skip" in encoded:
            return encoded
        return self._guarded(lambda: self._fit(encoded), encoded["id"], encoded["origin"])

    def _guarded(self, fn, record_id, origin) -> dict:
        try:
            return fn()
        except conversation.BadRecord as e:
            if self.strict:
                raise DataError(f"record {record_id!r} in {origin}: {e.reason}: {e}") from None
            return {"skip": e.reason, "id": str(record_id), "origin": origin}

    def encode(self, record: dict) -> dict:
        """{'ids', 'train', 'image'} of a good record, untruncated; BadRecord otherwise."""
        enc = conversation.encode(
            record["turns"], self.template, self.tokenizer, self.num_image_tokens, self.system
        )
        pixels = None
        if record["image"] is not None:
            pixels = image.preprocess(
                self.load_image(record["image"]), self.image_size, self.mean, self.std, self.aspect
            )
        return {"ids": enc.ids, "train": enc.train, "image": pixels}

    def _fit(self, encoded: dict) -> dict:
        enc = conversation.Encoded(encoded["ids"], encoded["train"])
        truncated = len(enc.ids) > self.seq_len
        if truncated:
            if not self.truncate:
                raise conversation.BadRecord(
                    "too_long", f"{len(enc.ids)} tokens > seq_len={self.seq_len}"
                )
            enc = conversation.truncate(enc, self.seq_len, self.tokenizer.image_token_id)
        return {"ids": enc.ids, "train": enc.train, "image": encoded["image"],
                "truncated": truncated}

    def prompt(self, record: dict) -> np.ndarray:
        """Ids of the record's conversation up to its last question, ready for generation."""
        return conversation.encode_prompt(
            record["turns"], self.template, self.tokenizer, self.num_image_tokens, self.system
        )

    @staticmethod
    def load_image(source):
        """A path, encoded bytes or an array -> RGB PIL image; BadRecord when missing/corrupt."""
        if isinstance(source, str):
            try:
                source = paths.read_bytes(source)
            except OSError as e:
                raise conversation.BadRecord(
                    "missing_image", f"cannot read image {source}: {e.strerror or e}"
                ) from None
        try:
            return image.decode(source)
        except Exception as e:  # PIL raises many types for bad data
            raise conversation.BadRecord("corrupt_image", f"cannot decode image: {e}") from None


# ----------------------------------------------------------------------------- batching


def assemble(
    rows: list[list[dict]], batch_size: int, seq_len: int, max_images: int, image_size: int
) -> dict[str, np.ndarray]:
    """Rows of encoded samples -> the fixed-shape batch arrays (see the module docstring)."""
    out = {
        "input_ids": np.zeros((batch_size, seq_len), np.int32),
        "targets": np.zeros((batch_size, seq_len), np.int32),
        "loss_mask": np.zeros((batch_size, seq_len), np.float32),
        "segment_ids": np.zeros((batch_size, seq_len), np.int32),
        "positions": np.zeros((batch_size, seq_len), np.int32),
        "images": np.zeros((batch_size, max_images, image_size, image_size, 3), np.float32),
    }
    for r, row in enumerate(rows):
        start, m = 0, 0
        for j, ex in enumerate(row):
            ids, n = ex["ids"], len(ex["ids"])
            span = slice(start, start + n)
            out["input_ids"][r, span] = ids
            out["targets"][r, start:start + n - 1] = ids[1:]
            out["loss_mask"][r, start:start + n - 1] = ex["train"][1:]
            out["segment_ids"][r, span] = j + 1
            out["positions"][r, span] = np.arange(n)
            if ex["image"] is not None:
                out["images"][r, m] = ex["image"]
                m += 1
            start += n
    return out


class PackBatchDataset(grain.IterDataset):
    """Encoded samples -> batches; one sample per row, or several (first come) when packing.

    Each batch also carries '_counts' (skips and truncations since the previous batch, in COUNTERS
    order) and '_rows' (rows holding samples; 0 only for a last batch that just reports counts).
    `max_skips` consecutive skipped records raise DataError (the data cannot give a batch).
    """

    def __init__(self, parent: grain.IterDataset, batch_size: int, seq_len: int, pack: bool,
                 max_images: int, image_size: int, max_skips: int = DEFAULT_MAX_SKIPS):
        super().__init__(parent)
        self.shape = dict(batch_size=batch_size, seq_len=seq_len, max_images=max_images,
                          image_size=image_size)
        self.pack, self.max_skips = pack, max_skips

    def __iter__(self) -> "PackBatchIterator":
        return PackBatchIterator(self._parent.__iter__(), self.shape, self.pack, self.max_skips)


class SkipRun:
    """Consecutive skipped records; too many of them is an error, not an endless search."""

    def __init__(self, limit: int):
        self.limit = limit
        self.reset()

    def reset(self) -> None:
        self.n, self.reasons, self.first, self.origins = 0, {}, [], {}

    def add(self, skip: dict) -> None:
        self.n += 1
        self.reasons[skip["skip"]] = self.reasons.get(skip["skip"], 0) + 1
        self.origins[str(skip.get("origin"))] = None
        if len(self.first) < 5:
            self.first.append(skip.get("id"))
        if self.n >= self.limit:
            raise DataError(
                f"{self.n} records in a row were skipped and none was usable (source: "
                f"{', '.join(self.origins)}); skipped by reason: {self.reasons}; first records: "
                f"{self.first}; check the data paths (image_root), data.seq_len and "
                f"data.truncate (this bound is data.max_consecutive_skips={self.limit})")


class PackBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, shape: dict, pack: bool,
                 max_skips: int = DEFAULT_MAX_SKIPS):
        super().__init__(parent)
        self._shape, self._pack = shape, pack
        self._skips = SkipRun(max_skips)
        # A sample read but not placed (it did not fit in the last row) and the parent's state
        # before it was read: get_state reports that state so the sample is read again.
        self._pending: dict | None = None
        self._pending_state = None
        self._done = False

    def __next__(self) -> dict[str, np.ndarray]:
        if self._done:
            raise StopIteration
        seq_len, max_images = self._shape["seq_len"], self._shape["max_images"]
        rows: list[list[dict]] = [[]]
        counts = np.zeros(len(COUNTERS), np.int64)
        used_len = used_images = 0
        while True:
            if not self._pack and len(rows) == self._shape["batch_size"] and rows[-1]:
                break
            if self._pending is not None:
                ex, state, self._pending = self._pending, self._pending_state, None
            else:
                state = self._parent.get_state() if self._pack else None
                try:
                    ex = next(self._parent)
                except StopIteration:
                    self._done = True
                    break
                if "skip" in ex:
                    counts[COUNTERS.index(ex["skip"])] += 1
                    self._skips.add(ex)
                    continue
                self._skips.reset()
            n, m = len(ex["ids"]), int(ex["image"] is not None)
            fits = self._pack and used_len + n <= seq_len and used_images + m <= max_images
            if rows[-1] and not fits:
                if len(rows) == self._shape["batch_size"]:
                    self._pending, self._pending_state = ex, state
                    break
                rows.append([])
                used_len = used_images = 0
            rows[-1].append(ex)
            counts[COUNTERS.index("truncated")] += ex["truncated"]
            used_len, used_images = used_len + n, used_images + m
        num_rows = sum(bool(r) for r in rows)
        if not num_rows and not counts.any():
            raise StopIteration
        batch = assemble(rows if num_rows else [], **self._shape)
        batch["_counts"] = counts
        batch["_rows"] = np.int64(num_rows)
        return batch

    def get_state(self) -> dict:
        parent = self._pending_state if self._pending is not None else self._parent.get_state()
        return {"parent": parent, "done": self._done}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._pending, self._pending_state = None, None
        self._done = state["done"]


# ----------------------------------------------------------------------------- global arrays


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Per-host numpy batch -> global jax.Arrays, axis 0 split over ('data', 'fsdp', 'expert')."""
    sharding = NamedSharding(mesh, P(BATCH_AXES))
    n = jax.process_count()
    if n == 1:  # one batched transfer
        return jax.device_put(batch, sharding)
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n,) + v.shape[1:])
        for k, v in batch.items()
    }


class DataIterator(grain.DatasetIterator):
    """The pipeline's output: batches (global jax.Arrays with a mesh, else numpy) and skip counts.

    Checkpoint it with orbax: `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`.
    """

    def __init__(self, parent: grain.DatasetIterator, mesh: jax.sharding.Mesh | None):
        super().__init__(parent)
        self._mesh = mesh
        self._counts = dict.fromkeys(COUNTERS, 0)

    def __next__(self):
        while True:
            batch = dict(next(self._parent))
            for name, c in zip(COUNTERS, batch.pop("_counts"), strict=True):
                self._counts[name] += int(c)
            if batch.pop("_rows"):
                return to_global(batch, self._mesh) if self._mesh is not None else batch

    def counts(self) -> dict[str, int]:
        """Records skipped so far by reason, plus 'truncated' (samples cut to seq_len)."""
        return dict(self._counts)

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "counts": dict(self._counts)}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._counts = {name: int(state["counts"].get(name, 0)) for name in COUNTERS}


class _Output(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, mesh: jax.sharding.Mesh | None):
        super().__init__(parent)
        self._mesh = mesh

    def __iter__(self) -> DataIterator:
        return DataIterator(self._parent.__iter__(), self._mesh)


def skip_counts(iterator: DataIterator) -> dict[str, int]:
    """Skipped records by reason (and 'truncated') seen by `iterator` so far on this host."""
    return iterator.counts()


# ----------------------------------------------------------------------------- entry points


class MemoisedMap(grain.MapDataset):
    """`fn` over a finite MapDataset, each element computed once and kept in `memo` (a dict by
    index; `data.cache_encoded`: a small dataset seen for several epochs is encoded once)."""

    def __init__(self, parent: grain.MapDataset, fn, memo: dict | None = None):
        super().__init__(parent)
        self._fn, self._memo = fn, {} if memo is None else memo

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        index %= len(self._parent)  # a shuffle over repeats asks for index + epoch * len
        if index not in self._memo:
            self._memo[index] = self._fn(self._parent[index])
        return self._memo[index]

    def __str__(self) -> str:
        return "MemoisedMap"


class EncodedCache:
    """The `data.cache_encoded` memos of one process, by source and encoding: the stages of one
    training run that read a source with the same tokenizer, template and image settings share
    its encoded records (`Encoder.full` does not depend on seq_len)."""

    def __init__(self):
        self._memos: dict[tuple, dict] = {}

    def memo(self, spec: str, data_dir: str, encoder: Encoder) -> dict:
        key = (spec, data_dir, dataclasses.replace(encoder, seq_len=0, truncate=False))
        return self._memos.setdefault(key, {})


def record_dataset(
    mixture: str | Sequence, data_dir: str, *, seed: int, shuffle: bool, num_epochs: int | None,
    process_index: int, process_count: int, start_record: int = 0, encoder: Encoder | None = None,
    cache: EncodedCache | None = None,
) -> grain.MapDataset:
    """The records this process reads: each source shuffled (own seed) and repeated, then mixed
    by weight, then every process_count-th element from `start_record + process_index`.

    With `encoder` each source's records are encoded before the shuffle, each once
    (`MemoisedMap`, its memo from `cache`, else its own); without, the records come out raw."""
    pairs = sources.parse_mixture(mixture)
    parts = []
    for i, (spec, _) in enumerate(pairs):
        ds = grain.MapDataset.source(sources.open_source(spec, data_dir))
        if encoder is not None:
            memo = None if cache is None else cache.memo(spec, data_dir, encoder)
            ds = MemoisedMap(ds, encoder.full, memo).map(encoder.fit)
        if shuffle:
            ds = ds.shuffle(seed=(seed * 1_000_003 + i) % 2**32)
        parts.append(ds.repeat(num_epochs))
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [w for _, w in pairs])
    return ds[start_record + process_index::process_count]


def make_iterator(
    data_cfg: ml_collections.ConfigDict,
    model_cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    mesh: jax.sharding.Mesh | None = None,
    *,
    global_batch_size: int,
    mixture: str | Sequence | None = None,
    train: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    start_record: int = 0,
    encoded_cache: EncodedCache | None = None,
) -> DataIterator:
    """The batch iterator of `mixture` (default `data.mixture`).

    train=True: shuffled (if data.shuffle), repeated forever unless `num_epochs` is given.
    train=False: in order, one epoch, the last batch padded with empty rows.
    process_index/process_count default to JAX's (override them to simulate several hosts).
    start_record: the mixed record stream starts there (a resume onto another process count).
    encoded_cache: with `data.cache_encoded`, the memos to share with other iterators of this
    process (the stages of a run); default: this iterator's own.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by the "
                         f"{process_count} processes")
    if mesh is not None:
        shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
        if global_batch_size % shards:
            raise ValueError(f"global batch {global_batch_size} is not divisible by the "
                             f"{shards} batch shards of the mesh over {BATCH_AXES}")
    encoder = Encoder.from_config(data_cfg, model_cfg, tokenizer)
    cache = data_cfg.get("cache_encoded", False)
    ds = record_dataset(
        data_cfg.mixture if mixture is None else mixture, data_cfg.data_dir,
        seed=data_cfg.seed, shuffle=train and data_cfg.shuffle,
        num_epochs=(None if train else 1) if num_epochs is None else num_epochs,
        process_index=process_index, process_count=process_count, start_record=start_record,
        encoder=encoder if cache else None, cache=encoded_cache,
    )
    it_ds = (ds if cache else ds.map(encoder)).to_iter_dataset(
        grain.ReadOptions(num_threads=data_cfg.read_threads, prefetch_buffer_size=64)
    )
    it_ds = PackBatchDataset(
        it_ds, batch_size=global_batch_size // process_count, seq_len=data_cfg.seq_len,
        pack=data_cfg.packing, max_images=data_cfg.max_images_per_row if data_cfg.packing else 1,
        image_size=model_cfg.vision.image_size,
        max_skips=data_cfg.get("max_consecutive_skips", DEFAULT_MAX_SKIPS),
    )
    if data_cfg.num_workers > 0:
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data_cfg.num_workers, per_worker_buffer_size=max(1, data_cfg.prefetch)))
    elif data_cfg.prefetch > 0:
        it_ds = grain.experimental.ThreadPrefetchIterDataset(
            it_ds, prefetch_buffer_size=data_cfg.prefetch)
    return _Output(it_ds, mesh).__iter__()


def prompt_examples(
    data_cfg: ml_collections.ConfigDict,
    model_cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    spec: str,
) -> Iterator[dict]:
    """For evaluation: the records of `spec` in order as {'id', 'prompt_ids' [L] int32 (ends with
    the assistant header), 'image' [H, W, 3] float32 or None, 'answer', 'question_type'}.
    Bad records are skipped (or raise in strict mode) as in training."""
    encoder = Encoder.from_config(data_cfg, model_cfg, tokenizer)
    source = sources.open_source(spec, data_cfg.data_dir)
    for i in range(len(source)):
        record = source[i]
        checked = encoder(record)
        if "skip" in checked:
            continue
        yield {"id": record["id"], "prompt_ids": encoder.prompt(record), "image": checked["image"],
               "answer": record["answer"], "question_type": record["question_type"]}
