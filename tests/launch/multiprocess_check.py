"""Child program of the multi-process test (run by `launch/local.py`, not collected by pytest).

Each process feeds its own rows of a global batch, a jitted step reduces over the whole batch
across processes, and the process prints one JSON line `RESULT {...}` for the test to check.
"""

import json

from moe_lvlm.parallel import distributed

plan = distributed.initialize_from_env()  # before any other jax call

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

GLOBAL_BATCH, DIM_IN, DIM_OUT = 8, 3, 5


def global_inputs() -> tuple[np.ndarray, np.ndarray]:
    """The global batch x: [8, 3] and weights w: [3, 5]; every process can build them."""
    x = np.arange(GLOBAL_BATCH * DIM_IN, dtype=np.float32).reshape(GLOBAL_BATCH, DIM_IN) / 10
    w = np.linspace(-1, 1, DIM_IN * DIM_OUT, dtype=np.float32).reshape(DIM_IN, DIM_OUT)
    return x, w


def main() -> None:
    x, w = global_inputs()
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    rows = GLOBAL_BATCH // jax.process_count()
    start = jax.process_index() * rows
    local_x = x[start:start + rows]  # this process's share of the batch only
    gx = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("data")), local_x, (GLOBAL_BATCH, DIM_IN))
    gw = jax.device_put(w, NamedSharding(mesh, P()))
    step = jax.jit(lambda x, w: jnp.mean(jnp.tanh(x @ w), axis=0),
                   out_shardings=NamedSharding(mesh, P()))
    out = step(gx, gw)
    print("RESULT " + json.dumps({
        "mode": plan.mode,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
        "local_rows": local_x.shape[0],
        "is_main": distributed.is_main_process(),
        "report": distributed.device_report(),
        "value": np.asarray(out).tolist(),
    }), flush=True)


if __name__ == "__main__":
    main()
