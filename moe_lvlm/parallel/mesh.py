"""The device mesh and the one table of logical-axis rules.

Mesh axes ('data', 'fsdp', 'expert', 'tensor'). The batch is split over data, fsdp and expert;
parameters over fsdp (ZeRO-3 style) and tensor; expert weights [E, d, f] over expert.
"""

from collections.abc import Sequence

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


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of `shape` (sizes in MESH_AXES order) with Auto axis types over `devices`."""
    devices = jax.devices() if devices is None else list(devices)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, got {len(devices)}"
        )
    if len(devices) == jax.device_count() and devices == jax.devices():
        arranged = mesh_utils.create_device_mesh(tuple(shape), devices=devices)
    else:
        arranged = np.asarray(devices).reshape(shape)
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
