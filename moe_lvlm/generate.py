"""Decoding with a KV cache: greedy, or temperature + top-p sampling.

Prompts are left-padded so that every row's next token sits at the same cache slot; padding
slots are masked out of attention and RoPE positions count only real tokens. A row stops at its
template's end-of-turn token (`</s>`, or `<|im_end|>` for ChatML); the loop ends when every row
has stopped or `max_new_tokens` are out.

`BatchGenerator` feeds `generate` static shapes (rows padded to the batch size, prompts to a
length that only grows, in multiples of 32), so jit compiles once per shape.

CLI: python -m moe_lvlm.generate --workdir=runs/demo --image=PATH --prompt=TEXT
"""

import argparse
import functools
import math
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moe_lvlm.data import conversation, image, pipeline
from moe_lvlm.data.tokenizer import IMAGE_TOKEN, Tokenizer
from moe_lvlm.workdir import TrainedModel, load_trained

Array = jax.Array


def stop_ids(template: str, tokenizer: Tokenizer) -> tuple[int, ...]:
    """Tokens that end an answer: what the template trains after each answer (and `</s>`)."""
    if template == "chatml":
        return (tokenizer.im_end_id, tokenizer.eos_id)
    return (tokenizer.eos_id,)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None
) -> dict[str, np.ndarray]:
    """input_ids, positions, segment_ids [batch, length (default: longest prompt)], padding on
    the left."""
    longest = max(len(p) for p in prompts)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length={length} is shorter than the longest prompt ({longest} tokens)")
    ids = np.full((len(prompts), length), pad_id, np.int32)
    seg = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = p
        seg[i, length - len(p) :] = 1
    positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    return {"input_ids": ids, "positions": positions, "segment_ids": seg}


def sample_token(logits: Array, rng: Array, temperature: float, top_p: float) -> Array:
    """logits [batch, vocab] -> token ids [batch]. temperature 0 is greedy."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        cutoff_index = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("model", "max_new_tokens", "pad_id", "vocab_size", "temperature", "top_p"),
)
def generate(
    model,
    params,
    input_ids: Array,
    positions: Array,
    segment_ids: Array,
    images: Array | None,
    rng: Array,
    stop_ids: Array | Sequence[int],
    *,
    max_new_tokens: int,
    pad_id: int = 0,
    vocab_size: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> Array:
    """New tokens [batch, max_new_tokens]: each row up to and including its first token in
    `stop_ids` (traced: other stop ids do not recompile), then `pad_id`. With `vocab_size`, ids
    past the tokenizer's vocabulary (rows of a larger embedding table) are never produced."""
    batch, prompt_len = input_ids.shape
    stop_ids = jnp.asarray(stop_ids, jnp.int32).reshape(-1)
    apply = functools.partial(
        model.apply, decode=True, max_len=prompt_len + max_new_tokens, mutable=["cache"]
    )

    def emit(i, logits, rng, out, done):
        """Samples token i of every row from logits [batch, vocab]; stopped rows get pad_id."""
        if vocab_size is not None and vocab_size < logits.shape[-1]:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
        token = sample_token(logits, jax.random.fold_in(rng, i), temperature, top_p)
        token = jnp.where(done, pad_id, token)
        return token, out.at[:, i].set(token), done | jnp.isin(token, stop_ids)

    (logits, _), variables = apply({"params": params}, input_ids, positions, segment_ids, images)
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    token, out, done = emit(0, logits[:, -1], rng, out, jnp.zeros((batch,), bool))

    def cond(carry):
        i, _, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, token, position, out, done = carry
        position = position + 1
        (logits, _), variables = apply(
            {"params": params, "cache": cache}, token[:, None], position[:, None],
            jnp.ones((batch, 1), jnp.int32), None,
        )
        token, out, done = emit(i, logits[:, -1], rng, out, done)
        return i + 1, variables["cache"], token, position, out, done

    carry = (1, variables["cache"], token, positions[:, -1], out, done)
    return jax.lax.while_loop(cond, body, carry)[4]


def answer_tokens(tokens: np.ndarray, stops: Sequence[int]) -> list[int]:
    """A row of `generate` output cut before its first stop token."""
    ends = np.flatnonzero(np.isin(tokens, stops))
    return tokens[: ends[0]].tolist() if ends.size else tokens.tolist()


class BatchGenerator:
    """Answers prompts in batches of `batch_size` rows, sharded over this process's devices.

    The last batch is filled with copies of its first row and prompts are left-padded to a
    length that only grows (multiples of `length_multiple`), so a run compiles `generate` for
    one or a few shapes. Sampling (temperature > 0) draws from `seed`, one fresh key per batch.
    """

    def __init__(
        self,
        model,
        params,
        tokenizer: Tokenizer,
        template: str,
        image_size: int,
        *,
        batch_size: int,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        length_multiple: int = 32,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        if temperature < 0.0 or not 0.0 < top_p <= 1.0:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1; got {temperature}, "
                             f"{top_p}")
        devices = jax.local_devices()
        self.mesh = Mesh(np.asarray(devices), ("data",))
        self.batch_size = math.ceil(batch_size / len(devices)) * len(devices)
        self.model, self.tokenizer = model, tokenizer
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
        self.stops = stop_ids(template, tokenizer)
        self.image_shape = (image_size, image_size, 3)
        self.options = dict(max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_id,
                            vocab_size=tokenizer.vocab_size, temperature=temperature, top_p=top_p)
        self.rng = jax.random.PRNGKey(seed)
        self.length_multiple = length_multiple
        self.prompt_len = 0

    def tokens(
        self, prompts: Sequence[np.ndarray], images: Sequence[np.ndarray | None]
    ) -> list[list[int]]:
        """New tokens of each prompt (up to `batch_size`), without the stop token."""
        n = len(prompts)
        if not 1 <= n <= self.batch_size or len(images) != n:
            raise ValueError(f"{n} prompts and {len(images)} images for a batch of "
                             f"{self.batch_size}")
        rows = list(range(n)) + [0] * (self.batch_size - n)
        longest = max(len(p) for p in prompts)
        self.prompt_len = max(self.prompt_len,
                              math.ceil(longest / self.length_multiple) * self.length_multiple)
        batch = left_pad([prompts[r] for r in rows], self.tokenizer.pad_id, self.prompt_len)
        if any(x is not None for x in images):
            zeros = np.zeros(self.image_shape, np.float32)
            batch["images"] = np.stack(
                [zeros if images[r] is None else images[r] for r in rows])[:, None]
        else:
            batch["images"] = None
        batch = jax.device_put(batch, NamedSharding(self.mesh, P("data")))
        self.rng, rng = jax.random.split(self.rng)
        out = generate(self.model, self.params, batch["input_ids"], batch["positions"],
                       batch["segment_ids"], batch["images"], rng, np.asarray(self.stops),
                       **self.options)
        out = np.asarray(out)
        return [answer_tokens(out[r], self.stops) for r in range(n)]

    def __call__(
        self, prompts: Sequence[np.ndarray], images: Sequence[np.ndarray | None]
    ) -> list[str]:
        """Answer texts, one per prompt; any number of prompts."""
        answers = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            answers += [self.tokenizer.decode(t).strip()
                        for t in self.tokens(prompts[chunk], images[chunk])]
        return answers


def make_encoder(trained: TrainedModel) -> pipeline.Encoder:
    """The training pipeline's encoder (template, image preprocessing) of a loaded workdir."""
    return pipeline.Encoder.from_config(trained.config.data, trained.model_config,
                                        trained.tokenizer)


def encode_question(
    encoder: pipeline.Encoder, question: str, image_path: str | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Prompt ids of one user turn (`<image>` first when there is an image, as LLaVA and the
    built-in data put it) and the preprocessed image [H, W, 3], exactly as in training."""
    text = f"{IMAGE_TOKEN}\n{question}" if image_path is not None else question
    ids = encoder.prompt({"turns": [("user", text)]})
    if image_path is None:
        return ids, None
    try:
        picture = encoder.load_image(image_path)
    except conversation.BadRecord as e:
        raise ValueError(f"{image_path}: {e}") from None
    pixels = image.preprocess(picture, encoder.image_size, encoder.mean, encoder.std,
                              encoder.aspect)
    return ids, pixels


def generator_for(trained: TrainedModel, **kwargs) -> BatchGenerator:
    """A BatchGenerator for a `workdir.TrainedModel`; kwargs go to BatchGenerator."""
    return BatchGenerator(trained.model, trained.params, trained.tokenizer,
                          trained.config.data.template, trained.model_config.vision.image_size,
                          **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moe_lvlm.generate",
        description="Answer one prompt (and image) with a trained workdir's newest checkpoint.")
    parser.add_argument("--workdir", required=True, help="a `python -m moe_lvlm.train` workdir")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    parser.add_argument("--image", default=None, help="an image file (optional)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage", default=None, help="stage to load (default: the last trained)")
    parser.add_argument("--step", type=int, default=None, help="step (default: the newest)")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
    trained = load_trained(args.workdir, args.stage, args.step)
    ids, pixels = encode_question(make_encoder(trained), args.prompt, args.image)
    generator = generator_for(
        trained, batch_size=1, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
    )
    print(f"[{args.workdir} {trained.stage} step {trained.step}]", file=sys.stderr)
    print(generator([ids], [pixels])[0], flush=True)


if __name__ == "__main__":
    main()
