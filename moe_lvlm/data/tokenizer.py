"""Tokenizers with the special tokens the chat templates need, one interface for three formats.

`load(path)` picks the backend by file:
  `*.model`                          SentencePiece (LLaMA/Vicuna, the built-in tokenizer)
  `tokenizer.json` (or a directory holding one; its `tokenizer_config.json` names bos/eos/pad)
                                     a HuggingFace `tokenizers` model: StableLM-2, Phi-2, ... (BPE)
  `qwen.tiktoken`, `arcade100k.tiktoken`
                                     a tiktoken vocabulary (Qwen-1; StableLM-2's first release) with
                                     its model's split pattern and special tokens
A directory is searched in that order (moe_lvlm/data/bpe.py has the BPE backends).

The special tokens a tokenizer lacks (`<image>`, `<|im_start|>`, `<|im_end|>`) are appended to its
vocabulary, so `vocab_size` (largest id + 1) may grow by up to three: the model's embedding table
must be at least that large. `encode` never adds BOS/EOS; the templates add `bos_id` where the
tokenizer itself would (`add_bos`) and `eos_id` after each answer. Padded positions are marked by
segment_ids == 0, whatever `pad_id` holds (0 for SentencePiece, the pad or eos token for BPE).

`data.tokenizer` may start with `{workdir}/` (what import_checkpoint writes): the file then lives
in the run's workdir, which can move as a whole.
"""

import abc
import io
from collections.abc import Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from moe_lvlm import paths

IMAGE_TOKEN = "<image>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (IMAGE_TOKEN, IM_START, IM_END)
WORKDIR = "{workdir}"
_USER_DEFINED = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED


class Tokenizer(abc.ABC):
    """The interface the data pipeline, generation and export use.

    vocab_size: largest id + 1; bos_id / eos_id / pad_id / image_token_id / im_start_id /
    im_end_id: token ids; add_bos: the tokenizer starts a text with BOS (the templates do so
    too); leading_space: a word that follows a space in a template must carry that space
    (byte-level BPE), where False means encode() starts every text as a word (SentencePiece's
    dummy prefix); file_name: the name `save` should be given; added_tokens: the special
    tokens appended to the vocabulary.
    """

    name: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    image_token_id: int
    im_start_id: int
    im_end_id: int
    add_bos: bool
    leading_space: bool
    file_name: str
    added_tokens: tuple[str, ...]

    @classmethod
    def from_file(cls, path: str) -> "Tokenizer":
        """The tokenizer in `path`, of the kind its name says (module docstring)."""
        return load(path)

    @abc.abstractmethod
    def save(self, path: str) -> None:
        """Writes the tokenizer (with its added tokens) so that `load(path)` gives the same ids."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without BOS or EOS."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, leaving out padding and control tokens."""

    @abc.abstractmethod
    def piece_to_id(self, piece: str) -> int:
        """The id of a token given as its text (-1 or the unknown id when absent)."""

    def _check(self) -> None:
        if min(self.bos_id, self.eos_id) < 0:
            raise ValueError(f"tokenizer {self.name} has no bos or eos token; both are needed")


def kind(path: str) -> str:
    """'sentencepiece', 'hf' or 'tiktoken' for a tokenizer file or directory (module docstring)."""
    name = str(path).rstrip("/")
    if name.endswith(".model"):
        return "sentencepiece"
    if name.endswith(".json"):
        return "hf"
    if name.endswith(".tiktoken"):
        return "tiktoken"
    found = find_in_directory(name)
    if found is None:
        raise ValueError(
            f"tokenizer {path}: not a SentencePiece *.model, a HuggingFace tokenizer.json, a "
            "*.tiktoken file or a directory holding one"
        )
    return kind(found)


def find_in_directory(directory: str) -> str | None:
    """A directory's tokenizer file: tokenizer.model, else tokenizer.json, else *.tiktoken."""
    root = paths.path(directory)
    if not root.is_dir():
        return None
    for name in ("tokenizer.model", "tokenizer.json"):
        if (root / name).exists():
            return str(root / name)
    found = sorted(root.glob("*.tiktoken"))
    return str(found[0]) if found else None


def load(path: str, workdir: str | None = None) -> Tokenizer:
    """The tokenizer in `path` (a file or a directory holding one); `{workdir}/...` paths are
    taken inside `workdir`."""
    path = resolve(path, workdir)
    which = kind(path)
    if paths.path(path).is_dir():
        path = find_in_directory(path)
    if which == "sentencepiece":
        return SentencePieceTokenizer.from_file(path)
    from moe_lvlm.data import bpe  # noqa: PLC0415

    backend = bpe.HFTokenizer if which == "hf" else bpe.TiktokenTokenizer
    return backend.from_file(path)


def resolve(path: str, workdir: str | None) -> str:
    """`path` with a leading `{workdir}` replaced by `workdir`."""
    if not str(path).startswith(WORKDIR):
        return str(path)
    if workdir is None:
        raise ValueError(f"data.tokenizer={path} lies in a run's workdir, and none is known here")
    return paths.join(str(workdir), str(path)[len(WORKDIR):].lstrip("/"))


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model plus the ids of the template's special tokens."""

    pad_id = 0
    add_bos = True
    leading_space = False
    file_name = "tokenizer.model"

    def __init__(self, model_proto: bytes, name: str = "<bytes>"):
        proto = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
        present = {p.piece for p in proto.pieces}
        self.added_tokens = tuple(t for t in SPECIAL_TOKENS if t not in present)
        for token in self.added_tokens:
            proto.pieces.add(piece=token, score=0.0, type=_USER_DEFINED)
        self.name = name
        self._proto = proto.SerializeToString()
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.image_token_id: int = self._sp.piece_to_id(IMAGE_TOKEN)
        self.im_start_id: int = self._sp.piece_to_id(IM_START)
        self.im_end_id: int = self._sp.piece_to_id(IM_END)
        self._check()

    @classmethod
    def from_file(cls, path: str) -> "SentencePieceTokenizer":
        return cls(paths.read_bytes(path), name=str(path))

    def save(self, path: str) -> None:
        paths.write_bytes(path, self._proto)

    def __getstate__(self):
        return {"model_proto": self._proto, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["name"])

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) != self.pad_id])

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)


def train_tokenizer(
    texts: Sequence[str], vocab_size: int, *, byte_fallback: bool = True,
    model_type: str = "unigram",
) -> SentencePieceTokenizer:
    """Trains a SentencePiece model (`model_type` 'unigram' or 'bpe') on `texts` with pad=0,
    unk=1, bos=2, eos=3 and the special tokens as user-defined pieces 4, 5, 6. `vocab_size` is
    an upper bound."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=out,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type=model_type,
        character_coverage=1.0,
        split_digits=True,
        byte_fallback=byte_fallback,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        user_defined_symbols=list(SPECIAL_TOKENS),
        num_threads=1,
        minloglevel=2,
    )
    return SentencePieceTokenizer(out.getvalue(), name="<trained>")
