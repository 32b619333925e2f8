"""Train: python -m moe_lvlm.train --config=configs/demo.py --workdir=runs/demo

Runs the stages of `config.stages` in order (`--config.stages=stage3` for one). Re-running the
same command resumes from the last checkpoint, in the right stage, on any mesh and process count.
The workdir may be local or gs://. The config is validated, and checked against the workdir's
config.json (train/resume.py), before anything is written; a user mistake ends with one line
`error: ...` and exit code 2 (`--debug` for the traceback). Preempted (SIGTERM, or the cloud's
notice), every process saves the same step and the command exits with
`exit_codes.EXIT_PREEMPTED` (75).
"""

import json
import sys

from absl import flags, logging
from ml_collections import config_flags

from moe_lvlm import cli, exit_codes, host_memory, paths
from moe_lvlm.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (file.py:arg).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file at INFO
    host_memory.keep_freed_memory()  # before JAX starts its threads
    distributed.initialize_from_env()
    import jax  # noqa: PLC0415  (after the distributed runtime is up)

    from moe_lvlm.config import validate  # noqa: PLC0415
    from moe_lvlm.data import pipeline  # noqa: PLC0415
    from moe_lvlm.interop import hf_import  # noqa: PLC0415
    from moe_lvlm.parallel.mesh import make_mesh  # noqa: PLC0415
    from moe_lvlm.train import loop, resume, vision_pretrain  # noqa: PLC0415

    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    validate(_CONFIG.value, jax.device_count(), overrides)
    cfg, pretrained = hf_import.pretrained_init(_CONFIG.value)
    mesh = make_mesh(validate(cfg, jax.device_count()), num_slices=cfg.mesh.num_slices)
    workdir = paths.path(_WORKDIR.value)
    for line in resume.check_resume(workdir, cfg):
        print(line, flush=True)
    tokenizer = pipeline.load_tokenizer(cfg.data, workdir)
    is_main = jax.process_index() == 0
    if is_main:
        # Written whole (a rename locally; one object upload on GCS): the other processes may be
        # reading the old one in check_resume.
        paths.write_text_atomic(workdir / "config.json", json.dumps(cfg.to_dict(), indent=2))
    print(distributed.device_report(), f"mesh {dict(mesh.shape)}", flush=True)
    if cfg.vision_pretrain.steps > 0 and loop.starts_fresh(cfg, workdir):
        pretrained = {**pretrained, **vision_pretrain.workdir_tower(cfg, workdir, is_main)}
    try:
        loop.run(cfg, workdir, mesh, tokenizer, pretrained or None)
    except loop.NonFiniteLoss as e:
        raise SystemExit(f"stopped (nan_policy='stop'): {e}") from None
    except loop.Preempted as e:
        print(e, flush=True)
        sys.exit(exit_codes.EXIT_PREEMPTED)


if __name__ == "__main__":
    cli.run_absl(main)
