"""The training loop: runs the configured stages in order, each resumable from its checkpoints.

Per stage, top to bottom: model, data, state (fresh / from the `init_from` stage, upcycled /
restored), sharding, jit step, loop with metrics and checkpoints, end-of-stage checkpoint and
plot. A stage whose final checkpoint restores is not run again. Re-running the same command after
a crash restores the newest checkpoint of the stage in progress that restores (parameters,
optimizer state, step, RNG and data iterator position), so the losses continue exactly as if
uninterrupted; newer ones that do not restore are moved aside (train/checkpoint.py).
The mesh and process count may change between runs: the state is restored onto the current
mesh, and with another process count the data position is rebuilt from the step (docs/training.md).
A preemption notice stops every process at the same step with a checkpoint (`preemption`).
"""

import functools
import math
import time
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_lvlm import config as config_lib
from moe_lvlm import paths
from moe_lvlm.cli import UserError
from moe_lvlm.data import pipeline, sources
from moe_lvlm.models.lvlm import build_model
from moe_lvlm.parallel.mesh import batch_divisor, logical_shardings, sharding_context
from moe_lvlm.train import stages as stages_lib
from moe_lvlm.train.checkpoint import StageCheckpoints, abstract_with_shardings, latest_step
from moe_lvlm.train.preemption import Preempted, PreemptionWatch
from moe_lvlm.train.profiling import StepTrace
from moe_lvlm.train.reporting import MetricsWriter, plot_stage, read_metrics
from moe_lvlm.train.step import jit_train_step, make_optimizer, make_schedule, train_step

NAN_POLICIES = config_lib.NAN_POLICIES


class NonFiniteLoss(RuntimeError):
    """Raised under nan_policy='stop'; the state before the bad step is checkpointed."""


class IncompleteStage(UserError):
    """A stage that another one starts from has no final checkpoint that restores."""


def stage_names(cfg: ml_collections.ConfigDict) -> list[str]:
    names = [s.strip() for s in cfg.stages.split(",") if s.strip()]
    missing = [n for n in names if n not in cfg]
    if missing:
        raise ValueError(f"config.stages names {missing}, which have no config section")
    return names


def starts_fresh(cfg: ml_collections.ConfigDict, workdir: paths.PathLike) -> bool:
    """Whether a stage of `cfg` has yet to start with no stage to start from: only such a stage
    takes pretrained parameters."""
    names = stage_names(cfg)
    return any(
        stages_lib.source_stage(cfg, names, name) is None
        and latest_step(paths.path(workdir) / name / "checkpoints") is None
        for name in names
    )


def example_inputs(model_cfg: ml_collections.ConfigDict, batch: int, seq: int, images: int):
    """Zero inputs of the model's shapes (batch: a multiple of the mesh's batch shards)."""
    v = model_cfg.vision
    ids = jnp.zeros((batch, seq), jnp.int32)
    imgs = jnp.zeros((batch, images, v.image_size, v.image_size, 3), jnp.float32)
    return ids, ids, jnp.ones((batch, seq), jnp.int32), imgs


def state_initializer(model, optimizer, patterns, model_cfg, seq: int, images: int,
                      batch: int = 1):
    """rng -> boxed train state (params carry logical axis names). `batch`: rows of the example
    inputs that `model.init` traces, divisible by the mesh's batch shards."""

    def init(rng):
        params_rng, state_rng = jax.random.split(rng)
        inputs = example_inputs(model_cfg, batch, seq, images)
        params = model.init(params_rng, *inputs)["params"]
        trainable, _ = stages_lib.split_trainable(params, patterns)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": optimizer.init(trainable),
            "rng": state_rng,
        }

    return init


def stage_num_steps(cfg: ml_collections.ConfigDict, name: str) -> int:
    """`num_steps`, or with `num_epochs` > 0 the steps that many passes over the mixture take."""
    stage = cfg[name]
    if stage.get("num_epochs", 0) <= 0:
        steps = int(stage.num_steps)
    else:
        mixture = stage.mixture or cfg.data.mixture
        records = sum(
            len(sources.open_source(spec, cfg.data.data_dir))
            for spec, _ in sources.parse_mixture(mixture)
        )
        steps = math.ceil(stage.num_epochs * records / stage.batch_size)
    if steps < 1:
        raise ValueError(f"{name}: {steps} steps; set {name}.num_steps or num_epochs > 0")
    if stage.batch_size % stage.grad_accum:
        raise ValueError(f"{name}.batch_size={stage.batch_size} is not divisible by "
                         f"{name}.grad_accum={stage.grad_accum}")
    return steps


def stage_data_config(cfg, name: str) -> ml_collections.ConfigDict:
    """config.data with the stage's own row length (`{name}.seq_len`, 0 = data.seq_len)."""
    data_cfg = ml_collections.ConfigDict(cfg.data.to_dict())
    data_cfg.seq_len = cfg[name].get("seq_len", 0) or cfg.data.seq_len
    return data_cfg


class StageRunner:
    """Everything one stage needs, built once; `run` trains it to the end and returns params."""

    def __init__(self, cfg, name: str, names: list[str], workdir: paths.PathLike, mesh,
                 tokenizer, encoded_cache: pipeline.EncodedCache | None = None):
        self.cfg, self.name, self.mesh, self.tokenizer = cfg, name, mesh, tokenizer
        self.encoded_cache = encoded_cache  # shared by the stages of a run (data.cache_encoded)
        self.stage = cfg[name]
        self.dir = paths.path(workdir) / name
        self.model_cfg = stages_lib.stage_model(cfg, names, name)
        self.model_cfg.image_token_id = tokenizer.image_token_id
        self.model = build_model(self.model_cfg, mesh)
        self.total_steps = stage_num_steps(cfg, name)
        self.schedule = make_schedule(self.stage, self.total_steps)
        self.optimizer = make_optimizer(self.stage, self.total_steps)
        self.data_cfg = stage_data_config(cfg, name)
        self.images_per_row = cfg.data.max_images_per_row if cfg.data.packing else 1
        init = state_initializer(
            self.model, self.optimizer, self.stage.trainable, self.model_cfg, self.data_cfg.seq_len,
            self.images_per_row, batch_divisor(mesh),
        )
        with sharding_context(mesh):
            boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
        # Unboxed outside the mesh: under it flax would constrain the abstract values' shardings.
        self.shardings = logical_shardings(nn.get_partition_spec(boxed), mesh)
        self.abstract = abstract_with_shardings(nn.meta.unbox(boxed), self.shardings)
        stages_lib.check_patterns(self.abstract["params"], self.stage.trainable, name)
        self._init = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=self.shardings)
        self.ckpt = StageCheckpoints(self.dir / "checkpoints", cfg.checkpoint.max_to_keep,
                                     cfg.checkpoint.async_save)

    def restore(self, data: Any = None) -> tuple[int, dict | None, Any]:
        """(step, state, data) of the newest checkpoint that restores; (0, None, data) when there
        is none. `data` is set to the checkpoint's position; a checkpoint saved by another
        process count (or imported, moe_lvlm.import_checkpoint) holds none for this one, so the
        data restarts at the record the step implies (docs/training.md)."""
        step, state = self.ckpt.restore_newest(self.abstract, data)
        if step is not None and data is not None and not self.ckpt.has_data_position(step):
            record = step * self.stage.batch_size
            data = self.make_data(self.tokenizer, record)
            print(f"{self.name}: checkpoint {step} holds no data position for "
                  f"{jax.process_count()} process(es) (saved by another process count, or "
                  f"imported): data from record {record}", flush=True)
        if step is not None and step > self.total_steps:
            print(f"warning: {self.name} has checkpoint {step}, past the {self.total_steps} "
                  f"steps asked ({self.name}.num_steps); nothing to train in it: it counts as "
                  "complete (raise the steps to train on, or use a new workdir)", flush=True)
        return (0, None, data) if step is None else (step, state, data)

    def final_params(self) -> Any:
        step, state, _ = self.restore()
        if step < self.total_steps:
            raise IncompleteStage(
                f"{self.name} has no final checkpoint (step {self.total_steps}) that restores in "
                f"{self.ckpt.directory} (it has {self.ckpt.manager.all_steps()}); run it first, "
                f"or change the init_from of the stage that starts from it"
            )
        return state["params"]

    def fresh_state(self, init_params: Any | None) -> dict:
        """Initialised state; with `init_params` (a previous stage's, or pretrained ones) every
        parameter they hold is taken from them and dense FFNs become experts (upcycling)."""
        stage_key = zlib.crc32(self.name.encode())  # the same whichever stages are selected
        rng = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), stage_key)
        with sharding_context(self.mesh):
            state = self._init(rng)
        if init_params is not None:
            unused = stages_lib.unused_paths(init_params, state["params"])
            if unused:
                raise ValueError(
                    f"{self.name}: {len(unused)} initial parameters have no place in the model, "
                    f"e.g. {unused[:3]}"
                )
            params = stages_lib.upcycle(
                init_params, state["params"], self.model_cfg.moe.upcycle_noise_std,
                jax.random.fold_in(rng, 1),
            )
            state["params"] = jax.device_put(params, self.shardings["params"])
        return state

    def make_data(self, tokenizer, start_record: int = 0) -> pipeline.DataIterator:
        return pipeline.make_iterator(
            self.data_cfg, self.model_cfg, tokenizer, self.mesh,
            global_batch_size=self.stage.batch_size, mixture=self.stage.mixture or None,
            start_record=start_record, encoded_cache=self.encoded_cache,
        )

    def run(self, init_params: Any | None, data: pipeline.DataIterator, is_main: bool,
            start: int = 0, state: dict | None = None,
            preemption: PreemptionWatch | None = None) -> Any:
        """Trains from `state` at step `start` (a restored checkpoint; None: a fresh state from
        `init_params`) to the end; raises `Preempted` after saving the step where `preemption`
        says to stop."""
        if state is None:
            state = self.fresh_state(init_params)
        else:
            print(f"{self.name}: resuming from checkpoint {start}", flush=True)
        step_fn = functools.partial(
            train_step, model=self.model, moe_cfg=self.model_cfg.moe, optimizer=self.optimizer,
            schedule=self.schedule, trainable=tuple(self.stage.trainable),
            accum=self.stage.grad_accum, packed=self.cfg.data.packing, mesh=self.mesh,
        )
        jitted = jit_train_step(step_fn, self.shardings, self.mesh)
        writer = MetricsWriter(self.dir, self.name, self.total_steps, start, enabled=is_main)
        log_every, save_every = self.cfg.log_every, self.cfg.checkpoint.every
        stop = self.cfg.nan_policy == "stop"
        trace = StepTrace(self.cfg.profile, self.dir.parent / "profile" / self.name)
        tokens, nonfinite, since = 0, jnp.zeros((), jnp.int32), start
        t0 = time.perf_counter()
        with sharding_context(self.mesh):
            for step in range(start + 1, self.total_steps + 1):
                batch = next(data)
                tokens += int(np.prod(batch["input_ids"].shape))
                trace.before(step)
                new_state, metrics = jitted(state, batch)
                trace.after(step, metrics)
                nonfinite = nonfinite + metrics["nonfinite"]
                if stop and int(metrics["nonfinite"]):
                    self._save_before_bad_step(step, new_state, data)
                    raise NonFiniteLoss(
                        f"{self.name}: non-finite loss or gradient at step {step}; the state "
                        f"before it is saved as checkpoint {step - 1} in {self.ckpt.directory}")
                state = new_state
                if step % log_every == 0 or step == self.total_steps:
                    metrics = jax.device_get(metrics)
                    elapsed = time.perf_counter() - t0
                    metrics.update(step_time=elapsed / (step - since),
                                   tokens_per_s=tokens / elapsed,
                                   nonfinite_steps=int(nonfinite), **skipped(data))
                    writer.write(step, metrics)
                    tokens, nonfinite, since = 0, jnp.zeros((), jnp.int32), step
                    t0 = time.perf_counter()
                saved = step % save_every == 0 or step == self.total_steps
                if saved:
                    self.ckpt.save(step, state, data, self.cfg)
                if preemption is not None and preemption.reached():
                    if not saved:
                        self.ckpt.save(step, state, data, self.cfg)
                    trace.close()
                    self.ckpt.wait()
                    writer.close()
                    raise Preempted(self.name, step)
        trace.close()
        self.ckpt.wait()
        writer.close()
        if is_main:
            plot_stage(read_metrics(writer.path), self.dir / "training.png")
        return state["params"]

    def _save_before_bad_step(self, step: int, new_state: dict, data) -> None:
        """A non-finite step changed only the step counter: saved with it set back, the state is
        the one before the step. The data iterator has consumed the bad batch, so a restart
        from this checkpoint trains on the batches after it: a checkpoint of step - 1 already
        there (a regular one, or this policy's after an earlier bad batch) is replaced."""
        self.ckpt.wait()
        if self.ckpt.latest_step() == step - 1:
            self.ckpt.delete(step - 1)
        kept = {**new_state, "step": jnp.asarray(step - 1, jnp.int32)}
        self.ckpt.save(step - 1, kept, data, self.cfg)
        self.ckpt.wait()

    def close(self) -> None:
        self.ckpt.close()


def skipped(data: pipeline.DataIterator) -> dict[str, int]:
    counts = pipeline.skip_counts(data)
    out = {f"skipped/{reason}": n for reason, n in counts.items() if n}
    out["skipped_records"] = sum(n for r, n in counts.items() if r != "truncated")
    return out


def run(cfg: ml_collections.ConfigDict, workdir: paths.PathLike, mesh, tokenizer,
        pretrained: dict | None = None) -> None:
    """Runs every configured stage in order, each from its newest checkpoint or its start.

    `pretrained` (params from `hf_import.pretrained_init`) starts every stage that starts fresh
    (no `init_from` source); dense FFNs it holds become experts where the stage is MoE. Raises
    `Preempted` when a preemption notice stopped training (its checkpoint saved).
    """
    if cfg.nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy={cfg.nan_policy!r}; use one of {NAN_POLICIES}")
    workdir = paths.path(workdir)
    preemption = PreemptionWatch()
    try:
        _run_stages(cfg, workdir, mesh, tokenizer, pretrained, preemption)
    finally:
        preemption.close()


def _run_stages(cfg, workdir, mesh, tokenizer, pretrained, preemption) -> None:
    names = stage_names(cfg)
    is_main = jax.process_index() == 0
    held: dict[str, Any] = {}  # final parameters of the stage just trained, by name
    encoded = pipeline.EncodedCache()
    for i, name in enumerate(names):
        total_steps = stage_num_steps(cfg, name)
        if consumed(cfg, names, i, workdir) and (
                latest_step(workdir / name / "checkpoints") or 0) >= total_steps:
            print(f"{name}: already complete ({total_steps} steps), skipping", flush=True)
            continue
        runner = StageRunner(cfg, name, names, workdir, mesh, tokenizer, encoded)
        try:
            data = runner.make_data(tokenizer)
            start, state, data = runner.restore(data)
            if start >= total_steps:
                print(f"{name}: already complete ({total_steps} steps), skipping", flush=True)
                held = {name: state["params"]}
                continue
            source = stages_lib.source_stage(cfg, names, name)
            init_params = pretrained if source is None else None
            if source is not None and state is None:
                init_params = held.pop(source, None)
                if init_params is None:
                    source_runner = StageRunner(cfg, source, names, workdir, mesh, tokenizer)
                    init_params = source_runner.final_params()
                    source_runner.close()
            held = {name: runner.run(init_params, data, is_main, start, state,
                                     preemption)}
        finally:
            runner.close()


def consumed(cfg: ml_collections.ConfigDict, names: list[str], index: int,
             workdir: paths.PathLike) -> bool:
    """Whether every later stage that starts from stage `names[index]` has started (has a
    checkpoint): its final parameters are then needed by none, and are not read to verify it."""
    later = [n for n in names[index + 1:]
             if stages_lib.source_stage(cfg, names, n) == names[index]]
    return bool(later) and all(latest_step(workdir / n / "checkpoints") is not None
                               for n in later)
