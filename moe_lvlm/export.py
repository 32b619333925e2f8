"""Export a trained model for PyTorch:

    python -m moe_lvlm.export --workdir=W [--stage=S] [--step=N] [--dtype=bfloat16] --out=DIR

DIR then loads with `transformers.LlavaForConditionalGeneration.from_pretrained(DIR)` and
`AutoProcessor.from_pretrained(DIR)` (docs/interop.md). The checkpoint is the newest of the last
stage that has one, unless --stage/--step say otherwise; a dense (stage I/II) model exports with a
dense text model (llama, qwen2, qwen3), an upcycled (stage III) one with qwen2_moe, qwen3_moe or
mixtral.
"""

from pathlib import Path

from absl import app, flags, logging

from moe_lvlm import cli
from moe_lvlm.interop import hf_export
from moe_lvlm.workdir import load_trained

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding the checkpoints.")
_STAGE = flags.DEFINE_string("stage", None, "Stage to export; default: the last with a checkpoint.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the stage's newest.")
_OUT = flags.DEFINE_string("out", None, "Output directory for the HF model.")
_DTYPE = flags.DEFINE_string(
    "dtype", None, "Weight dtype to write (float32, bfloat16); default: as trained."
)
flags.mark_flags_as_required(["workdir", "out"])


def export_workdir(
    workdir: str | Path,
    out: str | Path,
    stage: str | None = None,
    step: int | None = None,
    dtype: str | None = None,
) -> tuple[Path, str, int]:
    """Exports a workdir's checkpoint to `out`; returns (out, stage, step)."""
    trained = load_trained(workdir, stage=stage, step=step)
    path = hf_export.export(
        trained.params,
        trained.model_config,
        out,
        tokenizer=trained.tokenizer,
        aspect=trained.config.data.aspect,
        dtype=dtype,
        template=trained.config.data.template,
    )
    return path, trained.stage, trained.step


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
    out, stage, step = export_workdir(
        _WORKDIR.value, _OUT.value, _STAGE.value, _STEP.value, _DTYPE.value
    )
    print(
        f"exported {_WORKDIR.value} {stage} step {step} to {out}; in PyTorch: "
        f"LlavaForConditionalGeneration.from_pretrained({str(out)!r})"
    )


if __name__ == "__main__":
    cli.run_absl(main)
