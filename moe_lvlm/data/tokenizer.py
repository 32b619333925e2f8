"""SentencePiece tokenizer with the special tokens the chat templates need.

Any `.model` file loads; the special tokens (`<image>`, `<|im_start|>`, `<|im_end|>`) that it lacks
are appended to its vocabulary as user-defined pieces, so `vocab_size` may grow by up to three (the
model's embedding table must then be at least that large). Padding always uses id 0: built-in
tokenizers reserve it for `<pad>`; for other models padded positions are marked by segment_ids == 0.
"""

import io
from collections.abc import Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

IMAGE_TOKEN = "<image>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (IMAGE_TOKEN, IM_START, IM_END)
_USER_DEFINED = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED


class Tokenizer:
    """A SentencePiece model plus the ids of the template's special tokens."""

    pad_id = 0

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
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"tokenizer {name} has no bos or eos piece; both are needed")

    @classmethod
    def from_file(cls, path: str) -> "Tokenizer":
        with open(path, "rb") as f:
            return cls(f.read(), name=str(path))

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self._proto)

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
) -> Tokenizer:
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
    return Tokenizer(out.getvalue(), name="<trained>")
