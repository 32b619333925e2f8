"""Reading and writing HF safetensors checkpoints with numpy only (no torch).

Reading parses the safetensors header and memory-maps the data, because numpy has no bfloat16 and
`safetensors.numpy` refuses BF16 tensors (most released LLMs); BF16 is read as `ml_dtypes.bfloat16`.
A directory holds `model.safetensors` or shards listed by `model.safetensors.index.json`.
"""

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(
                f"{path}: not a safetensors file (shorter than its 8-byte header size)"
            )
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + size


class Checkpoint(Mapping):
    """name -> numpy array of every tensor in a HF checkpoint directory, read lazily (memmap)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if (self.directory / INDEX).exists():
            index = json.loads((self.directory / INDEX).read_text())
            files = sorted(set(index["weight_map"].values()))
        elif (self.directory / SINGLE).exists():
            files = [SINGLE]
        else:
            raise FileNotFoundError(
                f"{self.directory} has neither {SINGLE} nor {INDEX}; point at a HF model directory "
                "saved with safetensors (save_pretrained(..., safe_serialization=True))"
            )
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for name in files:
            path = self.directory / name
            if not path.exists():
                raise FileNotFoundError(f"{self.directory / INDEX} lists {name}, which is missing")
            header, start = _read_header(path)
            for key, info in header.items():
                self._where[key] = (path, info, start)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise KeyError(f"tensor {key!r} not found in {self.directory}")
        path, info, start = self._where[key]
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype = np.dtype(DTYPES[info["dtype"]])
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
        return np.asarray(data).view(dtype).reshape(info["shape"])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key][1]["shape"])

    def file_of(self, key: str) -> Path:
        return self._where[key][0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def write_checkpoint(
    tensors: Mapping[str, np.ndarray], directory: str | Path, max_shard_bytes: int = 2 << 30
) -> list[str]:
    """Writes `tensors` as HF does: one `model.safetensors`, or shards of at most
    `max_shard_bytes` (a bigger tensor gets a shard of its own) plus the index.
    Returns the file names."""
    directory = Path(directory)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE), metadata=metadata)
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(directory / name), metadata=metadata)
        weight_map.update({key: name for key in shard})
    total = sum(a.nbytes for a in tensors.values())
    index = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    return [*names, INDEX]
