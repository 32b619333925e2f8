"""The device mesh and the one table of logical-axis rules.

Mesh axes ('data', 'fsdp', 'expert', 'tensor'). The batch is split over data, fsdp and expert;
parameters over fsdp (ZeRO-3 style) and tensor; expert weights [E, d, f] over expert. On a TPU
multislice job the data axis spans the slices (DCN): each slice holds whole replicas, so only the
data-parallel gradient reduction crosses the slower network.
"""

import contextlib
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# Logical name -> mesh axes. Parameters first, then activations.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("norm", None),
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def slice_count(devices: Sequence) -> int:
    """How many slices the devices span (distinct `slice_index`; 1 where devices have none)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(shape: Sequence[int], devices: Sequence, num_slices: int = 1) -> np.ndarray:
    """`devices` arranged as `shape` (sizes in MESH_AXES order). With `num_slices` > 1 the data
    axis runs over the slices outermost: data rows [i * d, (i + 1) * d), d = data / num_slices,
    all lie in slice i, each an ICI mesh of (d, fsdp, expert, tensor)."""
    shape = tuple(int(s) for s in shape)
    if num_slices == 1:
        if len(devices) == jax.device_count() and list(devices) == jax.devices():
            return mesh_utils.create_device_mesh(shape, devices=devices)
        return np.asarray(devices).reshape(shape)
    if num_slices < 1 or shape[0] % num_slices:
        raise ValueError(
            f"{num_slices} slices must divide the data axis (size {shape[0]}): each slice holds "
            f"whole data-parallel replicas; set mesh.data to a multiple of {num_slices}"
        )
    found = slice_count(devices)
    if found != num_slices:
        raise ValueError(
            f"mesh.num_slices={num_slices} but the {len(devices)} devices span {found} "
            "slice(s) by their slice_index (a multislice job sets it on TPU)"
        )
    per_slice = (shape[0] // num_slices, *shape[1:])
    dcn = (num_slices,) + (1,) * (len(shape) - 1)
    return mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices=list(devices))


def make_mesh(
    shape: Sequence[int],
    devices: Sequence[jax.Device] | None = None,
    num_slices: int | None = None,
) -> Mesh:
    """A mesh of `shape` (sizes in MESH_AXES order) with Auto axis types over `devices`.
    `num_slices` (config `mesh.num_slices`): None = as many as the devices span."""
    devices = jax.devices() if devices is None else list(devices)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, got {len(devices)}"
        )
    slices = slice_count(devices) if num_slices is None else num_slices
    arranged = device_grid(shape, devices, slices)
    return Mesh(arranged, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch-leading array: axis 0 over data, fsdp and expert."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
    """How many shards the batch is split into."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def logical_shardings(logical_specs, mesh: Mesh):
    """Maps a pytree of logical PartitionSpecs (from `nn.get_partition_spec`) onto `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_AXIS_RULES)


@contextlib.contextmanager
def sharding_context(mesh: Mesh) -> Iterator[None]:
    """The mesh and the rule table, for tracing the model: `jax.set_mesh`, not `with mesh:`,
    whose abstract mesh is empty, so flax's `with_logical_constraint` would drop every
    activation constraint."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield
