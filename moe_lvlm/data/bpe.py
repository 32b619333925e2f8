"""The BPE tokenizers of MoE-LLaVA's released models, behind moe_lvlm.data.tokenizer's interface.

  HFTokenizer        a HuggingFace `tokenizer.json` (StableLM-2's Arcade100k, Phi-2's GPT-2/CodeGen
                     BPE, ...), read with the `tokenizers` library. bos/eos/pad come from the
                     `tokenizer_config.json` (or `special_tokens_map.json`) beside it, else from
                     the usual token names; whether BOS starts a text is what the file's
                     post-processor does.
  TiktokenTokenizer  a tiktoken file (one `base64(token) rank` per line) as its model's own
                     tokenizer reads it; the file holds neither the split pattern nor the special
                     tokens, so its name says whose it is:
                       qwen.tiktoken        Qwen-1: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`,
                                            `<|extra_0..204|>` from the largest rank + 1
                       arcade100k.tiktoken  StableLM-2 before its tokenizer.json: `<|endoftext|>`,
                                            FIM, StarCoder, `<|im_start|>`, `<|im_end|>`, ... from
                                            the largest rank + 2 (100257; 100256 stays unused)
                     Both: the same split pattern, NFC normalisation, no BOS, `<|endoftext|>` eos
                     and pad.

Both append the template tokens they lack (`<image>`, ...) as special tokens after the vocabulary,
never split them, and leave special tokens out of `decode`.
"""

import base64
import json
import unicodedata
from collections.abc import Iterable

from moe_lvlm import paths
from moe_lvlm.data.tokenizer import IM_END, IM_START, SPECIAL_TOKENS, Tokenizer

ENDOFTEXT = "<|endoftext|>"
# Qwen-1's pre-tokenizer split (Qwen/Qwen-1_8B tokenization_qwen.py; Arcade100k's is the same),
# and the special tokens of each tiktoken file with the offset of the first after the largest rank.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIALS = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
ARCADE_SPECIALS = (
    ENDOFTEXT, "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<gh_stars>", "<filename>", "<issue_start>", "<issue_comment>", "<issue_closed>",
    "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<empty_output>",
    "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>", "<|endofprompt|>",
    IM_START, IM_END, "<|pause|>", *(f"<|reg{i}|>" for i in range(8)), "<|extra0|>",
)
TIKTOKEN_FILES = {"qwen.tiktoken": (QWEN_SPECIALS, 1), "arcade100k.tiktoken": (ARCADE_SPECIALS, 2)}


def config_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer(Tokenizer):
    """A `tokenizers` model from tokenizer.json text and its tokenizer_config (module docstring)."""

    file_name = "tokenizer.json"

    def __init__(self, tokenizer_json: str, config: dict | None = None, name: str = "<json>"):
        try:
            from tokenizers import AddedToken  # noqa: PLC0415
            from tokenizers import Tokenizer as Fast  # noqa: PLC0415
        except ImportError as e:
            raise ImportError(f"tokenizer {name} needs the `tokenizers` package: pip install "
                              "tokenizers") from e
        self.name, self._json, self.config = name, tokenizer_json, dict(config or {})
        try:
            self._tk = Fast.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises its own Exception for a bad file
            raise ValueError(f"tokenizer {name} is not a HuggingFace tokenizer.json: {e}") from None
        vocab = self._tk.get_vocab(with_added_tokens=True)
        self.added_tokens = tuple(t for t in SPECIAL_TOKENS if t not in vocab)
        # Present ones too: `decode` then leaves them out, as `skip_special_tokens` does in HF.
        self._tk.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        vocab = self._tk.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1

        def pick(key: str, *fallbacks: str) -> int:
            names = [config_token(self.config, key), *fallbacks]
            return next((vocab[t] for t in names if t is not None and t in vocab), -1)

        self.eos_id = pick("eos_token", ENDOFTEXT, "</s>")
        self.bos_id = pick("bos_token", "<s>", ENDOFTEXT)
        self._check()
        self.pad_id = pick("pad_token") if pick("pad_token") >= 0 else self.eos_id
        self.image_token_id, self.im_start_id, self.im_end_id = (vocab[t] for t in SPECIAL_TOKENS)
        bos_added = self._tk.encode("a").ids
        self.add_bos = bos_added[:1] == [self.bos_id] and len(bos_added) > len(self.encode("a"))
        # Byte-level BPE: "a" alone is not the "a" of " a" (the space belongs to the word).
        self.leading_space = self.encode("a") != self.encode("a a")[len(self.encode("a")):]

    @classmethod
    def from_file(cls, path: str) -> "HFTokenizer":
        directory = paths.path(path).parent
        config = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (directory / name).exists():
                try:
                    config = {**json.loads((directory / name).read_text()), **config}
                except json.JSONDecodeError as e:
                    raise ValueError(f"{directory / name} is not JSON: {e}") from None
        return cls(paths.read_bytes(path).decode(), config, name=str(path))

    def save(self, path: str) -> None:
        """tokenizer.json (with the added tokens) and, beside it, a tokenizer_config.json naming
        bos, eos and pad."""
        paths.write_text(path, self._tk.to_str())
        token = self._tk.id_to_token
        config = dict(bos_token=token(self.bos_id), eos_token=token(self.eos_id),
                      pad_token=token(self.pad_id))
        paths.write_text(paths.join(str(paths.path(path).parent), "tokenizer_config.json"),
                         json.dumps(config, indent=2))

    def __getstate__(self):
        return {"tokenizer_json": self._json, "config": self.config, "name": self.name}

    def __setstate__(self, state):
        self.__init__(**state)

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tk.decode([int(i) for i in ids if int(i) != self.pad_id],
                               skip_special_tokens=True)

    def piece_to_id(self, piece: str) -> int:
        found = self._tk.token_to_id(piece)
        return -1 if found is None else found

    def id_to_token(self, i: int) -> str:
        return self._tk.id_to_token(i)

    def to_str(self) -> str:
        """The tokenizer.json text with the added tokens."""
        return self._tk.to_str()


def read_ranks(data: bytes, name: str) -> dict[bytes, int]:
    """A tiktoken BPE file (`base64(token) rank` per line) -> {token bytes: rank}."""
    ranks = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{name} line {n}: not `base64-token rank`: {line[:60]!r}") from None
    if not ranks:
        raise ValueError(f"{name}: no tokens; a *.tiktoken file has one `base64-token rank` a line")
    if len(set(ranks.values())) != len(ranks) or max(ranks.values()) != len(ranks) - 1:
        raise ValueError(f"{name}: the ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Qwen-1's or Arcade100k's tiktoken vocabulary; `file_name` is which (module docstring)."""

    add_bos = False
    leading_space = True

    def __init__(self, data: bytes, file_name: str, name: str = "<tiktoken>"):
        try:
            import tiktoken  # noqa: PLC0415
        except ImportError as e:
            raise ImportError(f"tokenizer {name} needs the `tiktoken` package: pip install "
                              "tiktoken") from e
        if file_name not in TIKTOKEN_FILES:
            raise ValueError(f"tokenizer {name}: a tiktoken file holds no split pattern or special "
                             f"tokens, so only the known ones load: {sorted(TIKTOKEN_FILES)}")
        self.name, self._data, self.file_name = name, data, file_name
        ranks = read_ranks(data, name)
        names, offset = TIKTOKEN_FILES[file_name]
        first = max(ranks.values()) + offset
        specials = {t: first + i for i, t in enumerate(names)}
        self.added_tokens = tuple(t for t in SPECIAL_TOKENS if t not in specials)
        for t in self.added_tokens:
            specials[t] = first + len(specials)
        self._enc = tiktoken.Encoding(name, pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=specials)
        self.ranks, self.special_tokens = ranks, specials
        self.vocab_size = max(specials.values()) + 1
        self.bos_id = self.eos_id = self.pad_id = specials[ENDOFTEXT]
        self.image_token_id, self.im_start_id, self.im_end_id = (
            specials[t] for t in SPECIAL_TOKENS)
        self._text_ids = len(ranks)  # ids below are text; the rest special or unused

    @classmethod
    def from_file(cls, path: str) -> "TiktokenTokenizer":
        return cls(paths.read_bytes(path), paths.path(path).name, name=str(path))

    def save(self, path: str) -> None:
        paths.write_bytes(path, self._data)

    def __getstate__(self):
        return {"data": self._data, "file_name": self.file_name, "name": self.name}

    def __setstate__(self, state):
        self.__init__(**state)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids if 0 <= int(i) < self._text_ids],
                                errors="replace")

    def piece_to_id(self, piece: str) -> int:
        if piece in self.special_tokens:
            return self.special_tokens[piece]
        return self.ranks.get(piece.encode(), -1)
