"""Chat templates: a conversation -> token ids and a mask of the tokens the loss trains on.

Each template is a list of segments, every segment's text encoded on its own with the tokenizer and
the ids concatenated (so a segment boundary is also a token boundary). `<image>` splits a text
segment and becomes `num_image_tokens` copies of `tokenizer.image_token_id`. Trained tokens are the
assistant's answer and its end-of-turn token (`</s>` for vicuna_v1 and plain, `<|im_end|>` for
ChatML); everything else (system prompt, user turns, role headers) is context only.
`<s>` is there only for tokenizers that start texts with BOS (SentencePiece; not the byte-level BPE
of StableLM-2, Phi-2, Qwen-1). A vicuna_v1 answer follows a space; with byte-level BPE it is
encoded with that space, so ids equal those of the whole conversation text (as LLaVA tokenizes it).

  vicuna_v1 (LLaVA v1):  <s> "{system} USER: {q1} ASSISTANT:" [a1 </s>]
                         "USER: {q2} ASSISTANT:" [a2 </s>]
  chatml (Qwen family):  <|im_start|> "system\\n{system}" <|im_end|>
                         <|im_start|> "user\\n{q1}" <|im_end|>
                         <|im_start|> "assistant\\n" [a1 <|im_end|>]
  plain (LLaVA stage-I pretraining, single turn):  <s> <image> [a1 </s>]   (the question is dropped)
"""

import dataclasses

import numpy as np

from moe_lvlm.data.tokenizer import IMAGE_TOKEN, Tokenizer

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CHATML_SYSTEM = "You are a helpful assistant."
TEMPLATES = ("vicuna_v1", "chatml", "plain")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class BadRecord(ValueError):
    """A record that cannot be trained on; `reason` is the key its skip is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Encoded:
    """ids: [L] int32 tokens; train: [L] bool, True on tokens the loss trains on."""

    ids: np.ndarray
    train: np.ndarray


def turns_from_llava(conversations) -> list[tuple[str, str]]:
    """LLaVA `conversations` -> [(role, text)] with role in {'user', 'assistant'}; checks that turns
    alternate user/assistant, starting with the user and ending with the assistant."""
    if not isinstance(conversations, list) or not conversations:
        raise BadRecord("malformed_record", "'conversations' must be a non-empty list")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadRecord("malformed_record", f"turn {i} is not a {{'from', 'value'}} object")
        role = _ROLES.get(turn.get("from"))
        if role is None:
            raise BadRecord("malformed_record", f"turn {i} has unknown role {turn.get('from')!r}")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise BadRecord(
                "not_alternating", f"turn {i} is from {turn.get('from')!r}, expected the {expected}"
            )
        turns.append((role, turn["value"]))
    if turns[-1][0] != "assistant":
        raise BadRecord("not_alternating", "the conversation does not end with an assistant turn")
    return turns


def count_image_placeholders(turns: list[tuple[str, str]]) -> int:
    return sum(text.count(IMAGE_TOKEN) for _, text in turns)


def _text(tok: Tokenizer, text: str, num_image_tokens: int) -> list[int]:
    ids: list[int] = []
    for i, part in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            ids += [tok.image_token_id] * num_image_tokens
        if part.strip():
            ids += tok.encode(part)
    return ids


def _bos(tok: Tokenizer) -> list[int]:
    return [tok.bos_id] if tok.add_bos else []


def _answer(tok: Tokenizer, answer: str, end: int, after_space: bool) -> list[int]:
    text = f" {answer}" if after_space and tok.leading_space else answer
    return tok.encode(text) + [end]


def _segments(
    turns, template: str, tok: Tokenizer, num_image_tokens: int, system: str | None
) -> list[tuple[list[int], bool]]:
    """[(ids, trained)] for `turns`; a last user turn without answer ends with the answer header."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; use one of {TEMPLATES}")
    segs: list[tuple[list[int], bool]] = []
    pairs = [(turns[i][1], turns[i + 1][1] if i + 1 < len(turns) else None)
             for i in range(0, len(turns), 2)]
    if template == "plain":
        if len(pairs) != 1:
            raise BadRecord("malformed_record", "the plain template takes a single turn")
        question, answer = pairs[0]
        segs.append((_bos(tok) + [tok.image_token_id] * num_image_tokens
                      * question.count(IMAGE_TOKEN), False))
        if answer is not None:
            segs.append((_answer(tok, answer, tok.eos_id, after_space=False), True))
        return segs
    if template == "vicuna_v1":
        system = VICUNA_SYSTEM if system is None else system
        segs.append((_bos(tok), False))
        for i, (question, answer) in enumerate(pairs):
            head = f"{system} USER: " if i == 0 and system else "USER: "
            segs.append((_text(tok, f"{head}{question} ASSISTANT:", num_image_tokens), False))
            if answer is not None:
                segs.append((_answer(tok, answer, tok.eos_id, after_space=True), True))
        return segs
    system = CHATML_SYSTEM if system is None else system
    if system:
        segs.append(([tok.im_start_id] + tok.encode(f"system\n{system}") + [tok.im_end_id], False))
    for question, answer in pairs:
        segs.append(([tok.im_start_id] + _text(tok, f"user\n{question}", num_image_tokens)
                     + [tok.im_end_id, tok.im_start_id] + tok.encode("assistant\n"), False))
        if answer is not None:
            segs.append((_answer(tok, answer, tok.im_end_id, after_space=False), True))
    return segs


def encode(
    turns: list[tuple[str, str]],
    template: str,
    tokenizer: Tokenizer,
    num_image_tokens: int,
    system: str | None = None,
) -> Encoded:
    """A whole conversation (ending with an answer) -> ids and the trained-token mask.

    `system`: the system prompt; None takes the template's default, '' leaves it out.
    """
    segs = _segments(turns, template, tokenizer, num_image_tokens, system)
    ids = np.concatenate([np.asarray(s, np.int32) for s, _ in segs])
    train = np.concatenate([np.full(len(s), t, bool) for s, t in segs])
    return Encoded(ids, train)


def encode_prompt(
    turns: list[tuple[str, str]],
    template: str,
    tokenizer: Tokenizer,
    num_image_tokens: int,
    system: str | None = None,
) -> np.ndarray:
    """Ids of a conversation up to the last user turn plus the assistant header: the prompt that
    generation continues. `turns` ends with a user turn (a trailing answer is dropped)."""
    if turns and turns[-1][0] == "assistant":
        turns = turns[:-1]
    segs = _segments(turns, template, tokenizer, num_image_tokens, system)
    return np.concatenate([np.asarray(s, np.int32) for s, _ in segs])


def truncate(enc: Encoded, seq_len: int, image_token_id: int) -> Encoded:
    """Cuts `enc` to `seq_len` tokens; raises BadRecord('too_long') when that would cut image tokens
    or leave no trained token with a target (position 0 is never a target)."""
    image_pos = np.flatnonzero(enc.ids == image_token_id)
    if image_pos.size and image_pos[-1] >= seq_len:
        raise BadRecord(
            "too_long", f"image tokens end at {image_pos[-1] + 1} > seq_len={seq_len}"
        )
    ids, train = enc.ids[:seq_len], enc.train[:seq_len]
    if not train[1:].any():
        raise BadRecord(
            "too_long", f"{len(enc.ids)} tokens; no answer token fits in seq_len={seq_len}"
        )
    return Encoded(ids, train)
