"""Decoding with a KV cache: greedy, or temperature + top-p sampling.

Prompts are left-padded so that every row's next token sits at the same cache slot; padding
slots are masked out of attention and RoPE positions count only real tokens.

CLI: python -m moe_lvlm.generate --workdir=runs/demo --image=PATH --prompt=TEXT
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> dict[str, np.ndarray]:
    """input_ids, positions, segment_ids [batch, longest prompt], padding on the left."""
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), pad_id, np.int32)
    seg = np.zeros((len(prompts), longest), np.int32)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = p
        seg[i, longest - len(p) :] = 1
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
    jax.jit, static_argnames=("model", "max_new_tokens", "eos_id", "pad_id", "temperature", "top_p")
)
def generate(
    model,
    params,
    input_ids: Array,
    positions: Array,
    segment_ids: Array,
    images: Array | None,
    rng: Array,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> Array:
    """New tokens [batch, max_new_tokens]; after a row's eos the rest is `pad_id`."""
    batch, prompt_len = input_ids.shape
    max_len = prompt_len + max_new_tokens
    apply = functools.partial(model.apply, decode=True, max_len=max_len, mutable=["cache"])
    (logits, _), variables = apply({"params": params}, input_ids, positions, segment_ids, images)
    rng, first_rng = jax.random.split(rng)
    token = sample_token(logits[:, -1], first_rng, temperature, top_p)
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((batch,), bool)
    position = positions[:, -1]

    def body(i, carry):
        cache, token, position, out, done, rng = carry
        out = out.at[:, i].set(jnp.where(done, pad_id, token))
        done = done | (token == eos_id)
        position = position + 1
        (logits, _), variables = apply(
            {"params": params, "cache": cache}, token[:, None], position[:, None],
            jnp.ones((batch, 1), jnp.int32), None,
        )
        rng, step_rng = jax.random.split(rng)
        token = sample_token(logits[:, -1], step_rng, temperature, top_p)
        return variables["cache"], token, position, out, done, rng

    carry = (variables["cache"], token, position, out, done, rng)
    return jax.lax.fori_loop(0, max_new_tokens, body, carry)[3]
