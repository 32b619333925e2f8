"""Tiny BPE tokenizer files written here: a byte-level BPE `tokenizer.json` trained with
`tokenizers` (as StableLM-2's and Phi-2's are) and a Qwen-1 style `*.tiktoken` file."""

import base64
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

TEXTS = [
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions.",
    "USER: How many digits are in the image? ASSISTANT: item 3",
    "What color is the 3? Which digit is at the top left? Where is the 7? yes no red green blue",
    "You are a helpful assistant. system user assistant item ok describe the picture",
] + [f"item {i} ok {i}" for i in range(20)]
ENDOFTEXT = "<|endoftext|>"


def write_tokenizer_json(directory: Path, vocab_size: int = 300, *, config: bool = True,
                         full_alphabet: bool = True) -> Path:
    """A byte-level BPE (GPT-2 style: no BOS, `<|endoftext|>` bos/eos) trained on TEXTS, with a
    tokenizer_config.json as the hub ships (pad_token null). Without `full_alphabet` only the
    bytes TEXTS uses are tokens (a vocabulary small enough for the tiny test models)."""
    directory.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet() if full_alphabet else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT],
                                  initial_alphabet=alphabet, show_progress=False)
    tk.train_from_iterator(TEXTS * 3, trainer)
    path = directory / "tokenizer.json"
    tk.save(str(path))
    if config:
        (directory / "tokenizer_config.json").write_text(json.dumps(
            dict(bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT, pad_token=None)))
    return path


# Merges of the tiny tiktoken file, in rank order after the 256 single bytes.
TIKTOKEN_MERGES = (b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world",
                   b"it", b"em", b"item", b" i", b" item", b"US", b"ER", b"USER", b"AS", b"SI",
                   b"ST", b"ASSI", b"ASSIST", b"AN", b"ANT", b"ASSISTANT")


def write_tiktoken(path: Path) -> dict[bytes, int]:
    """A `qwen.tiktoken`-format file: every byte, then TIKTOKEN_MERGES; returns the ranks."""
    ranks = {bytes([b]): b for b in range(256)}
    for token in TIKTOKEN_MERGES:
        ranks[token] = len(ranks)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


def write_tiktoken_from_bpe(path: Path, tokenizer_json: Path) -> dict[bytes, int]:
    """A larger `*.tiktoken` file: every byte, then the merged tokens of a trained byte-level BPE
    (tokenizer.json) in merge order; returns the ranks."""
    tk = Tokenizer.from_file(str(tokenizer_json))
    ranks = {bytes([b]): b for b in range(256)}
    for merge in json.loads(tokenizer_json.read_text())["model"]["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        token = tk.decoder.decode([left + right])
        if "\ufffd" not in token and token.encode() not in ranks:
            ranks[token.encode()] = len(ranks)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks
