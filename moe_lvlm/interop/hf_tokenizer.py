"""The run's tokenizer as transformers files, encoding and decoding as it does.

A HuggingFace tokenizer.json (moe_lvlm/data/bpe.py) is written as it is with the added template
tokens, and a tokenizer_config.json naming bos/eos/pad and `<image>`, padding on the left. A
tiktoken vocabulary (Qwen-1, Arcade100k) becomes such a tokenizer.json (`tiktoken_as_json`:
byte-level BPE with its split pattern, NFC, merges from the ranks, its special tokens at their
ids). A sentencepiece model is written as:

  tokenizer.model         the sentencepiece model with the project's added pieces (`<image>`, ...),
                          so ids match training; transformers' SentencePieceBackend reads it
  tokenizer_config.json   special tokens, BOS added (as the chat templates do), no EOS
  tokenizer.json          a `tokenizers` model built from tokenizer.model: what AutoTokenizer and
                          AutoProcessor load for a llava directory

The fast tokenizer follows the model's normalizer_spec (precompiled character map, whitespace
collapsing, dummy prefix) and keeps byte fallback; unigram and BPE models convert (BPE merges
are derived from the piece scores).
"""

import json
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2

from moe_lvlm.data import bpe
from moe_lvlm.data.tokenizer import IM_END, IM_START, IMAGE_TOKEN, Tokenizer

_Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
UNIGRAM, BPE = 1, 2
SPACE = "\u2581"  # sentencepiece's visible space


def write_tokenizer(tok: Tokenizer, out: Path, template: str = "") -> dict:
    """Writes the three tokenizer files into `out`; returns the special ids for the configs.

    Padding goes on the left (batched generation appends after each row's last token). The chat
    tokens `<|im_start|>` / `<|im_end|>` are special (`skip_special_tokens` drops them), and with
    the 'chatml' template `<|im_end|>` is an end-of-sequence id, as in moe_lvlm.generate.
    """
    if isinstance(tok, bpe.TiktokenTokenizer):
        tok = tiktoken_as_json(tok)
    if isinstance(tok, bpe.HFTokenizer):
        _write_json(tok, out)
    else:
        _write_sentencepiece(tok, out)
    eos = [tok.im_end_id, tok.eos_id] if template == "chatml" else tok.eos_id
    return dict(bos_token_id=tok.bos_id, eos_token_id=eos, pad_token_id=tok.pad_id)


def _write_json(tok: bpe.HFTokenizer, out: Path) -> None:
    (out / "tokenizer.json").write_text(tok.to_str())
    token = tok.id_to_token
    config = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token=token(tok.bos_id),
        eos_token=token(tok.eos_id),
        pad_token=token(tok.pad_id),
        image_token=IMAGE_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )
    if (unk := bpe.config_token(tok.config, "unk_token")) is not None:
        config["unk_token"] = unk
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: byte b as a printable character (printable Latin-1 bytes as
    themselves, the others as chr(256 + n) in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiktoken_as_json(tok: bpe.TiktokenTokenizer) -> bpe.HFTokenizer:
    """The tiktoken vocabulary as a `tokenizers` byte-level BPE with the same ids: every token is
    its bytes in GPT-2's alphabet, its rank its id; each two-part split of a token into tokens is
    a merge, ranked by the token's rank (tiktoken merges the pair whose concatenation has the
    lowest rank), and whole pre-tokens found in the vocabulary are taken as they are, as tiktoken
    does. The special tokens follow at their ids."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Fast

    chars = byte_chars()
    text = lambda b: "".join(chars[x] for x in b)  # noqa: E731
    ranks = tok.ranks
    merges = sorted(
        (rank, ranks[t[:i]], text(t[:i]), text(t[i:]))
        for t, rank in ranks.items()
        for i in range(1, len(t))
        if t[:i] in ranks and t[i:] in ranks
    )
    fast = Fast(models.BPE({text(t): r for t, r in ranks.items()},
                           [(left, right) for *_, left, right in merges], ignore_merges=True))
    fast.normalizer = normalizers.NFC()
    fast.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(bpe.QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    fast.decoder = decoders.ByteLevel()
    # Special tokens at their ids; an id tiktoken leaves unused (Arcade100k's 100256) gets a
    # placeholder special token.
    by_id = {i: t for t, i in tok.special_tokens.items()}
    specials = [by_id.get(i, f"<|unused_{i}|>") for i in range(len(ranks), tok.vocab_size)]
    fast.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    wrong = [t for t, i in tok.special_tokens.items() if fast.token_to_id(t) != i]
    if wrong:
        raise ValueError(f"tokenizer {tok.name}: special tokens {wrong[:3]} change ids in "
                         "tokenizer.json")
    eos = bpe.ENDOFTEXT
    return bpe.HFTokenizer(fast.to_str(), dict(bos_token=eos, eos_token=eos, pad_token=eos),
                           name=f"{tok.name} as tokenizer.json")


def _write_sentencepiece(tok: Tokenizer, out: Path) -> None:
    path = out / "tokenizer.model"
    tok.save(str(path))
    proto = sentencepiece_model_pb2.ModelProto.FromString(path.read_bytes())
    piece = lambda i: proto.pieces[i].piece  # noqa: E731
    config = dict(
        tokenizer_class="SentencePieceBackend",
        bos_token=piece(tok.bos_id),
        eos_token=piece(tok.eos_id),
        unk_token=proto.trainer_spec.unk_piece,
        pad_token=piece(tok.pad_id),
        image_token=IMAGE_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        add_bos_token=True,
        add_eos_token=False,
        special_tokens_pattern="bos",  # SentencePieceBackend: prepend BOS only
        legacy=True,
        padding_side="left",
    )
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    fast_tokenizer(proto, tok.bos_id).save(str(out / "tokenizer.json"))


def bpe_merges(pieces: list[tuple[str, float]], skip: set[str]) -> list[tuple[str, str]]:
    """Sentencepiece BPE as merges: every split of a piece into two vocabulary pieces, the
    merges of higher-scored pieces first (sentencepiece merges the best-scored pair first)."""
    vocab = {p for p, _ in pieces if p not in skip}
    ranked = []
    for piece, score in pieces:
        if piece in skip:
            continue
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                ranked.append((-score, len(left), len(right), left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def fast_tokenizer(proto: sentencepiece_model_pb2.ModelProto, bos_id: int):
    """A `tokenizers.Tokenizer` equivalent to the sentencepiece model `proto`, adding BOS."""
    try:
        from tokenizers import (
            AddedToken,
            Regex,
            decoders,
            models,
            normalizers,
            pre_tokenizers,
            processors,
        )
        from tokenizers import Tokenizer as Fast
    except ImportError as e:
        raise ImportError(
            "export writes tokenizer.json with the `tokenizers` package: pip install tokenizers "
            "(it comes with transformers)"
        ) from e
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    special = {p.piece for p in proto.pieces if p.type in (_Piece.CONTROL, _Piece.USER_DEFINED)}
    if trainer.model_type == UNIGRAM:
        model = models.Unigram(pieces, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == BPE:
        skip = special | {p.piece for p in proto.pieces if p.type in (_Piece.BYTE, _Piece.UNKNOWN)}
        model = models.BPE(
            {p: i for i, (p, _) in enumerate(pieces)},
            bpe_merges(pieces, skip),
            unk_token=trainer.unk_piece,
            fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
        )
    else:
        raise ValueError(
            f"sentencepiece model_type {trainer.model_type} (not unigram or BPE) has no "
            "tokenizers equivalent"
        )
    fast = Fast(model)
    # Control pieces (<s>, </s>) and the chat tokens are special; other user-defined ones
    # (<image>) are matched verbatim.
    fast.add_tokens(
        [
            AddedToken(
                p.piece,
                normalized=False,
                special=p.type == _Piece.CONTROL or p.piece in (IM_START, IM_END),
            )
            for p in proto.pieces
            if p.type in (_Piece.CONTROL, _Piece.USER_DEFINED)
        ]
    )
    steps = [normalizers.Precompiled(charsmap)] if (charsmap := spec.precompiled_charsmap) else []
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:  # every text (every segment between added tokens) gets one
        steps.append(normalizers.Prepend(SPACE))
    fast.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    split = trainer.split_by_whitespace  # each SPACE starts a word
    fast.pre_tokenizer = pre_tokenizers.Metaspace(SPACE, prepend_scheme="never", split=split)
    prepend = "always" if spec.add_dummy_prefix else "never"  # decoding drops the dummy prefix
    metaspace = decoders.Metaspace(SPACE, prepend_scheme=prepend, split=split)
    fast.decoder = (
        decoders.Sequence([decoders.ByteFallback(), metaspace])
        if trainer.byte_fallback
        else metaspace
    )
    bos = proto.pieces[bos_id].piece
    fast.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return fast
