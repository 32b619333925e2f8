"""Every knob of a run, with its default. Presets and the demo are small overrides of this.

Sections:
  model   architecture (see configs/models.py for the fields of each part)
  mesh    device mesh sizes over ('data', 'fsdp', 'expert', 'tensor'); -1 takes the rest
  data    input pipeline
  stages  the MoE-tuning stages, run in order (configs/stages.py)
"""

import ml_collections

from configs import models


def mesh_config() -> ml_collections.ConfigDict:
    # num_slices: TPU slices of a multislice job; the data axis spans them (DCN) and must be a
    # multiple of it (moe_lvlm/parallel/mesh.py).
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1, num_slices=1))


def data_config() -> ml_collections.ConfigDict:
    """Input pipeline defaults (moe_lvlm/data; docs/data.md)."""
    return ml_collections.ConfigDict(
        dict(
            # Training sources: 'spec@weight;spec@weight' or a list of (spec, weight). Specs:
            # 'builtin:SPLIT', 'llava:FILE.json?image_root=DIR', 'tfds:NAME?split=train'.
            mixture="builtin:stage3",
            # Held-out source for evaluation (read in order, once).
            eval_source="builtin:test",
            # TFDS data dir: where the built-in dataset is built and TFDS sources are read.
            data_dir="~/tensorflow_datasets",
            # Tokens per row, image tokens included.
            seq_len=128,
            # Chat template: 'vicuna_v1' (LLaVA v1), 'chatml' (Qwen family) or 'plain' (stage I).
            template="vicuna_v1",
            # System prompt; None = the template's default, '' = none.
            system_prompt=ml_collections.FieldReference(None, field_type=str),
            # Tokenizer: SentencePiece *.model, tokenizer.json, *.tiktoken (or a directory holding
            # one; moe_lvlm/data/tokenizer.py); '' = the built-in dataset's tokenizer.
            tokenizer="",
            # Image preprocessing: 'pad' (LLaVA pad-to-square with the mean colour) or 'resize'
            # (CLIP shortest-side resize + centre crop).
            aspect="pad",
            # Pack several samples per row (segment_ids 1..n); else one sample per row.
            packing=False,
            # Images per row when packing (the M of images [B, M, H, W, 3]).
            max_images_per_row=4,
            # Cut over-long samples to seq_len (never inside the image tokens) instead of
            # skipping them as 'too_long'.
            truncate=True,
            # Bad records: 'skip' (count by reason) or 'strict' (raise naming the record).
            bad_records="skip",
            # This many skipped records in a row stop the run with an error naming the source,
            # the reasons and the first records (e.g. a wrong image_root skips every record).
            max_consecutive_skips=2000,
            # Shuffle training sources (each with a seed derived from `seed`).
            shuffle=True,
            # Worker processes for decoding/batching (0 = in the main process).
            num_workers=0,
            # Threads reading and encoding records in each process.
            read_threads=2,
            # Batches buffered ahead per worker (or by a thread when num_workers=0).
            prefetch=2,
            # Keep every encoded record (token ids, preprocessed image) in memory after its first
            # use, per process and source (shared by the stages of a run): for small datasets
            # trained for several epochs (the demo); memory grows to the sources' size, with
            # images as float32.
            cache_encoded=False,
            seed=0,
        )
    )


def get_base_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = models.tiny()
    # Pretrained HF directories for the stages that start fresh ('' = random init): a dense
    # LLaMA/Qwen2/Qwen3/Mistral LLM and a CLIP/SigLIP vision tower (docs/interop.md).
    cfg.init = ml_collections.ConfigDict(dict(llm="", vision=""))
    # Supervised pre-training of the fresh vision tower on the built-in scenes before the stages
    # (the CPU demo's stand-in for a pretrained CLIP; moe_lvlm/train/vision_pretrain.py).
    # 0 steps = off; it cannot be combined with init.vision.
    cfg.vision_pretrain = ml_collections.ConfigDict(
        dict(steps=0, batch_size=64, lr=1e-3, seed=0, eval_scenes=500)
    )
    cfg.mesh = mesh_config()
    cfg.data = data_config()
    # Seeds parameter initialisation (per stage) and the training RNG (router noise).
    cfg.seed = 0
    # Comma-separated stage sections to run, in order (configs/stages.py).
    cfg.stages = ""
    # Metrics (console, metrics.jsonl, TensorBoard) every this many steps and at a stage's end.
    cfg.log_every = 10
    # 'skip': a non-finite loss or gradient leaves params, optimizer state and RNG unchanged
    # and training goes on (counted as nonfinite_steps); 'stop': checkpoint the state before
    # that step and stop with its number.
    cfg.nan_policy = "skip"
    # A jax.profiler trace of steps [start_step, start_step + num_steps) of every stage, written
    # to {workdir}/profile/{stage} (TensorBoard's profile plugin or Perfetto). 0 steps = off.
    cfg.profile = ml_collections.ConfigDict(dict(start_step=2, num_steps=0))
    cfg.checkpoint = ml_collections.ConfigDict(
        dict(
            # Save every this many steps and at the end of each stage.
            every=200,
            # Newest checkpoints kept per stage (the final one of a finished stage stays).
            max_to_keep=2,
            # Write in a background thread while training goes on.
            async_save=True,
        )
    )
    return cfg
