"""KV-cache decoding against full recomputation, and sampling against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_lvlm.generate import BatchGenerator, answer_tokens, generate, left_pad, sample_token
from tests.generate.tiny_workdir import (
    init_params,
    reference_greedy,
    tiny_model_config,
    tiny_tokenizer,
)

IMAGE_ID = 4
NUM_IMAGE_TOKENS = 4  # the demo's 32x32 images in 16x16 patches


@pytest.fixture(scope="module", params=["dropless", "capacity"])
def tiny(request):
    cfg = tiny_model_config(request.param)
    cfg.image_token_id = IMAGE_ID
    return init_params(cfg)


def _prompts(rng, lengths, with_image):
    """Token prompts (ids 7.. past the specials) of the given text lengths: bos, then the image
    placeholders when `with_image`, then text."""
    head = [2] + [IMAGE_ID] * NUM_IMAGE_TOKENS if with_image else [2]
    return [head + rng.integers(7, 200, n).tolist() for n in lengths]


def _images(rng, n, size=32):
    return rng.normal(size=(n, 1, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_kv_cache_matches_full_recompute(tiny, with_image):
    model, params = tiny
    if with_image is False and model.config.moe.dispatch == "capacity":
        pytest.skip("the text-only case runs once, with dropless dispatch")
    rng = np.random.default_rng(0)
    steps = 8
    prompts = _prompts(rng, [3, 11, 6], with_image)
    images = _images(rng, 3) if with_image else None
    free = [
        reference_greedy(model, params, p, None if images is None else images[i : i + 1],
                          steps, ())
        for i, p in enumerate(prompts)
    ]
    # Stop row 0 after its third token (it may stop other rows too, as the reference says).
    stop = free[0][2]
    expected = [
        reference_greedy(model, params, p, None if images is None else images[i : i + 1],
                          steps, (stop,))
        for i, p in enumerate(prompts)
    ]
    assert len(expected[0]) == 3
    batch = left_pad(prompts)
    out = generate(model, params, batch["input_ids"], batch["positions"], batch["segment_ids"],
                   images, jax.random.PRNGKey(0), np.array([stop]), max_new_tokens=steps)
    out = np.asarray(out)
    for row, want in zip(out, expected, strict=True):
        np.testing.assert_array_equal(row, want + [0] * (steps - len(want)))
    # Without a stop every row runs to max_new_tokens and matches the free-running reference.
    out = generate(model, params, batch["input_ids"], batch["positions"], batch["segment_ids"],
                   images, jax.random.PRNGKey(0), np.array([-1]), max_new_tokens=steps)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(free))


def test_batch_generator_pads_rows_and_lengths(tiny):
    """5 prompts through batches of 2 (the last one padded with a copy), prompts left-padded to
    a multiple of 8 that only grows, ids limited to the tokenizer's vocabulary: each row as
    greedy decoding of it alone."""
    model, params = tiny
    if model.config.moe.dispatch == "capacity":
        pytest.skip("runs once, with dropless dispatch")
    tokenizer = tiny_tokenizer()
    assert tokenizer.vocab_size < model.config.decoder.vocab_size
    rng = np.random.default_rng(1)
    prompts = [np.asarray(p, np.int32) for p in _prompts(rng, [2, 20, 4, 9, 5], True)]
    images = list(_images(rng, 5)[:, 0])
    steps = 5
    generator = BatchGenerator(model, params, tokenizer, "vicuna_v1", 32, batch_size=2,
                               max_new_tokens=steps, length_multiple=8)
    got = generator.tokens(prompts[:2], images[:2])
    assert generator.prompt_len == 32  # 1 + 4 + 20 = 25 tokens, rounded up to a multiple of 8
    got += generator.tokens(prompts[2:4], images[2:4])
    got += generator.tokens(prompts[4:], images[4:])
    assert generator.prompt_len == 32  # one shape: compiled once
    for i, prompt in enumerate(prompts):
        want = reference_greedy(model, params, prompt.tolist(), images[i][None, None], steps,
                                 (tokenizer.eos_id,), vocab_size=tokenizer.vocab_size)
        assert got[i] == [t for t in want if t != tokenizer.eos_id]


def test_answer_tokens_cuts_at_first_stop():
    assert answer_tokens(np.array([5, 9, 3, 0, 0]), (3,)) == [5, 9]
    assert answer_tokens(np.array([5, 6, 7, 3, 0]), (6, 3)) == [5]
    assert answer_tokens(np.array([5, 6, 7]), (3,)) == [5, 6, 7]


def test_left_pad():
    batch = left_pad([[7, 8, 9], [5]], pad_id=0, length=4)
    np.testing.assert_array_equal(batch["input_ids"], [[0, 7, 8, 9], [0, 0, 0, 5]])
    np.testing.assert_array_equal(batch["segment_ids"], [[0, 1, 1, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(batch["positions"][:, -1], [2, 0])
    np.testing.assert_array_equal(batch["positions"][0, 1:], [0, 1, 2])
    with pytest.raises(ValueError, match="shorter than the longest prompt"):
        left_pad([[1, 2, 3]], length=2)


# ----------------------------------------------------------------------------- sampling

LOGITS = np.array([2.0, 1.5, 1.0, 0.0, -1.0, 3.0, 0.5], np.float32)
_sample = jax.jit(sample_token, static_argnums=(2, 3))


def _key(seed):
    """An 'rbg' key: sample_token takes any key type, and rbg compiles 3x faster on CPU."""
    return jax.random.key(seed, impl="rbg")


def _filtered_distribution(logits, temperature, top_p):
    """numpy reference: softmax(logits / T) restricted to the smallest set of most likely tokens
    whose probability reaches top_p, renormalised."""
    p = np.exp(logits / temperature - np.max(logits / temperature))
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
    q = np.zeros_like(p)
    q[keep] = p[keep] / p[keep].sum()
    return q


def _empirical(temperature, top_p, n=40_000, seed=0):
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, LOGITS.size))
    tokens = _sample(logits, _key(seed), temperature, top_p)
    return np.bincount(np.asarray(tokens), minlength=LOGITS.size) / n


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8), (1.5, 0.5), (2.0, 0.95)])
def test_sampling_matches_filtered_distribution(temperature, top_p):
    want = _filtered_distribution(LOGITS, temperature, top_p)
    got = _empirical(temperature, top_p)
    n = 40_000
    tolerance = 5 * np.sqrt(want * (1 - want) / n) + 1e-9
    assert np.all(got[want == 0] == 0), (got, want)
    assert np.all(np.abs(got - want) <= tolerance), (got, want)


def test_sampling_kept_set_hand_computed():
    # T = 1: p = softmax(LOGITS) = [.196, .119, .072, .027, .010, .533, .044]; sorted 5, 0, 1, ...
    # with cumulative mass .533, .729, .848: top_p 0.7 keeps tokens 5 and 0, in the ratio
    # e^3 : e^2, so token 5 has probability 1 / (1 + e^-1) = .731; top_p 0.8 adds token 1.
    got = _empirical(1.0, 0.7)
    assert set(np.flatnonzero(got)) == {0, 5}
    np.testing.assert_allclose(got[5], 0.731, atol=0.01)
    assert set(np.flatnonzero(_empirical(1.0, 0.8))) == {0, 1, 5}


def test_greedy_and_tiny_top_p_are_argmax():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(64, 50)).astype(np.float32) * 3)
    best = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(_sample(logits, _key(0), 0.0, 1.0), best)
    for seed in range(3):
        np.testing.assert_array_equal(_sample(logits, _key(seed), 1.0, 1e-6), best)
