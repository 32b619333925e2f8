"""Communication model of the train step: bytes each device sends per step, by collective and by
cause, for a model preset, mesh and batch; the step time split between compute and communication
on a named accelerator; and a check against the collectives of the compiled train step.

    python -m benchmarks.comm_model --preset=moe_llava_1p6bx4 --mesh=fsdp=16,expert=4 \
        --batch=256 --seq=2048 --accelerator=v5p
    python -m benchmarks.comm_model --preset=tiny --mesh=fsdp=2,expert=2,tensor=2 --batch=8 \
        --check          # + the compiled train step on 8 fake CPU devices, side by side
    python -m benchmarks.comm_model --preset=mixtral_8x7b_like --mesh=fsdp=4,expert=8 \
        --batch=32 --seq=4096 --ep-compare   # dropless: weights all-gather vs ragged all-to-all

The model follows what XLA's SPMD partitioner makes of this code (moe_lvlm/parallel/mesh.py
rules), term by term. Mesh axes D (data), F (fsdp), X (expert), T (tensor); each device holds
b = B/(D F X) rows of S tokens. Bytes a device sends with ring algorithms over a group of n:
all-gather (n-1)/n of its result, reduce-scatter (n-1)/n of its input, all-reduce 2(n-1)/n of
its buffer, all-to-all (n-1)/n of its buffer. Causes:
  fsdp_gather       every parameter with a dimension on fsdp is all-gathered over F once a step
                    (its tensor and expert shards stay); with T > 1 XLA gathers the LM head and
                    the projector's fc2 again for the backward pass
  moe_weights       expert weights entering the MoE shard_map: gathered over T and F (each
                    expert stays on its X devices), and with dropless `ep_dispatch=all_gather`
                    over X too (every device holds all experts)
  expert_all_to_all capacity dispatch with X > 1: the [b, E, C, d] slots go to the experts'
                    devices and back, forward and backward: 4 all_to_all over X per MoE layer.
                    Dropless with X > 1 (`ep_dispatch` ragged_a2a, GPU/TPU): the b*S*k rows
                    of d values, of which (X-1)/X leave the device under balanced routing, the
                    same 4 times; a2a_buffer (the CPU default): a fixed [X, b*S*k, d] buffer
                    each time. The int32 counts and offsets exchanged first are not counted
  tensor_forward    all-reduce over T after each row-parallel matmul (attention out, MLP down,
                    fc2; capacity experts when X = 1), and the LM head's log-softmax sums
  tensor_backward   all-reduce over T of the input gradient of each column-parallel matmul (q, k,
                    v, gate, up, fc1, LM head) on blocks the gradient passes through, and of the
                    MoE shard_map inputs, which are replicated over T
  grad_reduce       gradients of trainable parameters, summed over the batch axes that do not
                    shard them: over F on the F-gathered gradient, then over D X on the shard;
                    MoE shard_map weights over D F T (all devices for dropless all_gather).
                    `--backend=cpu` keeps XLA CPU's all-reduce + slice, tpu/gpu count the
                    reduce-scatter those backends make of it
  embed_lookup      token embeddings from the [vocab/T, embed/F] table: with T > 1, a
                    vocab-parallel lookup (all-reduce over T of the [b, S, d] rows) when F = 1,
                    else an all-gather of the table over T; the table's gradient reduction
Not counted: scalar metrics and the loss (a few hundred bytes), `collective-permute`s of tiny
tensors (routers, ids), gathers recomputed under remat, and the rest of the token-embedding
lookup: XLA partitions it with an "involuntary full rematerialization" (its own warning) that
moves [B, S, d/F]-sized rows of the global batch in mesh-dependent ways; `--check` lists those
collectives apart. Parameters are gathered in their stored dtype (float32 in the presets); MoE
layers in the vision tower or projector (CuMo) are not modelled.
"""

import argparse
import collections
import dataclasses
import functools
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")
MESH_AXES = ("data", "fsdp", "expert", "tensor")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """Published peak bf16 FLOP/s and the bandwidth one device sends with in a ring collective:
    both directions of one torus axis on TPU (2 x 100 GB/s of a 200 GB/s bidirectional ICI port),
    NVLink (450 GB/s each way) inside an 8-GPU node and the GPU's 400 Gb/s NIC across nodes."""

    name: str
    flops: float
    ring_bytes_per_s: float
    devices_per_node: int = 0  # > 0: axes that leave a node run at `network_bytes_per_s`
    network_bytes_per_s: float = 0.0


ACCELERATORS = {
    "v5p": Accelerator("TPU v5p (459 TFLOP/s bf16, ICI 1200 GB/s bidirectional, 3D torus)",
                       459e12, 200e9),
    "v6e": Accelerator("TPU v6e (918 TFLOP/s bf16, ICI 800 GB/s bidirectional, 2D torus)",
                       918e12, 200e9),
    "h100": Accelerator("H100 SXM (989 TFLOP/s bf16 dense, NVLink 900 GB/s, 400 Gb/s NIC)",
                        989e12, 450e9, devices_per_node=8, network_bytes_per_s=50e9),
}


@dataclasses.dataclass(frozen=True)
class Term:
    """`count` collectives of `kind` over groups of `group` devices on mesh `axes`, each on a
    buffer of `payload` bytes (an all-gather's result, an all-reduce's operand, an all-to-all's
    operands, a reduce-scatter's input)."""

    cause: str
    kind: str
    payload: float
    group: int
    axes: tuple[str, ...]
    count: int = 1
    what: str = ""

    @property
    def sent(self) -> float:
        """Bytes one device sends for all `count` collectives."""
        return self.count * sent_bytes(self.kind, self.payload, self.group)


def sent_bytes(kind: str, payload: float, group: int) -> float:
    if group <= 1:
        return 0.0
    share = (group - 1) / group
    return {"all-gather": share, "reduce-scatter": share, "all-to-all": share,
            "all-reduce": 2 * share}[kind] * payload


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the model needs: the model config, trainable patterns, mesh sizes, global batch."""

    model: object  # ml_collections.ConfigDict of the model (after stage selection)
    trainable: tuple[str, ...]
    mesh: Mapping[str, int]
    batch: int
    seq: int
    images_per_row: int = 1

    def size(self, *axes: str) -> int:
        return math.prod(self.mesh[a] for a in axes)


def parameters(model_cfg) -> list[tuple[str, tuple[int, ...], tuple]]:
    """(path, shape, mesh axes of each dimension) of every parameter, from shapes only."""
    return _parameters(model_cfg.to_json())


@functools.lru_cache(maxsize=8)
def _parameters(model_json: str) -> list[tuple[str, tuple[int, ...], tuple]]:
    import flax.linen as nn
    import jax
    import ml_collections
    from flax import traverse_util

    from moe_lvlm.models.lvlm import build_model
    from moe_lvlm.parallel.mesh import LOGICAL_AXIS_RULES
    from moe_lvlm.train.loop import example_inputs

    model_cfg = ml_collections.ConfigDict(json.loads(model_json))
    model_cfg.image_token_id = max(model_cfg.image_token_id, 0)
    boxed = jax.eval_shape(
        lambda r: build_model(model_cfg).init(r, *example_inputs(model_cfg, 1, 8, 1)),
        jax.random.PRNGKey(0))["params"]
    specs = nn.get_partition_spec(boxed)
    shapes = nn.meta.unbox(boxed)
    out = []
    flat_specs = traverse_util.flatten_dict(specs, sep="/")
    for path, leaf in traverse_util.flatten_dict(shapes, sep="/").items():
        mesh_spec = nn.logical_to_mesh_axes(flat_specs[path], LOGICAL_AXIS_RULES)
        dims = tuple(() if a is None else (a,) if isinstance(a, str) else tuple(a)
                     for a in tuple(mesh_spec) + (None,) * (len(leaf.shape) - len(mesh_spec)))
        out.append((path, tuple(leaf.shape), dims))
    return out


def _local(shape, dims, mesh) -> int:
    """Elements of one device's shard (ceil per dimension, as XLA pads)."""
    total = 1
    for n, axes in zip(shape, dims, strict=True):
        total *= -(-n // math.prod(mesh[a] for a in axes))
    return total


REGATHERED = re.compile(r"decoder/lm_head|projector/mlp/fc2/kernel")


def ep_dispatch(moe, backend: str, expert_axis: int) -> str | None:
    """How dropless pairs reach their experts (moe_lvlm/models/dropless_ep.py), None when they
    do not move (capacity dispatch, or X = 1)."""
    if moe.dispatch != "dropless" or expert_axis == 1:
        return None
    mode = moe.get("ep_dispatch", "auto")
    if mode == "auto":
        mode = "a2a_buffer" if backend == "cpu" else "ragged_a2a"
    return mode


def parameter_terms(setup: Setup, params, param_bytes: int, backend: str) -> list[Term]:
    """fsdp_gather, moe_weights and grad_reduce terms, one set per parameter."""
    from moe_lvlm.train.stages import is_trainable

    mesh, moe = setup.mesh, setup.model.moe
    f, x = mesh["fsdp"], mesh["expert"]
    # XLA's CPU backend keeps the partitioner's all-reduce + slice; TPU and GPU turn it into a
    # reduce-scatter.
    scatter = "all-reduce" if backend == "cpu" else "reduce-scatter"
    terms = []
    for path, shape, dims in params:
        axes = {a for d in dims for a in d}
        trains = is_trainable(path, setup.trainable)
        local = _local(shape, dims, mesh) * param_bytes
        in_shard_map = "/moe/experts/" in path and (moe.dispatch == "dropless" or x > 1)
        # Dropless without moving tokens takes every expert into its shard_map (P()).
        all_experts = moe.dispatch == "dropless" and ep_dispatch(moe, backend, x) in (
            None, "all_gather")
        if in_shard_map:
            # shard_map in_specs for the weights: P('expert'), or P() with all_experts.
            gathered = ["tensor", "fsdp"] + (["expert"] if all_experts else [])
            size = local
            for a in gathered:
                if a in axes and mesh[a] > 1:
                    size *= mesh[a]
                    terms.append(Term("moe_weights", "all-gather", size, mesh[a], (a,),
                                      what=path))
            if not trains:
                continue
            # The shard_map's transpose sums the weight gradients over every axis that does not
            # split them inside it, then each device keeps its stored shard: on CPU one
            # all-reduce; on TPU/GPU (assumed) a reduce-scatter over the stored shards' axes
            # and an all-reduce of the shard over the rest.
            reduce_over = MESH_AXES if all_experts else ("data", "fsdp", "tensor")
            if backend == "cpu":
                terms.append(Term("grad_reduce", "all-reduce", size, setup.size(*reduce_over),
                                  reduce_over, what=path))
                continue
            stored = tuple(a for a in reduce_over if a in axes)
            rest = tuple(a for a in reduce_over if a not in axes)
            terms.append(Term("grad_reduce", scatter, size, setup.size(*stored), stored,
                              what=path))
            terms.append(Term("grad_reduce", "all-reduce", size / setup.size(*stored),
                              setup.size(*rest), rest, what=path))
            continue
        if "fsdp" in axes and f > 1 and path != "decoder/embedding":  # that one: embed_lookup
            # With T > 1, XLA gathers the layers that end a tensor-parallel section again for
            # the backward pass instead of keeping the forward's copy.
            again = mesh["tensor"] > 1 and REGATHERED.match(path)
            terms.append(Term("fsdp_gather", "all-gather", local * f, f, ("fsdp",),
                              2 if again else 1, path))
        if trains:
            # The embedding's gradient leaves the lookup's transpose (a scatter-add): counted
            # with the lookup.
            cause = "embed_lookup" if path == "decoder/embedding" else "grad_reduce"
            rest = tuple(a for a in ("data", "expert") if a not in axes)
            if "fsdp" in axes:
                terms.append(Term(cause, scatter, local * f, f, ("fsdp",), what=path))
            else:
                rest = tuple(a for a in ("data", "fsdp", "expert") if a not in axes)
            terms.append(Term(cause, "all-reduce", local, setup.size(*rest), rest, what=path))
    return terms


TOWERS = ("vision", "projector", "decoder")


def block_position(path: str) -> tuple[int, float]:
    """Where a parameter's block sits in the forward pass: (tower, layer), with a tower's
    parameters before its blocks (embeddings) at layer -1 and after them (final norm, LM head)
    at infinity."""
    tower, _, rest = path.partition("/")
    if m := re.match(r"layers_(\d+)/", rest):
        return TOWERS.index(tower), int(m.group(1))
    after = tower == "decoder" and rest.startswith(("final_norm", "lm_head"))
    return TOWERS.index(tower), math.inf if after else -1


def activation_terms(setup: Setup, params, backend: str = "tpu") -> list[Term]:
    """tensor_forward, tensor_backward, expert_all_to_all and embed_lookup terms."""
    from moe_lvlm.config import moe_layer_indices, num_image_tokens, num_patches
    from moe_lvlm.models.moe import capacity
    from moe_lvlm.train.stages import is_trainable

    cfg, mesh = setup.model, setup.mesh
    act = BYTES[cfg.dtype]
    t, x, f = mesh["tensor"], mesh["expert"], mesh["fsdp"]
    rows = setup.batch // setup.size("data", "fsdp", "expert")
    dec, vis = cfg.decoder, cfg.vision
    seq, d = setup.seq, dec.embed_dim
    trained = [p for p, _, _ in params if is_trainable(p, setup.trainable)]
    first_trained = min((block_position(p) for p in trained), default=(math.inf, math.inf))

    def backward_into(tower: str, layer: float) -> bool:
        """Whether the gradient reaches the input of that block (something before it trains)."""
        return first_trained < (TOWERS.index(tower), layer)

    terms: list[Term] = []
    tp = ("tensor",)

    def tensor_ar(cause: str, what: str, n_rows: int, tokens: int, width: int, count: int = 1):
        if t > 1:
            terms.append(Term(cause, "all-reduce", n_rows * tokens * width * act, t, tp, count,
                              what))

    # Vision tower (pre-LN ViT): attention out and fc2 reduce forward; q, k, v, fc1 backward.
    images = rows * setup.images_per_row
    tokens_v = num_patches(vis) + int(vis.class_token)
    depth = len({p.split("/")[1] for p, _, _ in params if p.startswith("vision/layers_")})
    for i in range(depth):
        tensor_ar("tensor_forward", f"vision/layers_{i} attn out, fc2", images, tokens_v,
                  vis.width, 2)
        if backward_into("vision", i):
            tensor_ar("tensor_backward", f"vision/layers_{i} q k v fc1 input", images, tokens_v,
                      vis.width, 4)
    # Projector (fc1 column-, fc2 row-parallel) on the image tokens.
    image_tokens = num_image_tokens(cfg)
    tensor_ar("tensor_forward", "projector fc2", images, image_tokens, d)
    if backward_into("projector", -1) and cfg.projector.kind == "mlp2x_gelu":
        tensor_ar("tensor_backward", "projector fc1 input", images, image_tokens, vis.width)
    # Token embeddings from the [vocab/T, embed/F] table: with F = 1 a vocab-parallel lookup
    # (each device looks up its vocab shard, an all-reduce over T sums the rows); with F > 1
    # XLA gathers the table over T first (and then reshards rows: not modelled).
    if t > 1 and f == 1:
        terms.append(Term("embed_lookup", "all-reduce", rows * seq * d * BYTES[cfg.param_dtype],
                          t, tp, what="vocab-parallel lookup"))
    elif t > 1:
        terms.append(Term("embed_lookup", "all-gather", dec.vocab_size * d / f * BYTES[
            cfg.param_dtype], t, tp, what="embedding table over T"))
    # Decoder blocks.
    moe_at = set(moe_layer_indices(dec.moe_layers, dec.num_layers))
    moe = cfg.moe
    for i in range(dec.num_layers):
        name = f"decoder/layers_{i}"
        tensor_ar("tensor_forward", f"{name} attn out", rows, seq, d)
        if backward_into("decoder", i):
            tensor_ar("tensor_backward", f"{name} q k v input", rows, seq, d, 3)
        # The FFN's input gradient is needed when anything before it, its attention included,
        # trains.
        backward = backward_into("decoder", i) or any(
            p.startswith(f"{name}/attn/") or p.startswith(f"{name}/attn_norm")
            for p in trained)
        if i not in moe_at:
            tensor_ar("tensor_forward", f"{name} mlp down", rows, seq, d)
            if backward:
                tensor_ar("tensor_backward", f"{name} gate up input", rows, seq, d, 2)
            continue
        if moe.dispatch == "capacity":
            # Routing groups per device: its rows, or one of all its tokens (batch_shard).
            groups, tokens = ((1, rows * seq) if moe.get("capacity_group") == "batch_shard"
                              else (rows, seq))
            cap = capacity(tokens, moe.num_experts, moe.top_k, moe.capacity_factor_train,
                           moe.get("min_capacity", 0))
            slots = groups * moe.num_experts * cap * d * act
            if x > 1:
                # Forward dispatch and combine; backward the combine's transpose when the
                # experts train, the dispatch's when the input gradient is needed.
                experts_train = any(p.startswith(f"{name}/moe/") for p in trained)
                count = 2 + int(experts_train or backward) + int(backward)
                terms.append(Term("expert_all_to_all", "all-to-all", slots, x, ("expert",),
                                  count, f"{name} dispatch, combine"))
                if backward and t > 1:
                    terms.append(Term("tensor_backward", "all-reduce", slots, t, tp,
                                      what=f"{name} moe slots input"))
            elif t > 1:  # no shard_map: the experts' matmuls are tensor-parallel like an MLP
                terms.append(Term("tensor_forward", "all-reduce", slots, t, tp,
                                  what=f"{name} experts down"))
                if backward:
                    terms.append(Term("tensor_backward", "all-reduce", slots, t, tp, 2,
                                      what=f"{name} experts gate up input"))
        elif moe.dispatch == "dropless":
            if mode := ep_dispatch(moe, backend, x):
                pairs = rows * seq * moe.top_k * d * act
                experts_train = any(p.startswith(f"{name}/moe/") for p in trained)
                count = 2 + int(experts_train or backward) + int(backward)
                if mode != "all_gather":
                    payload = pairs * x if mode == "a2a_buffer" else pairs
                    terms.append(Term("expert_all_to_all", "all-to-all", payload, x, ("expert",),
                                      count, f"{name} pairs there, back ({mode})"))
            if not (backward and t > 1):
                continue
            payload = rows * seq * (d * act + moe.top_k * act)
            terms.append(Term("tensor_backward", "all-reduce", payload, t, tp,
                              what=f"{name} moe tokens and combine weights input"))
    # LM head (vocab on T): log-softmax max and sum, target logit; input gradient.
    if t > 1:
        terms.append(Term("tensor_forward", "all-reduce", rows * seq * 4, t, tp, 3,
                          "log-softmax max, sum, target logit"))
        if backward_into("decoder", math.inf):
            tensor_ar("tensor_backward", "lm_head input", rows, seq, d)
    return terms


def model_terms(setup: Setup, backend: str) -> list[Term]:
    """Every term for `backend` ('cpu', 'tpu' or 'gpu': how gradient reductions lower)."""
    params = parameters(setup.model)
    return (parameter_terms(setup, params, BYTES[setup.model.param_dtype], backend)
            + activation_terms(setup, params, backend))


def totals(terms: Iterable[Term], key: str = "kind") -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for term in terms:
        out[getattr(term, key)] += term.sent
    return dict(out)


# ----------------------------------------------------------------------------- compiled HLO

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
               "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%\S+ = (?P<shape>.+?) (?P<kind>all-gather|reduce-scatter|all-reduce|all-to-all"
    r"|collective-permute)(?:-start)?\((?P<rest>.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class HloCollective:
    kind: str
    payload: int  # bytes of the result (all operands for all-to-all)
    group: int
    op_name: str

    @property
    def sent(self) -> float:
        if self.kind == "collective-permute":
            return 0.0  # re-layouts of tiny tensors; not part of the model (module docstring)
        return sent_bytes(self.kind, self.payload, self.group)


# The token-embedding lookup and the image splice, as XLA partitions them (module docstring).
EMBED_LOOKUP_OP = re.compile(r"decoder/jit\((_take|_where)\)/")


def is_embed_lookup(c: HloCollective) -> bool:
    return bool(EMBED_LOOKUP_OP.search(c.op_name))


def shape_bytes(text: str) -> int:
    """Bytes of the arrays in an HLO shape, e.g. `(f32[2,3]{1,0}, bf16[4])` -> 32."""
    return sum(DTYPE_BYTES[t] * math.prod(int(n) for n in dims.split(",") if n)
               for t, dims in _ARRAY.findall(text) if t in DTYPE_BYTES)


def group_size(attrs: str, num_devices: int) -> int:
    """Devices per replica group, from any of XLA's three spellings of `replica_groups`."""
    if m := re.search(r"replica_groups=\{(\{[\d,]*\})", attrs):
        return len([i for i in m.group(1).strip("{}").split(",") if i]) or num_devices
    if m := re.search(r"replica_groups=\[\d+,(\d+)\]<=", attrs):
        return int(m.group(1))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs):
        sizes = {k.strip("' "): int(v) for k, v in (p.split("=") for p in m.group(1).split(","))}
        return math.prod(sizes[a.strip("' ")] for a in m.group(2).split(","))
    if "replica_groups={}" in attrs:
        return num_devices
    if m := re.search(r"source_target_pairs=(\{\{.*?\}\})", attrs):
        return len(re.findall(r"\{\d+,\d+\}", m.group(1)))
    raise ValueError(f"cannot read the replica groups of: {attrs[:200]}")


def hlo_collectives(hlo: str, num_devices: int) -> list[HloCollective]:
    """Every collective of an HLO module's text (`compiled.as_text()`)."""
    out = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.match(line)
        if m is None:
            continue
        attrs = m.group("rest")
        name = re.search(r'op_name="([^"]*)"', attrs)
        out.append(HloCollective(m.group("kind"), shape_bytes(m.group("shape")),
                                 group_size(attrs, num_devices), name.group(1) if name else ""))
    return out


def compiled_train_step_hlo(setup: Setup, stage) -> str:
    """HLO text of the real train step (moe_lvlm.train.step) compiled for `setup.mesh` on this
    process's devices (e.g. fake CPU devices)."""

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from moe_lvlm.models.lvlm import build_model
    from moe_lvlm.parallel.mesh import BATCH_AXES, logical_shardings, make_mesh, sharding_context
    from moe_lvlm.train import loop
    from moe_lvlm.train.checkpoint import abstract_with_shardings
    from moe_lvlm.train.step import jit_train_step, make_optimizer, make_schedule, train_step

    model_cfg = setup.model.copy_and_resolve_references()
    model_cfg.image_token_id = max(model_cfg.image_token_id, 0)
    mesh = make_mesh([setup.mesh[a] for a in MESH_AXES])
    optimizer = make_optimizer(stage, 10)
    # Shapes and logical axes from a model without the mesh (its shard_maps need whole shards).
    init = loop.state_initializer(build_model(model_cfg), optimizer, setup.trainable, model_cfg,
                                  setup.seq, setup.images_per_row)
    # As moe_lvlm.train.loop does: shapes under the mesh, unboxed outside it.
    with sharding_context(mesh):
        boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = logical_shardings(nn.get_partition_spec(boxed), mesh)
    state = abstract_with_shardings(nn.meta.unbox(boxed), shardings)
    with sharding_context(mesh):
        step = functools.partial(
            train_step, model=build_model(model_cfg, mesh), moe_cfg=model_cfg.moe,
            optimizer=optimizer, schedule=make_schedule(stage, 10), trainable=setup.trainable,
            mesh=mesh)
        rows = NamedSharding(mesh, P(BATCH_AXES))
        b, s, v = setup.batch, setup.seq, model_cfg.vision.image_size
        batch = {k: jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=rows)
                 for k in ("input_ids", "targets", "segment_ids", "positions")}
        batch["loss_mask"] = jax.ShapeDtypeStruct((b, s), jnp.float32, sharding=rows)
        batch["images"] = jax.ShapeDtypeStruct((b, setup.images_per_row, v, v, 3), jnp.float32,
                                               sharding=rows)
        return jit_train_step(step, shardings, mesh).lower(state, batch).compile().as_text()


# ----------------------------------------------------------------------------- time and tables


def axis_bandwidth(acc: Accelerator, mesh: Mapping[str, int], axes: Sequence[str]) -> float:
    """Bytes/s a device sends with over `axes`: the node-external rate on GPUs when the group
    spans nodes (devices fill a node along the innermost mesh axes first)."""
    if not acc.devices_per_node:
        return acc.ring_bytes_per_s
    stride = 1
    span = 1
    for a in reversed(MESH_AXES):
        if a in axes:
            span = stride * mesh[a]
        stride *= mesh[a]
    return acc.ring_bytes_per_s if span <= acc.devices_per_node else acc.network_bytes_per_s


def train_flops(setup: Setup) -> float:
    """Model FLOPs of one step on one device (benchmarks/flops.py convention), with the forward
    counted twice more under full rematerialisation."""
    from benchmarks.flops import param_counts, train_flops_per_step

    shapes = {p: _Shape(s) for p, s, _ in parameters(setup.model)}
    counts = param_counts(_unflatten(shapes), setup.model.moe.top_k, setup.model.moe.num_experts)
    total = train_flops_per_step(counts, setup.model, setup.batch, setup.seq,
                                 setup.images_per_row)["total"]
    if setup.model.remat == "full":
        total *= 8 / 6
    return total / setup.size(*MESH_AXES)


@dataclasses.dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]


def _unflatten(flat: Mapping[str, object]) -> dict:
    from flax import traverse_util

    return traverse_util.unflatten_dict(dict(flat), sep="/")


def step_time(setup: Setup, terms: Sequence[Term], acc: Accelerator) -> dict[str, float]:
    compute = train_flops(setup) / acc.flops
    comm = sum(t.sent / axis_bandwidth(acc, setup.mesh, t.axes) for t in terms)
    return {"compute_s": compute, "comm_s": comm, "serial_s": compute + comm,
            "overlapped_s": max(compute, comm)}


def _mb(x: float) -> str:
    return f"{x / 2**20:10.3f}"


def model_table(terms: Sequence[Term]) -> str:
    """Per-step MiB sent by one device, by cause (rows) and collective (columns)."""
    by = collections.defaultdict(float)
    for t in terms:
        by[(t.cause, t.kind)] += t.sent
    causes = list(dict.fromkeys(t.cause for t in terms))
    lines = [f"{'cause':18s}" + "".join(f"{k:>15s}" for k in KINDS)]
    for c in causes:
        lines.append(f"{c:18s}" + "".join(f"{_mb(by[(c, k)]):>15s}" for k in KINDS))
    total = totals(terms)
    lines.append(f"{'total MiB':18s}" + "".join(f"{_mb(total.get(k, 0)):>15s}" for k in KINDS))
    return "\n".join(lines)


def compare(model: Mapping[str, float], hlo: Mapping[str, float]) -> dict[str, float]:
    """model / HLO bytes per collective kind present in either."""
    out = {}
    for kind in KINDS:
        m, h = model.get(kind, 0.0), hlo.get(kind, 0.0)
        if m or h:
            out[kind] = m / h if h else math.inf
    return out


def check(setup: Setup, stage) -> dict[str, dict[str, float]]:
    """Bytes per device by collective kind: the model (CPU lowering) and the compiled train step
    on this process's devices, each without the token-embedding lookup, which is given apart."""
    terms = model_terms(setup, "cpu")
    hlo = hlo_collectives(compiled_train_step_hlo(setup, stage), setup.size(*MESH_AXES))
    return {
        "model": totals(t for t in terms if t.cause != "embed_lookup"),
        "hlo": totals(c for c in hlo if not is_embed_lookup(c)),
        "model_embed_lookup": totals(t for t in terms if t.cause == "embed_lookup"),
        "hlo_embed_lookup": totals(c for c in hlo if is_embed_lookup(c)),
    }


def check_table(result: Mapping[str, Mapping[str, float]]) -> str:
    lines = [f"{'collective':18s}{'model':>12s}{'HLO':>12s}{'model/HLO':>12s}"]
    for kind, ratio in compare(result["model"], result["hlo"]).items():
        lines.append(f"{kind:18s}{_mb(result['model'].get(kind, 0)):>12s}"
                     f"{_mb(result['hlo'].get(kind, 0)):>12s}{ratio:12.4f}")
    for name in ("model", "hlo"):
        part = {k: v for k, v in result[f"{name}_embed_lookup"].items() if v}
        lines.append(f"embedding lookup, {name}: " + (", ".join(
            f"{k} {_mb(v).strip()}" for k, v in part.items()) or "none") + " MiB")
    return "\n".join(lines)


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=2,expert=2,tensor=2' -> all four axes (unnamed ones 1)."""
    mesh = dict.fromkeys(MESH_AXES, 1)
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in mesh:
            raise ValueError(f"unknown mesh axis {key!r}; use {MESH_AXES}")
        mesh[key] = int(value)
    return mesh


def mixtral_8x7b_like():
    """Mixtral-8x7B's decoder (d 4096, 32 layers, 32 q / 8 kv heads of 128, SwiGLU 14336, vocab
    32000, 8 experts top-2 in every layer) behind MoE-LLaVA's CLIP ViT-L/14-336 tower."""
    from configs import models

    cfg = models.moe_llava_1p6bx4()
    cfg.decoder.update(vocab_size=32000, embed_dim=4096, num_layers=32, num_heads=32,
                       num_kv_heads=8, head_dim=128, mlp_dim=14336, moe_layers="all",
                       rope_theta=1e6, norm_eps=1e-5)
    cfg.moe.update(num_experts=8, top_k=2)
    return cfg


EXTRA_PRESETS = {"mixtral_8x7b_like": mixtral_8x7b_like}


def expert_bytes(terms: Iterable[Term]) -> float:
    """Bytes a device sends for the expert FFNs: weights into the MoE shard_map, their gradient
    reduction, and the pairs' all-to-all."""
    return sum(t.sent for t in terms if t.cause in ("moe_weights", "expert_all_to_all")
               or (t.cause == "grad_reduce" and "/moe/experts/" in t.what))


def ep_compare(preset: str, mesh: Mapping[str, int], batch: int, seq: int,
               stage: str = "stage3", backend: str = "tpu") -> dict[str, float]:
    """Dropless expert bytes per device per step with `all_gather` (tokens stay, weights come)
    and `ragged_a2a` (pairs travel, balanced routing), and the crossover: the tokens per device
    above which moving the tokens sends more than gathering the weights. Both are linear in the
    batch; the crossover solves a0 + a1 B = r0 + r1 B from the values at B and 2B."""
    out: dict[str, float] = {}
    lines = {}
    for mode in ("all_gather", "ragged_a2a"):
        at = [expert_bytes(model_terms(make_setup(preset, mesh, b, seq, stage, "dropless",
                                                  mode)[0], backend)) for b in (batch, 2 * batch)]
        out[mode] = at[0]
        lines[mode] = (2 * at[0] - at[1], (at[1] - at[0]) / batch)  # intercept, slope per row
    (a0, a1), (r0, r1) = lines["all_gather"], lines["ragged_a2a"]
    crossover_rows = (a0 - r0) / (r1 - a1) if r1 > a1 else math.inf
    out["crossover_tokens_per_device"] = crossover_rows * seq / math.prod(mesh.values())
    out["tokens_per_device"] = batch * seq / math.prod(mesh.values())
    return out


def make_setup(preset: str, mesh: Mapping[str, int], batch: int, seq: int, stage: str,
               dispatch: str | None = None, ep: str | None = None):
    """The Setup of `preset` in MoE-LLaVA stage `stage` (its trainable patterns), and the stage."""
    from configs import models, stages
    from moe_lvlm.train.stages import dense_variant

    model = EXTRA_PRESETS[preset]() if preset in EXTRA_PRESETS else models.get(preset)
    if dispatch:
        model.moe.dispatch = dispatch
    if ep:
        model.moe.ep_dispatch = ep
    recipe = stages.moe_llava()
    if not recipe[stage].upcycle:
        model = dense_variant(model)
    rows = mesh["data"] * mesh["fsdp"] * mesh["expert"]
    if batch % rows:
        raise ValueError(f"batch {batch} is not divisible by the {rows} batch shards (D F X)")
    return Setup(model, tuple(recipe[stage].trainable), dict(mesh), batch, seq), recipe[stage]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="configs/models.py preset")
    parser.add_argument("--mesh", default="data=2,expert=4", help="e.g. fsdp=2,expert=2,tensor=2")
    parser.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--stage", default="stage3", choices=("stage1", "stage2", "stage3"))
    parser.add_argument("--dispatch", default=None, choices=("dropless", "capacity"))
    parser.add_argument("--ep-dispatch", default=None,
                        choices=("auto", "all_gather", "ragged_a2a", "a2a_buffer"),
                        help="dropless with expert > 1: how pairs reach their experts")
    parser.add_argument("--accelerator", default="v5p", choices=sorted(ACCELERATORS))
    parser.add_argument("--backend", default=None, choices=("cpu", "tpu", "gpu"),
                        help="reduce-scatter lowering (default: from --accelerator, cpu "
                             "with --check)")
    parser.add_argument("--ep-compare", action="store_true",
                        help="dropless expert bytes: all_gather vs ragged_a2a, and the crossover")
    parser.add_argument("--check", action="store_true",
                        help="compile the train step on fake CPU devices and compare")
    args = parser.parse_args(argv)
    mesh = parse_mesh(args.mesh)
    devices = math.prod(mesh.values())
    if args.check:
        # Before jax starts its backend: one fake CPU device per mesh position.
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax

        jax.config.update("jax_num_cpu_devices", devices)
    if args.ep_compare:
        r = ep_compare(args.preset, mesh, args.batch, args.seq, args.stage,
                       "gpu" if args.accelerator == "h100" else "tpu")
        print(f"{args.preset} {args.stage} dropless, mesh {mesh}, batch {args.batch} x "
              f"{args.seq} ({r['tokens_per_device']:.0f} tokens per device): expert MiB each "
              f"device sends per step\n  all_gather (weights come) {r['all_gather'] / 2**20:10.1f}"
              f"\n  ragged_a2a (tokens go)    {r['ragged_a2a'] / 2**20:10.1f}\n  crossover: "
              f"ragged_a2a sends less below {r['crossover_tokens_per_device']:.0f} tokens per "
              "device")
        return 0
    setup, stage = make_setup(args.preset, mesh, args.batch, args.seq, args.stage, args.dispatch,
                              args.ep_dispatch)
    backend = args.backend or ("cpu" if args.check else
                               "gpu" if args.accelerator == "h100" else "tpu")
    terms = model_terms(setup, backend)
    print(f"{args.preset} {args.stage} ({setup.model.moe.dispatch}), mesh {mesh}, batch "
          f"{args.batch} x {args.seq}: MiB each device sends per step ({backend} lowering)")
    print(model_table(terms))
    acc = ACCELERATORS[args.accelerator]
    times = step_time(setup, terms, acc)
    ms = {k: f"{v * 1e3:.3g} ms" for k, v in times.items()}
    print(f"\n{acc.name}: compute {ms['compute_s']} at peak, communication {ms['comm_s']}; "
          f"step {ms['overlapped_s']} (overlapped) to {ms['serial_s']} (serial)")
    if args.check:
        print(f"\ncompiled train step on {devices} CPU devices, MiB sent per device "
              "(cpu lowering):")
        print(check_table(check(setup, stage)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
