"""Building blocks shared by the vision encoder and the decoder: norms, RoPE, attention, dense FFNs.

Every parameter carries logical axis names (see moe_lvlm/parallel/mesh.py for the rules that map
them onto the device mesh). Parameters are created in `param_dtype` and cast to `dtype` for compute.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_lvlm.kernels import native_moe, native_norm
from moe_lvlm.models import attention, matmul

Array = jax.Array

# Activation logical axes.
BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")
BATCH_LENGTH_HEADS = ("activation_batch", "activation_length", "activation_heads", None)
BATCH_LENGTH_MLP = ("activation_batch", "activation_length", "activation_mlp")


def activation_fn(name: str) -> Callable[[Array], Array]:
    """The FFN activations real checkpoints use (PyTorch/HF semantics)."""
    table = {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "silu": jax.nn.silu,
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(table)}")
    return table[name]


def param_with_axes(module: nn.Module, name: str, init, shape, axes, dtype) -> Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (LLaMA/Qwen): x / rms(x) * scale.

    `implementation` ('auto' | 'xla' | 'native'; `model.rms_norm`): 'native' runs the CPU kernel
    of moe_lvlm/kernels/native_norm.py (same parameter); 'auto' picks it on CPU.
    """

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = "norm"
    implementation: str = "xla"
    mesh: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = param_with_axes(
            self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,), self.param_dtype
        )
        if native_norm.resolve(self.implementation, self.mesh) == "native":
            return native_norm.rms_norm(x, scale, self.eps, self.mesh).astype(self.dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class RMSNormScale(nn.Module):
    """An `RMSNorm`'s scale (same name, init and axes) for a caller that applies the norm itself."""

    axis_name: str = "norm"
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: int) -> Array:
        return param_with_axes(self, "scale", nn.initializers.ones, (features,),
                               (self.axis_name,), self.param_dtype)


class LayerNorm(nn.Module):
    """LayerNorm with bias, statistics in float32 (CLIP/SigLIP, StableLM-2, Phi-2)."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = param_with_axes(
            self, "scale", nn.initializers.ones, (d,), ("norm",), self.param_dtype
        )
        bias = param_with_axes(
            self, "bias", nn.initializers.zeros, (d,), ("norm",), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale + bias).astype(self.dtype)


def rope_frequencies(rotary_dim: int, theta: float) -> Array:
    """RoPE's inverse frequencies [rotary_dim // 2], float32."""
    return 1.0 / (theta ** (jnp.arange(rotary_dim // 2, dtype=jnp.float32) * 2.0 / rotary_dim))


def rope(x: Array, positions: Array, theta: float, fraction: float = 1.0) -> Array:
    """Rotary embedding, HF 'rotate_half' layout. x: [batch, seq, heads, head_dim].

    With `fraction` < 1 only the first int(head_dim * fraction) features rotate (StableLM-2 0.25,
    Phi-2 0.4); the rest pass through unchanged.
    """
    rotary = int(x.shape[-1] * fraction)
    if rotary < x.shape[-1]:
        return jnp.concatenate([rope(x[..., :rotary], positions, theta), x[..., rotary:]], -1)
    half = x.shape[-1] // 2
    inv_freq = rope_frequencies(x.shape[-1], theta)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, half]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def projection_kernel(module: nn.Module, in_shape, features, axes, dtype) -> Array:
    """The 'kernel' parameter of a `Projection` from in_shape onto features."""
    init = nn.initializers.variance_scaling(
        1.0, "fan_in", "normal", in_axis=tuple(range(len(in_shape)))
    )
    return param_with_axes(module, "kernel", init, (*in_shape, *features), axes, dtype)


class ProjectionKernel(nn.Module):
    """A `Projection`'s kernel (same name, init and axes) for a caller that applies it itself."""

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, in_shape: tuple[int, ...]) -> Array:
        return projection_kernel(self, in_shape, self.features, self.kernel_axes, self.param_dtype)


class Projection(nn.Module):
    """A dense map over the trailing `in_axes` of x onto `features` (DenseGeneral with axes)."""

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    in_dims: int = 1
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = projection_kernel(
            self, x.shape[-self.in_dims :], self.features, self.kernel_axes, self.param_dtype
        )
        y = matmul.dense(x.astype(self.dtype), kernel.astype(self.dtype), self.in_dims)
        if self.use_bias:
            bias = param_with_axes(
                self,
                "bias",
                nn.initializers.zeros,
                self.features,
                self.kernel_axes[self.in_dims :],
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, optional RoPE, qkv bias, qk-norm, KV cache.
    With the 'native' implementation qk-norm and RoPE are applied inside the kernel (not when
    decoding).

    x: [batch, seq, embed]; `segment_ids` [batch, seq] (packing; 0 = padding) confine attention
    to a segment. `implementation`: moe_lvlm/models/attention.py (`splash` is sharded over
    `mesh`). With `decode=True` keys/values are appended to a 'cache' collection of `max_len`
    slots (decoding runs XLA's attention, or cuDNN's); `kv_valid` [batch, seq] marks which new
    slots hold real (non-padding) tokens.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6
    rope_theta: float | None = None
    rotary_fraction: float = 1.0
    implementation: str = "auto"
    mesh: Any = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _proj(self, name, heads, x):
        return Projection(
            (heads, self.head_dim),
            ("embed", "heads" if heads == self.num_heads else "kv_heads", "head_dim"),
            use_bias=self.qkv_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )(x)

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        decode: bool = False,
        max_len: int = 0,
        kv_valid: Array | None = None,
    ) -> Array:
        q = self._proj("q", self.num_heads, x)
        k = self._proj("k", self.num_kv_heads, x)
        v = self._proj("v", self.num_kv_heads, x)
        implementation = attention.resolve(self.implementation, self.dtype, head_dim=q.shape[-1])
        rotary = int(self.head_dim * self.rotary_fraction)
        # The native kernel normalises and rotates q and k as it loads them.
        fused = implementation == "native" and not decode and rotary % 2 == 0
        fused_norm = fused_rope = None
        if self.qk_norm and fused:
            scales = (RMSNormScale("head_dim", self.param_dtype, name=name)(self.head_dim)
                      for name in ("q_norm", "k_norm"))
            fused_norm = (*scales, self.norm_eps)
        elif self.qk_norm:
            norm = dict(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
            q = RMSNorm(**norm, axis_name="head_dim", name="q_norm")(q)
            k = RMSNorm(**norm, axis_name="head_dim", name="k_norm")(k)
        if self.rope_theta is not None and fused:
            fused_rope = (positions, rope_frequencies(rotary, self.rope_theta))
        elif self.rope_theta is not None:
            q = rope(q, positions, self.rope_theta, self.rotary_fraction)
            k = rope(k, positions, self.rope_theta, self.rotary_fraction)
        q = nn.with_logical_constraint(q, BATCH_LENGTH_HEADS)
        if decode:
            k, v, mask = self._update_cache(k, v, kv_valid, max_len)
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask, implementation="cudnn" if implementation == "cudnn" else None
            )
        else:
            out = attention.self_attention(
                q, k, v, segment_ids=segment_ids, causal=self.causal,
                implementation=implementation, mesh=self.mesh, rope=fused_rope,
                qk_norm=fused_norm,
            )
        out = nn.with_logical_constraint(out, BATCH_LENGTH_HEADS)
        return Projection(
            (x.shape[-1],),
            ("heads", "head_dim", "embed"),
            in_dims=2,
            use_bias=self.out_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="o",
        )(out)

    def _update_cache(self, k, v, kv_valid, max_len):
        """Writes new keys/values at the cache index; returns full cache and the [b,1,q,kv] mask."""
        batch, seq = k.shape[:2]
        shape = (batch, max_len, self.num_kv_heads, self.head_dim)
        cached_k = self.variable("cache", "key", jnp.zeros, shape, k.dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, shape, v.dtype)
        cached_valid = self.variable("cache", "valid", jnp.zeros, (batch, max_len), bool)
        index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
        i = index.value
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, i, 0, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, i, 0, 0))
        valid = jnp.ones((batch, seq), bool) if kv_valid is None else kv_valid
        cached_valid.value = jax.lax.dynamic_update_slice(cached_valid.value, valid, (0, i))
        index.value = i + seq
        slots = jnp.arange(max_len)
        query_slots = i + jnp.arange(seq)
        causal = slots[None, :] <= query_slots[:, None]  # [q, kv]
        mask = causal[None] & cached_valid.value[:, None, :]
        return cached_k.value, cached_v.value, mask[:, None]


class DenseFeedForward(nn.Module):
    """Dense FFN: SwiGLU (gate/up/down, no bias) or a two-layer MLP (fc1/fc2 with bias).

    `implementation` ('auto' | 'xla' | 'native'; `model.dense_ffn`): 'native' runs a SwiGLU
    through the fused CPU expert kernel (moe_lvlm/kernels/native_moe.py) with the same
    parameters; 'auto' picks it where it can run.
    """

    hidden_dim: int
    out_dim: int | None = None
    activation: str = "silu"
    gated: bool = True
    use_bias: bool = False
    implementation: str = "xla"
    mesh: Any = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d, f = x.shape[-1], self.hidden_dim
        out_dim = self.out_dim or d
        implementation = native_moe.resolve_dense_ffn(
            self.implementation, self.activation, self.gated, self.use_bias, d, f, out_dim,
            self.mesh,
        )
        if implementation == "native":
            gate, up, down = (
                ProjectionKernel((n,), axes, self.param_dtype, name=name)((m,)).astype(self.dtype)
                for name, m, n, axes in (("gate", d, f, ("embed", "mlp")),
                                         ("up", d, f, ("embed", "mlp")),
                                         ("down", f, d, ("mlp", "embed")))
            )
            return native_moe.dense_swiglu(x.astype(self.dtype), gate, up, down, self.mesh)
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        act = activation_fn(self.activation)
        if self.gated:
            gate = Projection((self.hidden_dim,), ("embed", "mlp"), name="gate", **kw)(x)
            up = Projection((self.hidden_dim,), ("embed", "mlp"), name="up", **kw)(x)
            h = act(gate) * up
            h = nn.with_logical_constraint(h, BATCH_LENGTH_MLP)
            return Projection((out_dim,), ("mlp", "embed"), name="down", **kw)(h)
        h = act(Projection((self.hidden_dim,), ("embed", "mlp"), name="fc1", **kw)(x))
        h = nn.with_logical_constraint(h, BATCH_LENGTH_MLP)
        return Projection((out_dim,), ("mlp", "embed"), name="fc2", **kw)(h)
