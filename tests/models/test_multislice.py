"""Multislice meshes: the data axis spans the slices (DCN), every other axis stays inside one slice.

CPU devices carry no `slice_index`, so the layout is checked on stand-in device objects (as jax's
mesh_utils groups them: by `slice_index`), against layouts written out by hand."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import base
from moe_lvlm.config import ConfigError, validate
from moe_lvlm.parallel.mesh import device_grid, make_mesh, slice_count


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    slice_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def ids(grid: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda d: d.id)(grid)


def interleaved(n: int, slices: int) -> list[FakeDevice]:
    """Devices listed round-robin over the slices, as a device list need not be sorted."""
    return [FakeDevice(i, i % slices) for i in range(n)]


def test_data_axis_runs_over_slices_outermost():
    grid = device_grid((4, 2, 1, 1), interleaved(8, 2), num_slices=2)
    assert grid.shape == (4, 2, 1, 1)
    # Slice 0 holds devices 0, 2, 4, 6 (data rows 0-1), slice 1 devices 1, 3, 5, 7 (rows 2-3).
    np.testing.assert_array_equal(ids(grid)[..., 0, 0], [[0, 2], [4, 6], [1, 3], [5, 7]])


def test_one_replica_per_slice_keeps_fsdp_and_expert_inside_it():
    grid = device_grid((2, 2, 2, 1), interleaved(8, 2), num_slices=2)
    np.testing.assert_array_equal(ids(grid)[0, ..., 0], [[0, 2], [4, 6]])
    np.testing.assert_array_equal(ids(grid)[1, ..., 0], [[1, 3], [5, 7]])
    grid = device_grid((4, 1, 2, 1), interleaved(8, 4), num_slices=4)
    np.testing.assert_array_equal(ids(grid)[:, 0, :, 0], [[0, 4], [1, 5], [2, 6], [3, 7]])


def test_slice_count():
    assert slice_count(interleaved(8, 4)) == 4
    assert slice_count(jax.devices()) == 1  # no slice_index: one slice


@pytest.mark.parametrize("shape, devices, slices, message", [
    ((1, 8, 1, 1), interleaved(8, 2), 2, r"2 slices must divide the data axis \(size 1\)"),
    ((4, 2, 1, 1), interleaved(8, 4), 2, r"mesh.num_slices=2 but the 8 devices span 4 slice"),
    ((2, 1, 1, 1), [FakeDevice(0, 0), FakeDevice(1, 0)], 2, "span 1 slice"),
])
def test_layout_errors_say_what_to_change(shape, devices, slices, message):
    with pytest.raises(ValueError, match=message):
        device_grid(shape, devices, slices)


def test_single_slice_mesh_is_unchanged():
    devices = jax.devices()[:1]
    mesh = make_mesh((1, 1, 1, 1), devices)
    assert mesh.devices.ravel().tolist() == devices
    with pytest.raises(ValueError, match="2 slices must divide the data axis"):
        make_mesh((1, 1, 1, 1), devices, num_slices=2)


@pytest.mark.parametrize("mesh, slices, ok", [
    (dict(data=-1), 2, True), (dict(data=4, fsdp=2), 4, True), (dict(data=4, fsdp=2), 3, False),
    (dict(data=1, fsdp=-1), 2, False), (dict(data=-1), 0, False)])
def test_config_checks_slices_against_the_data_axis(mesh, slices, ok):
    cfg = base.get_base_config()
    cfg.mesh.update(mesh, num_slices=slices)
    if ok:
        assert validate(cfg, 8)[0] % slices == 0
    else:
        with pytest.raises(ConfigError, match=f"mesh.num_slices={slices} must be >= 1 and divide"):
            validate(cfg, 8)
