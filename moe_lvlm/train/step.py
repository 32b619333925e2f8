"""The pure training step: loss, gradients of the trainable parameters, AdamW update.

State is a dict {'step', 'params', 'opt_state', 'rng'}; `opt_state` covers the trainable
parameters only. Loss = token-mean CE over answer tokens + balance_coef * sum of the layers'
load-balancing losses + z_coef * sum of their z-losses. With gradient accumulation the CE is
still the mean over the whole batch's answer tokens; the router losses (and MoE metrics) are
means over the micro-batches.

A step whose loss or gradient norm is not finite changes nothing but the step counter: params,
optimizer state (so also the schedule's position, as DeepSpeed skips an overflowed step) and RNG
stay as they were, and the metric 'nonfinite' is 1. What happens next is the loop's choice
(`config.nan_policy`).
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_lvlm.kernels import native_lm_loss
from moe_lvlm.models.decoder import head_weights
from moe_lvlm.models.lvlm import moe_loss_sums
from moe_lvlm.parallel.mesh import BATCH_AXES
from moe_lvlm.train.stages import merge, split_trainable

Batch = Mapping[str, jax.Array]
State = dict[str, Any]


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum over masked positions of -log p(target). logits: [batch, seq, vocab], math in fp32."""
    with jax.named_scope("cross_entropy"):  # names the ops in profiles
        return jnp.sum(_nll(logits, targets) * mask)


@jax.custom_vjp
def _nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per position. The backward pass forms softmax - onehot from
    the saved log-sum-exp in one pass over the logits (autodiff of log_softmax and the gather
    makes a scatter and two more passes)."""
    return _nll_fwd(logits, targets)[0]


def _nll_fwd(logits, targets):
    x = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(x, axis=-1)
    picked = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    return lse - picked, (logits, targets, lse)


def _nll_bwd(res, g):
    logits, targets, lse = res
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    onehot = targets[..., None] == jnp.arange(logits.shape[-1], dtype=targets.dtype)
    return ((probs - onehot) * g[..., None]).astype(logits.dtype), None


_nll.defvjp(_nll_fwd, _nll_bwd)


def make_schedule(stage: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    warmup = max(1, round(stage.warmup_fraction * total_steps))
    return optax.warmup_cosine_decay_schedule(
        0.0, stage.lr, warmup, max(total_steps, warmup + 1),
        end_value=stage.lr * stage.final_lr_fraction,
    )


def applied_updates(opt_state: optax.OptState) -> jax.Array:
    """How many updates the optimizer has applied: the schedule's position."""
    return optax.tree_utils.tree_get(
        opt_state, "count", filtering=lambda path, _: path[-1].tuple_name == "ScaleByScheduleState"
    )


def make_optimizer(
    stage: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the stage's schedule."""
    return optax.chain(
        optax.clip_by_global_norm(stage.clip_norm),
        optax.adamw(make_schedule(stage, total_steps), b1=0.9, b2=0.999,
                    weight_decay=stage.weight_decay),
    )


def model_loss(
    params, batch: Batch, rng: jax.Array, *, model, moe_cfg, total_tokens, loss_scale: float,
    packed: bool,
):
    """(scaled loss, metrics) of one (micro-)batch.

    With `model.lm_head_loss` resolving to 'native' the model returns its final hidden states and
    the fused kernel applies the LM head and the cross-entropy without materialising the logits
    (moe_lvlm/kernels/native_lm_loss.py)."""
    cfg = model.config
    native = native_lm_loss.resolve(
        cfg.get("lm_head_loss", "auto"), cfg.decoder.embed_dim, model.mesh) == "native"
    out, moe_metrics = model.apply(
        {"params": params},
        batch["input_ids"],
        batch["positions"],
        batch["segment_ids"],
        batch.get("images"),
        train=True,
        packed=packed,
        rngs={"router": rng},
        return_hidden=native,
    )
    if native:
        head, bias = head_weights(params["decoder"], cfg.decoder)
        mask = batch["loss_mask"].astype(jnp.float32)
        with jax.named_scope("cross_entropy"):
            ce_sum = native_lm_loss.weighted_nll_sum(out, head, bias, batch["targets"], mask,
                                                     model.mesh)
    else:
        ce_sum = token_cross_entropy(out, batch["targets"], batch["loss_mask"])
    balance, z = moe_loss_sums(moe_metrics)
    aux = moe_cfg.balance_loss_coef * balance + moe_cfg.z_loss_coef * z
    loss = ce_sum / total_tokens + loss_scale * aux
    metrics = {"ce_sum": ce_sum, "balance_loss": balance * loss_scale, "z_loss": z * loss_scale}
    for layer, m in moe_metrics.items():
        metrics[f"moe/{layer}/balance_loss"] = m["balance_loss"] * loss_scale
        metrics[f"moe/{layer}/z_loss"] = m["z_loss"] * loss_scale
        metrics[f"moe/{layer}/expert_fraction"] = m["expert_fraction"] * loss_scale
        metrics[f"moe/{layer}/dropped_fraction"] = m["dropped_fraction"] * loss_scale
        metrics[f"moe/{layer}/router_entropy"] = m["router_entropy"] * loss_scale
    return loss, metrics


def microbatches(batch: Batch, accum: int, mesh) -> Batch:
    """[batch, ...] -> [accum, batch/accum, ...]; micro-batch j takes rows j, j+accum, ..."""

    def split(x):
        y = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        if mesh is None:
            return y
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, BATCH_AXES)))

    return jax.tree.map(split, dict(batch))


def train_step(
    state: State,
    batch: Batch,
    *,
    model,
    moe_cfg: ml_collections.ConfigDict,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    trainable: Sequence[str],
    accum: int = 1,
    packed: bool = False,
    mesh=None,
) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer step over `batch` (gradient accumulation over `accum` micro-batches)."""
    params_t, params_f = split_trainable(state["params"], trainable)
    rng, step_rng = jax.random.split(state["rng"])
    total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

    def micro(params_t_, mb, r):
        return model_loss(
            merge(params_t_, params_f), mb, r, model=model, moe_cfg=moe_cfg,
            total_tokens=total_tokens, loss_scale=1.0 / accum, packed=packed,
        )

    grad_fn = jax.value_and_grad(micro, has_aux=True)
    if accum == 1:
        (loss, metrics), grads = grad_fn(params_t, batch, step_rng)
    else:
        def body(carry, inp):
            mb, r = inp
            (l_, m_), g_ = grad_fn(params_t, mb, r)
            acc_l, acc_m, acc_g = carry
            add = functools.partial(jax.tree.map, jnp.add)
            return (acc_l + l_, add(acc_m, m_), add(acc_g, g_)), None

        mbs = microbatches(batch, accum, mesh)
        rngs = jax.random.split(step_rng, accum)
        first = jax.tree.map(lambda x: x[0], mbs)
        metric_shapes = jax.eval_shape(lambda: micro(params_t, first, rngs[0])[1])
        zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, metric_shapes),
                 jax.tree.map(jnp.zeros_like, params_t))
        (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (mbs, rngs))

    grad_norm = optax.global_norm(grads)
    updates, new_opt = optimizer.update(grads, state["opt_state"], params_t)
    new_params_t = optax.apply_updates(params_t, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = {
        "step": state["step"] + 1,
        "params": merge(keep(new_params_t, params_t), params_f),
        "opt_state": keep(new_opt, state["opt_state"]),
        "rng": keep(rng, state["rng"]),
    }
    ce_sum = metrics.pop("ce_sum")
    out = {
        "loss": loss,
        "ce": ce_sum / total_tokens,
        "grad_norm": grad_norm,
        "lr": schedule(applied_updates(state["opt_state"])),
        "loss_tokens": total_tokens,
        "nonfinite": (~finite).astype(jnp.int32),
        **metrics,
    }
    return new_state, out


def jit_train_step(step_fn: Callable, state_shardings, mesh) -> Callable:
    """jit with explicit in/out shardings on the mesh, donating the state."""
    batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
