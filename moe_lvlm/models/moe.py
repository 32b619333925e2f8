"""Sparse Mixture-of-Experts FFN: routing, dispatch (dropless or capacity) and expert compute.

The three steps are separate pure functions; `MoeFeedForward` owns the parameters and wires them:

1. route:    fp32 router logits -> softmax -> top-k experts, combine weights by
             `moe.combine_weights` (below), load-balancing loss (E * sum_e f_e P_e) and
             router z-loss.
2. dispatch: `dropless` sorts the (token, choice) pairs by expert and runs the experts as one
             grouped matmul (`jax.lax.ragged_dot`); `capacity` gives every expert C slots per
             routing group (`moe.capacity_group`: one sequence, or all tokens of a batch shard as
             DeepSpeed gates a device's micro-batch) with
             C = max(min_capacity, ceil(tokens / E * k * factor)), fills them in GShard/DeepSpeed
             order (all first choices, then all second choices, ...; within each round in position
             order, or in random order with `moe.drop_policy='random'`: DeepSpeed's `use_rts`) and
             drops the overflow, whose output is zero so the token is carried by the residual
             alone.
             Tokens reach their slots and come back by gathers of rows (not GShard's one-hot
             [S, E, C] einsums: the same result without their S x E x C x d FLOPs).
3. experts:  SwiGLU (decoder) or GELU-family MLP with bias (ViT, projector) per expert; with
             `moe.expert_compute='dense'` every expert on every token instead, weighted by
             combine weights that are zero where the dispatch would not compute
             (`experts_all_tokens`: the same result, no gathers, E / k times the FLOPs);
             with 'native' (CPU, SwiGLU) a fused C++ kernel computes the kept pairs of either
             dispatch (moe_lvlm/kernels/native_moe.py).

With a mesh whose `expert` axis is > 1 the capacity path is expert-parallel: the dispatched slots
travel to the devices that hold their experts with `all_to_all` inside `jax.shard_map` and come
back. The dropless path (moe_lvlm/models/dropless_ep.py) sends each (token, choice) pair to the
device of its expert and back with a ragged all-to-all (`moe.ep_dispatch`); with
`ep_dispatch='all_gather'` it runs per device on its local tokens with every expert's weights
gathered onto every device.
"""

import functools
import math
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from moe_lvlm.kernels import native_moe
from moe_lvlm.models import matmul
from moe_lvlm.models.dropless_ep import default_ep_dispatch, dropless_expert_parallel
from moe_lvlm.models.grouped_matmul import default_grouped_matmul, grouped_matmul
from moe_lvlm.models.layers import BATCH_LENGTH_EMBED, activation_fn, param_with_axes
from moe_lvlm.models.recompute import recompute
from moe_lvlm.models.tiled_matmul import tiled_experts
from moe_lvlm.parallel.mesh import BATCH_AXES, batch_divisor

Array = jax.Array

# `moe.combine_weights` (moe_lvlm/config.py:COMBINE_MODES) weighs the k chosen experts' outputs:
#   softmax        their raw router probabilities (Switch, DeepSpeed top1gating)
#   renorm_chosen  probabilities renormalised over the k chosen (GShard)
#   renorm_kept    renormalised over the choices that survive the capacity drop (DeepSpeed
#                  top2gating: a token whose second choice is dropped weighs its first by 1)
#   auto           softmax for top-1 (renormalising one weight gives 1: no router gradient
#                  through the output), renorm_chosen for top-k >= 2


def resolve_combine(mode: str, top_k: int) -> str:
    """`moe.combine_weights` with 'auto' resolved for `top_k`."""
    if mode == "auto":
        return "softmax" if top_k == 1 else "renorm_chosen"
    return mode


# --------------------------------------------------------------------------- routing
def route(
    logits: Array, top_k: int, noise_rng: Array | None = None, combine: str = "renorm_chosen"
) -> tuple[Array, Array, Array]:
    """Top-k routing. logits: [..., E] float32.

    Returns expert ids [..., k] (choice order), combine weights [..., k] and the softmax
    probabilities [..., E]. The weights are renormalised over the k chosen for 'renorm_chosen',
    else the chosen experts' probabilities ('renorm_kept' renormalises them after the capacity
    drop: `renorm_over_kept`). With `noise_rng`, choices after the first take the argmax of
    logits + Gumbel noise (DeepSpeed top2gating's second-expert sampling).
    """
    probs = jax.nn.softmax(logits, axis=-1)
    noisy = logits
    if noise_rng is not None:
        noisy = logits + jax.random.gumbel(noise_rng, logits.shape, logits.dtype)
    chosen = [jnp.argmax(logits, axis=-1)]
    for _ in range(1, top_k):
        taken = jax.nn.one_hot(jnp.stack(chosen, -1), logits.shape[-1], dtype=bool).any(-2)
        chosen.append(jnp.argmax(jnp.where(taken, -jnp.inf, noisy), axis=-1))
    expert_ids = jnp.stack(chosen, axis=-1).astype(jnp.int32)
    gates = jnp.take_along_axis(probs, expert_ids, axis=-1)
    if combine == "renorm_chosen":
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return expert_ids, gates, probs


def renorm_over_kept(gates: Array, kept: Array) -> Array:
    """DeepSpeed top2gating's weights: the kept choices' probabilities over their sum (the
    denominator clamped at eps, so a token that lost every choice weighs nothing)."""
    gates = gates * kept
    denom = jnp.maximum(jnp.sum(gates, axis=-1, keepdims=True), jnp.finfo(gates.dtype).eps)
    return gates / denom


def balance_loss(probs: Array, expert_ids: Array, valid: Array, counts: str) -> Array:
    """E * sum_e f_e * P_e over valid tokens; f_e from the top-1 choice or all k choices."""
    num_experts = probs.shape[-1]
    valid = valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(valid), 1.0)
    mean_prob = jnp.einsum("...e,...->e", probs, valid) / n
    ids = expert_ids[..., :1] if counts == "top1" else expert_ids
    onehot = jax.nn.one_hot(ids, num_experts, dtype=jnp.float32).sum(-2) / ids.shape[-1]
    fraction = jnp.einsum("...e,...->e", onehot, valid) / n
    return num_experts * jnp.sum(mean_prob * fraction)


def z_loss(logits: Array, valid: Array) -> Array:
    """ST-MoE router z-loss: mean over valid tokens of logsumexp(logits)^2."""
    valid = valid.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(jnp.square(lse) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def capacity(
    tokens: int, num_experts: int, top_k: int, factor: float, min_capacity: int = 0
) -> int:
    """Slots per expert per routing group: DeepSpeed's ceil(tokens / E * (k * factor)), at least
    `min_capacity` (and 1)."""
    return max(1, min_capacity, math.ceil(tokens / num_experts * (top_k * factor)))


def capacity_slots(
    expert_ids: Array, valid: Array, num_experts: int, cap: int, priority: Array | None = None
) -> tuple[Array, Array]:
    """Slot of each (token, choice) in its expert's buffer, per group. expert_ids: [G, S, k].

    Slots are filled choice by choice (all first choices, then the second choices, ...); within
    a choice round in position order, or with `priority` [G, S, k] (values in [0, 1)) in
    decreasing priority: uniform priorities keep a random subset of an over-full expert's tokens
    (DeepSpeed's random token selection). Returns slot ids [G, S, k] and whether each pair is
    kept (valid and slot < cap).
    """
    groups, seq, k = expert_ids.shape
    onehot = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.int32)  # [G, S, k, E]
    onehot = onehot * valid[..., None, None].astype(jnp.int32)
    # Order the pairs choice-major: [G, k * S, E], then a running count per expert.
    choice_major = jnp.swapaxes(onehot, 1, 2).reshape(groups, k * seq, num_experts)
    if priority is None:
        position = jnp.cumsum(choice_major, axis=1) - 1
    else:
        # Sort key j - u in (j - 1, j]: round j before round j + 1, higher priority first.
        rounds = jnp.arange(k, dtype=priority.dtype)[:, None]
        key = (rounds - jnp.swapaxes(priority, 1, 2)).reshape(groups, k * seq)
        order = jnp.argsort(key, axis=1, stable=True)
        ranked = jnp.cumsum(jnp.take_along_axis(choice_major, order[..., None], axis=1), 1) - 1
        position = jnp.take_along_axis(ranked, jnp.argsort(order, axis=1)[..., None], axis=1)
    position = jnp.swapaxes(position.reshape(groups, k, seq, num_experts), 1, 2)
    slot = jnp.sum(position * onehot, axis=-1)
    kept = valid[..., None] & (slot < cap)
    return slot, kept


# --------------------------------------------------------------------------- experts
def experts_dense(weights: dict[str, Array], x: Array, activation: str, gated: bool) -> Array:
    """Every expert on its own slots. x: [..., E, C, d] -> [..., E, C, d_out].

    The slots of all groups are one [E, slots, d] operand (expert-major, what a batched dot
    wants) for `matmul.batched`."""
    act = activation_fn(activation)
    *lead, e, c, d = x.shape
    xe = jnp.moveaxis(x, -3, 0).reshape(e, -1, d)
    if gated:
        h = recompute(lambda g, u: act(g) * u)(  # the backward pass keeps g and u only
            matmul.batched(xe, weights["gate"]), matmul.batched(xe, weights["up"]))
        y = matmul.batched(h, weights["down"])
    else:
        h = act(matmul.batched(xe, weights["fc1"]) + weights["fc1_bias"][:, None])
        y = matmul.batched(h, weights["fc2"]) + weights["fc2_bias"][:, None]
    return jnp.moveaxis(y.reshape(e, *lead, c, -1), 0, -3)


def experts_grouped(
    weights: dict[str, Array],
    x: Array,
    group_sizes: Array,
    group_ids: Array,
    activation: str,
    gated: bool,
    gmm: str = "xla",
) -> Array:
    """Experts as grouped matmuls over rows sorted by expert. x: [m, d] -> [m, d_out].

    `gmm` picks the grouped matmul (moe_lvlm/models/grouped_matmul.py); `tiled` runs the
    whole FFN in tile space (`tiled_experts`)."""
    act = activation_fn(activation)
    if gmm == "auto":
        gmm = default_grouped_matmul(jax.default_backend())
    if gmm == "tiled":
        return tiled_experts(weights, x, group_sizes, act, gated)
    mm = functools.partial(grouped_matmul, group_sizes=group_sizes, implementation=gmm)
    if gated:
        h = act(mm(x, weights["gate"]))
        h = h * mm(x, weights["up"])
        return mm(h, weights["down"])
    h = mm(x, weights["fc1"]) + weights["fc1_bias"][group_ids]
    return mm(act(h), weights["fc2"]) + weights["fc2_bias"][group_ids]


def experts_all_tokens(
    weights: dict[str, Array], x: Array, combine: Array, activation: str, gated: bool
) -> Array:
    """Every expert on every token, weighted: x [..., d], combine [..., E] -> [..., d_out].

    `combine` is zero for the pairs a dispatch would not compute (not chosen, dropped, padding),
    so the result is the routed one (dropless or capacity) with no gather or scatter, at E / k
    times the expert FLOPs. Each expert's weight scales its hidden activations, so the combine
    is part of the down projection: one contraction over (expert, hidden). On the 2-core CPU
    box it is slower than routing even at 4 experts top-2 (benchmarks/RESULTS.md, issue 15)."""
    act = activation_fn(activation)
    c = combine.astype(x.dtype)[..., None]
    if gated:
        h = act(jnp.einsum("...d,edf->...ef", x, weights["gate"]))
        h = h * jnp.einsum("...d,edf->...ef", x, weights["up"])
        return jnp.einsum("...ef,efd->...d", h * c, weights["down"])
    h = act(jnp.einsum("...d,edf->...ef", x, weights["fc1"]) + weights["fc1_bias"])
    out = jnp.einsum("...ef,efd->...d", h * c, weights["fc2"])
    return out + jnp.einsum("...e,ed->...d", combine.astype(x.dtype), weights["fc2_bias"])


def per_expert(expert_ids: Array, weights: Array, num_experts: int) -> Array:
    """[..., k] choice weights -> [..., E], zero for the experts not chosen."""
    onehot = jax.nn.one_hot(expert_ids, num_experts, dtype=weights.dtype)
    return jnp.einsum("...ke,...k->...e", onehot, weights)


def weighted_sum(out: Array, combine: Array) -> Array:
    """[..., k, d] outputs of the choices, [..., k] weights -> [..., d]. Elementwise and a sum
    over k (not an einsum: XLA makes that a batched dot per token, slow on CPU)."""
    return jnp.sum(out * combine.astype(out.dtype)[..., None], axis=-2)


# --------------------------------------------------------------------------- dispatch
def dropless_moe(
    weights: dict[str, Array],
    x: Array,
    expert_ids: Array,
    combine: Array,
    activation: str,
    gated: bool,
    gmm: str = "xla",
) -> Array:
    """x: [T, d]; expert_ids, combine: [T, k]. Every (token, choice) pair is computed."""
    num_experts, k = weights["gate" if gated else "fc1"].shape[0], expert_ids.shape[-1]
    flat_ids = expert_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    sorted_ids = flat_ids[order]
    rows = x[order // k]
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
    out_sorted = experts_grouped(weights, rows, group_sizes, sorted_ids, activation, gated, gmm)
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(*expert_ids.shape, -1)
    return weighted_sum(out, combine)


def capacity_slot_index(
    expert_ids: Array, valid: Array, num_experts: int, cap: int, priority: Array | None = None
) -> tuple[Array, Array, Array]:
    """Where each (token, choice) pair goes and what fills each slot, per group (`priority`:
    `capacity_slots`).

    Returns the flat slot e * cap + c of every pair [G, S, k] (E * cap: dropped), the token that
    fills every slot [G, E * cap] (S: empty) and the kept mask [G, S, k].
    """
    _, seq, k = expert_ids.shape
    slot, kept = capacity_slots(expert_ids, valid, num_experts, cap, priority)
    flat = jnp.where(kept, expert_ids * cap + slot, num_experts * cap)
    token = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[:, None], (seq, k))

    def fill(flat_g: Array) -> Array:  # one group's slots; kept slots are unique
        return jnp.full((num_experts * cap + 1,), seq, jnp.int32).at[flat_g].set(token)

    # vmap, not an explicit group index: the scatter keeps the group as a batch dimension, so a
    # mesh that shards the groups scatters locally (no all-gather of the indices).
    filler = jax.vmap(fill)(flat)
    return flat, filler[:, :-1], kept


def gather_rows(x: Array, index: Array) -> Array:
    """x [G, n, d], index [G, m] in [0, n] -> [G, m, d]; index n reads a zero row."""
    padded = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
    return jnp.take_along_axis(padded, index[..., None], axis=1, mode="promise_in_bounds")


def expert_parallel(fn, mesh: Mesh, num_weights: int):
    """Runs `fn(x [b, E, C, d], *weights [E, ...])`, experts sharded over mesh axis 'expert'.

    Slots go to the experts' devices with all_to_all and come back the same way.
    """

    def body(x, *weights):
        x = jax.lax.all_to_all(x, "expert", split_axis=1, concat_axis=0, tiled=True)
        y = fn(x, *weights)
        return jax.lax.all_to_all(y, "expert", split_axis=0, concat_axis=1, tiled=True)

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(BATCH_AXES), *([P("expert")] * num_weights)),
        out_specs=P(BATCH_AXES),
        check_vma=False,
    )


# --------------------------------------------------------------------------- module
class ExpertWeights(nn.Module):
    """The stacked expert parameters [E, ...], named like the dense FFN they upcycle."""

    num_experts: int
    d_in: int
    hidden_dim: int
    d_out: int
    gated: bool
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self) -> dict[str, Array]:
        e, f = self.num_experts, self.hidden_dim
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=2)
        up_axes, down_axes = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
        if self.gated:
            shapes = {
                "gate": ((e, self.d_in, f), up_axes),
                "up": ((e, self.d_in, f), up_axes),
                "down": ((e, f, self.d_out), down_axes),
            }
        else:
            shapes = {"fc1": ((e, self.d_in, f), up_axes), "fc2": ((e, f, self.d_out), down_axes)}
        weights = {}
        for name, (shape, axes) in shapes.items():
            weights[name] = param_with_axes(self, name, init, shape, axes, self.param_dtype)
            if not self.gated:
                weights[f"{name}_bias"] = param_with_axes(
                    self,
                    f"{name}_bias",
                    nn.initializers.zeros,
                    (e, shape[2]),
                    ("expert", axes[2]),
                    self.param_dtype,
                )
        return weights


class MoeFeedForward(nn.Module):
    """The MoE FFN. x: [batch, seq, d] -> ([batch, seq, d_out], metrics).

    `config` holds the routing fields of moe_lvlm/presets.py:moe_defaults. Expert parameters are
    under `experts/`, named like the dense FFN they upcycle (gate/up/down or fc1/fc2, and
    fc1_bias/fc2_bias) with a leading expert axis; the router kernel [d, E] is `router`.
    """

    config: Any
    hidden_dim: int
    out_dim: int | None = None
    activation: str = "silu"
    gated: bool = True
    mesh: Mesh | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, valid: Array | None = None, train: bool = False):
        cfg = self.config
        batch, seq, d_in = x.shape
        d_out = self.out_dim or d_in
        num_experts, k = cfg.num_experts, cfg.top_k
        if valid is None:
            valid = jnp.ones((batch, seq), bool)
        router = param_with_axes(
            self,
            "router",
            nn.initializers.normal(0.02),
            (d_in, num_experts),
            ("embed", None),
            self.param_dtype,
        )
        logits = jnp.einsum("bsd,de->bse", x.astype(jnp.float32), router.astype(jnp.float32))
        combine_mode = resolve_combine(cfg.get("combine_weights", "auto"), k)
        expert_ids, combine, probs = route(logits, k, self._noise_rng(train), combine_mode)
        combine = combine * valid[..., None]
        self.sow("intermediates", "expert_ids", expert_ids)  # routing analysis only
        weights = ExpertWeights(
            num_experts, d_in, self.hidden_dim, d_out, self.gated, self.param_dtype, name="experts"
        )()
        weights = {name: w.astype(self.dtype) for name, w in weights.items()}
        x = x.astype(self.dtype)
        compute = self._expert_compute(d_in, d_out)

        if cfg.dispatch == "dropless" and compute in ("dense", "native"):
            kept = valid[..., None] & jnp.ones_like(expert_ids, bool)
            if combine_mode == "renorm_kept":
                combine = renorm_over_kept(combine, kept)
            if compute == "native":
                y = self._native(weights, x, expert_ids, combine, kept)
            else:
                y = experts_all_tokens(
                    weights, x, per_expert(expert_ids, combine, num_experts), self.activation,
                    self.gated,
                )
        elif cfg.dispatch == "dropless":
            ep = cfg.get("ep_dispatch", "auto")
            if ep == "auto":
                ep = default_ep_dispatch(jax.default_backend())
            tokens_move = self.mesh is not None and self.mesh.shape["expert"] > 1
            tokens_move = tokens_move and ep != "all_gather"

            def local(x_, ids_, comb_, *w_):
                b_, s_ = x_.shape[:2]
                w_ = dict(zip(weights, w_, strict=True))
                t_ = b_ * s_
                args = (x_.reshape(t_, -1), ids_.reshape(t_, k), comb_.reshape(t_, k))
                if tokens_move:
                    compute = functools.partial(
                        experts_grouped, w_, activation=self.activation, gated=self.gated,
                        gmm=cfg.grouped_matmul,
                    )
                    y_ = dropless_expert_parallel(compute, *args, num_experts, "expert", ep)
                else:
                    y_ = dropless_moe(w_, *args, self.activation, self.gated, cfg.grouped_matmul)
                return y_.reshape(b_, s_, -1)

            if self.mesh is not None:
                # Tokens move: each device holds its experts; else every expert is gathered.
                weight_spec = P("expert") if tokens_move else P()
                local = jax.shard_map(
                    local,
                    mesh=self.mesh,
                    in_specs=(P(BATCH_AXES),) * 3 + (weight_spec,) * len(weights),
                    out_specs=P(BATCH_AXES),
                    check_vma=False,
                )
            kept = valid[..., None] & jnp.ones_like(expert_ids, bool)
            if combine_mode == "renorm_kept":
                combine = renorm_over_kept(combine, kept)
            y = local(x, expert_ids, combine.astype(self.dtype), *weights.values())
        else:
            # Routing groups [G, T]: the sequences, or each batch shard's tokens flattened.
            groups = batch if cfg.get("capacity_group", "sequence") == "sequence" else (
                batch_divisor(self.mesh) if self.mesh is not None else 1)
            if batch % groups:
                raise ValueError(f"batch {batch} does not split into {groups} capacity groups")
            x, expert_ids, combine, valid = (
                a.reshape(groups, batch * seq // groups, *a.shape[2:])
                for a in (x, expert_ids, combine, valid)
            )
            factor = cfg.capacity_factor_train if train else cfg.capacity_factor_eval
            groups_n, tokens = x.shape[:2]
            cap = capacity(tokens, num_experts, k, factor, cfg.get("min_capacity", 0))
            priority = None
            if cfg.get("drop_policy", "position") == "random":
                priority = jax.random.uniform(self._drop_rng(), expert_ids.shape)
            if compute in ("dense", "native"):
                kept = capacity_slots(expert_ids, valid, num_experts, cap, priority)[1]
                if combine_mode == "renorm_kept":
                    combine = renorm_over_kept(combine, kept)
                if compute == "native":
                    y = self._native(weights, x, expert_ids, combine, kept)
                else:
                    gates = per_expert(expert_ids, combine * kept, num_experts)
                    y = experts_all_tokens(weights, x, gates, self.activation, self.gated)
            else:
                y, kept = self._capacity_dispatch(
                    weights, x, expert_ids, combine, valid, cap, priority, combine_mode)
            y, expert_ids, valid, kept = (
                a.reshape(batch, seq, *a.shape[2:]) for a in (y, expert_ids, valid, kept))
        y = nn.with_logical_constraint(y, BATCH_LENGTH_EMBED)
        metrics = self._metrics(logits, probs, expert_ids, valid, kept)
        return y, metrics

    def _capacity_dispatch(self, weights, x, expert_ids, combine, valid, cap, priority,
                           combine_mode):
        """Capacity dispatch of groups x [G, T, d]: (y [G, T, d_out], kept [G, T, k])."""
        groups_n, tokens, d_in = x.shape
        num_experts = self.config.num_experts
        flat, filler, kept = capacity_slot_index(expert_ids, valid, num_experts, cap, priority)
        if combine_mode == "renorm_kept":
            combine = renorm_over_kept(combine, kept)
        xe = gather_rows(x, filler).reshape(groups_n, num_experts, cap, d_in)
        compute = lambda xe_, *w_: experts_dense(  # noqa: E731
            dict(zip(weights, w_, strict=True)), xe_, self.activation, self.gated
        )
        if self.mesh is not None and self.mesh.shape["expert"] > 1:
            compute = expert_parallel(compute, self.mesh, len(weights))
        ye = compute(xe, *weights.values()).reshape(groups_n, num_experts * cap, -1)
        picked = gather_rows(ye, flat.reshape(groups_n, tokens * self.config.top_k))
        picked = picked.reshape(groups_n, tokens, self.config.top_k, -1)
        return weighted_sum(picked, combine.astype(self.dtype)), kept

    def _expert_compute(self, d_in: int, d_out: int) -> str:
        """`moe.expert_compute` with 'auto' resolved: 'native' where the kernel can compute this
        layer (CPU, SwiGLU experts, no expert parallelism), else 'routed'."""
        compute = self.config.get("expert_compute", "auto")
        if compute not in ("auto", "native"):
            return compute
        reason = native_moe.unsupported(self.activation, self.gated, d_in, self.hidden_dim)
        if d_out != d_in:
            reason = f"output width {d_out} differs from input width {d_in}"
        if self.mesh is not None and self.mesh.shape["expert"] > 1:
            reason = "the mesh's expert axis is > 1 (expert parallelism needs the routed path)"
        if compute == "auto":
            # benchmarks/RESULTS.md, seventh session: faster in the CPU step at every shape.
            usable = not reason and jax.default_backend() == "cpu" and native_moe.available()
            return "native" if usable else "routed"
        if reason:
            raise ValueError(f"model.moe.expert_compute='native': {reason}; use 'routed'")
        return compute

    def _native(self, weights, x, expert_ids, combine, kept):
        """The fused C++ experts (moe_lvlm/kernels/native_moe.py) on the kept pairs."""
        ids = jnp.where(kept, expert_ids, -1)
        return native_moe.routed_swiglu(
            x, ids, combine, weights["gate"], weights["up"], weights["down"], self.mesh)

    def _noise_rng(self, train: bool) -> Array | None:
        """Key of the second-choice noise, or None without noise. Outside training without a
        'router' rng (evaluation, generation) 'always' noise is drawn from a key fixed per layer."""
        mode = self.config.get("second_choice_noise", "none")
        mode = {False: "none", True: "train"}.get(mode, mode)  # bool in older workdir configs
        if mode == "none" or (mode == "train" and not train):
            return None
        return self._router_key(0)

    def _drop_rng(self) -> Array:
        """Key of the random token selection (every call, as DeepSpeed's top1gating selects at
        random in evaluation too): the 'router' rng, or without one a key fixed per layer."""
        return self._router_key(1)

    def _router_key(self, stream: int) -> Array:
        """A fresh key of the 'router' rng, or without one a key fixed per layer and stream."""
        if self.has_rng("router"):
            return self.make_rng("router")
        path_hash = zlib.crc32("/".join(self.path).encode()) & 0x7FFFFFFF
        return jax.random.fold_in(jax.random.PRNGKey(stream), path_hash)

    def _metrics(self, logits, probs, expert_ids, valid, kept) -> dict[str, Array]:
        cfg = self.config
        validf = valid.astype(jnp.float32)
        n_pairs = jnp.maximum(jnp.sum(validf) * cfg.top_k, 1.0)
        per_expert = jnp.einsum(
            "bske,bs->e", jax.nn.one_hot(expert_ids, cfg.num_experts, dtype=jnp.float32), validf
        )
        entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-20)), axis=-1)
        return {
            "balance_loss": balance_loss(probs, expert_ids, valid, cfg.balance_counts),
            "z_loss": z_loss(logits, valid),
            "expert_fraction": per_expert / n_pairs,
            # Counted, not 1 - kept / pairs: exactly 0 when nothing is dropped.
            "dropped_fraction": (jnp.sum(validf) * cfg.top_k - jnp.sum(kept.astype(jnp.float32)))
            / n_pairs,
            "router_entropy": jnp.sum(entropy * validf) / jnp.maximum(jnp.sum(validf), 1.0),
        }
