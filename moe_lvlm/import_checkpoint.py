"""Import a MoE-LLaVA checkpoint directory (PKU-YuanGroup/MoE-LLaVA layout) into a workdir:

    python -m moe_lvlm.import_checkpoint --src=DIR --workdir=W \
        --config=configs/moe_llava.py:model=stablelm [--tokenizer=FILE] [--vision_config=CLIP_DIR]

The tokenizer is DIR's own (tokenizer.model, else tokenizer.json, else *.tiktoken: StableLM-2 and
Phi-2 ship tokenizer.json, Qwen-1 qwen.tiktoken) unless --tokenizer names one (a file of those
kinds, or a directory holding one). W then holds config.json (the run config with the imported
model; `data.tokenizer` is `{workdir}/<the tokenizer's file>`, so W can move), a copy of the
tokenizer and one checkpoint in the layout `python -m moe_lvlm.train` writes:

  MoE model (config `moe.moe_enable`)  stage3, step 0 (params and a fresh optimizer state):
      evaluate / generate read it, and `train --config=configs/workdir.py:W --workdir=W` runs
      stage III from it (continued MoE-tuning; set the mixture and steps with --config.stage3.*).
  dense model (MoE-LLaVA's stage II)  the final checkpoint of stage2: evaluate / generate /
      export read it, and train runs stage III from it (upcycling into experts).

`--vision_config` is a directory with the image tower's HF config.json when `mm_image_tower` is
not one moe_lvlm/interop/moe_llava.py knows (the weights always come from DIR).
"""

import copy
import json
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (configs/moe_llava.py).")
_SRC = flags.DEFINE_string("src", None, "MoE-LLaVA checkpoint directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir to write (must not hold checkpoints).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "The model's *.model, tokenizer.json or *.tiktoken; default: DIR's."
)
_VISION = flags.DEFINE_string("vision_config", None, "Directory with the tower's config.json.")
flags.DEFINE_bool("debug", False, "Show the traceback of a bad input.")
flags.mark_flags_as_required(["config", "src", "workdir"])


def import_checkpoint(
    src, workdir, cfg, tokenizer_path=None, vision_config=None
) -> tuple[str, int]:
    """Writes the workdir (module docstring); returns (stage, step) of its checkpoint."""
    import jax  # noqa: PLC0415

    from moe_lvlm.config import moe_layer_indices, validate  # noqa: PLC0415
    from moe_lvlm.data import tokenizer as tokenizer_lib  # noqa: PLC0415
    from moe_lvlm.interop import moe_llava  # noqa: PLC0415
    from moe_lvlm.parallel.mesh import make_mesh  # noqa: PLC0415
    from moe_lvlm.train.loop import StageRunner, stage_names  # noqa: PLC0415

    workdir = Path(workdir)
    if any(workdir.glob("stage*/checkpoints")):
        raise FileExistsError(f"{workdir} already holds checkpoints; import into a new workdir")
    model_cfg, params, hf = moe_llava.import_moe_llava(src, vision_config)
    if tokenizer_path is None:
        tokenizer_path = tokenizer_lib.find_in_directory(src)
        if tokenizer_path is None:
            raise ValueError(f"{src} holds no tokenizer (tokenizer.model, tokenizer.json or "
                             "*.tiktoken); pass --tokenizer")
    tokenizer = tokenizer_lib.load(tokenizer_path)
    if tokenizer.vocab_size > model_cfg.decoder.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens (with <image> and the "
            f"chat tokens), more than the model's {model_cfg.decoder.vocab_size} embedding rows"
        )
    cfg = copy.deepcopy(cfg)
    for key in ("dtype", "param_dtype", "remat", "attention"):
        model_cfg[key] = cfg.model[key]
    cfg.model = model_cfg
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(workdir / tokenizer.file_name))
    cfg.data.tokenizer = f"{tokenizer_lib.WORKDIR}/{tokenizer.file_name}"
    cfg.data.aspect = "pad" if hf.get("image_aspect_ratio", "pad") == "pad" else "resize"
    moe = bool(moe_layer_indices(model_cfg.decoder.moe_layers, model_cfg.decoder.num_layers))
    name = "stage3" if moe else "stage2"
    cfg.stages = "stage3" if moe else "stage2,stage3"
    cfg[name].init_from = "none"
    mesh = make_mesh(validate(cfg, jax.device_count()))
    (workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    runner = StageRunner(cfg, name, stage_names(cfg), workdir, mesh, tokenizer)
    try:
        state = runner.fresh_state(params)
        step = 0 if moe else runner.total_steps
        state["step"] = jax.numpy.asarray(step, jax.numpy.int32)
        runner.ckpt.save(step, state, None, cfg)
        runner.ckpt.wait()
    finally:
        runner.close()
    return name, step


def main(argv) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        stage, step = import_checkpoint(
            _SRC.value, _WORKDIR.value, _CONFIG.value, _TOKENIZER.value, _VISION.value
        )
    except (OSError, ValueError) as e:  # a bad directory, config or tokenizer (DESIGN.md 8)
        if flags.FLAGS["debug"].value:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"imported {_SRC.value} into {_WORKDIR.value}: {stage} checkpoint {step}")


if __name__ == "__main__":
    app.run(main)
