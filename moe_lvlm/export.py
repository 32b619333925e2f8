"""Export a trained model for PyTorch: python -m moe_lvlm.export --workdir=W [--step=N] --out=DIR

DIR then loads with `transformers.LlavaForConditionalGeneration.from_pretrained(DIR)` and
`AutoProcessor.from_pretrained(DIR)` (docs/interop.md). The checkpoint is the latest of the last
stage in W unless --step says otherwise; a dense (stage I/II) model exports with a dense text
model, an MoE (stage III) one with qwen2_moe / qwen3_moe / mixtral.
"""

import tempfile
from pathlib import Path

import ml_collections
from absl import app, flags
from flax import traverse_util

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding the checkpoints.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_OUT = flags.DEFINE_string("out", None, "Output directory for the HF model.")
_DTYPE = flags.DEFINE_string("dtype", None, "Weight dtype to write (float32, bfloat16); "
                             "default: as trained.")
flags.mark_flags_as_required(["workdir", "out"])


def trained_model_config(cfg: ml_collections.ConfigDict, params) -> ml_collections.ConfigDict:
    """The model config the params belong to: MoE if they hold experts, else the dense variant."""
    from moe_lvlm.train import stages  # noqa: PLC0415

    paths = traverse_util.flatten_dict(params, sep="/")
    upcycled = any("/moe/" in p for p in paths)
    return cfg.model if upcycled else stages.dense_variant(cfg.model)


def main(argv: list[str]) -> None:
    del argv
    from moe_lvlm.data import pipeline  # noqa: PLC0415
    from moe_lvlm.interop import hf_export  # noqa: PLC0415
    from moe_lvlm.train.checkpoint import restore_params  # noqa: PLC0415

    cfg, params = restore_params(_WORKDIR.value, step=_STEP.value)
    tokenizer = pipeline.load_tokenizer(cfg.data)
    model_cfg = trained_model_config(cfg, params)
    model_cfg.image_token_id = tokenizer.image_token_id
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "tokenizer.model")
        tokenizer.save(path)
        out = hf_export.export(params, model_cfg, _OUT.value, path, dtype=_DTYPE.value)
    print(f"wrote {out}: LlavaForConditionalGeneration.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    app.run(main)
