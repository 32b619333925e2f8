"""Recomputation in the backward pass that XLA:CPU keeps as recomputation.

`jax.checkpoint` marks recomputed values with optimization barriers; XLA:CPU removes those
before common-subexpression elimination, so the recomputed values merge with the forward's and
stay alive from the forward to the backward pass (and its concurrency-optimised scheduler may
also run backward work early). Values that depend on the cotangent can do neither: `after` adds
to arrays a zero that XLA cannot fold (0 * x is NaN for x = inf or NaN), computed from the
cotangent; `recompute` is a checkpoint built on it. benchmarks/RESULTS.md (issue 15) has the
step footprints with and without.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


def after(dep: jax.Array, *xs: jax.Array) -> tuple[jax.Array, ...]:
    """`xs` unchanged in value (for finite `dep`), but computed from `dep`'s first element.
    Integer arrays pass through."""
    zero = 0.0 * dep.reshape(-1)[0]
    return tuple(
        x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x for x in xs
    )


def recompute(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """fn (positional array arguments, one array out) that saves only its arguments for the
    backward pass and recomputes everything else there, after the cotangent is known."""

    @jax.custom_vjp
    def wrapped(*args):
        return fn(*args)

    def fwd(*args):
        return fn(*args), args

    def bwd(args, ct):
        return jax.vjp(fn, *after(ct, *args))[1](ct)

    wrapped.defvjp(fwd, bwd)
    return functools.wraps(fn)(wrapped)
