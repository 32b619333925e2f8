"""The training loop: runs the configured stages in order, each resumable from its checkpoints.

Per stage, top to bottom: model, data, state (fresh / previous stage / upcycled / restored),
sharding, jit step, loop with metrics and checkpoints, end-of-stage checkpoint and plot.
A stage whose final checkpoint exists is not run again; its parameters seed the next stage.
"""

import functools
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_lvlm.data import pipeline
from moe_lvlm.models.lvlm import build_model
from moe_lvlm.parallel.mesh import LOGICAL_AXIS_RULES, logical_shardings
from moe_lvlm.train import stages as stages_lib
from moe_lvlm.train.checkpoint import StageCheckpoints, abstract_with_shardings
from moe_lvlm.train.reporting import MetricsWriter, plot_stage, read_metrics
from moe_lvlm.train.step import jit_train_step, make_optimizer, make_schedule, train_step


class NonFiniteLoss(RuntimeError):
    """Raised under nan_policy='stop'; the state before the bad step is checkpointed."""


def stage_names(cfg: ml_collections.ConfigDict) -> list[str]:
    names = [s.strip() for s in cfg.stages.split(",") if s.strip()]
    missing = [n for n in names if n not in cfg]
    if missing:
        raise ValueError(f"config.stages names {missing}, which have no config section")
    return names


def example_inputs(model_cfg: ml_collections.ConfigDict, batch: int, seq: int, images: int):
    v = model_cfg.vision
    ids = jnp.zeros((batch, seq), jnp.int32)
    imgs = jnp.zeros((batch, images, v.image_size, v.image_size, 3), jnp.float32)
    return ids, ids, jnp.ones((batch, seq), jnp.int32), imgs


def state_initializer(model, optimizer, patterns, model_cfg, seq: int, images: int):
    """rng -> boxed train state (params carry logical axis names)."""

    def init(rng):
        params_rng, state_rng = jax.random.split(rng)
        params = model.init(params_rng, *example_inputs(model_cfg, 1, seq, images))["params"]
        trainable, _ = stages_lib.split_trainable(params, patterns)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": optimizer.init(trainable),
            "rng": state_rng,
        }

    return init


class StageRunner:
    """Everything one stage needs, built once; `run` trains it to the end and returns params."""

    def __init__(self, cfg, name: str, index: int, names: list[str], workdir: Path, mesh, tokenizer):
        self.cfg, self.name, self.index, self.mesh = cfg, name, index, mesh
        self.stage = cfg[name]
        self.dir = workdir / name
        self.model_cfg = stages_lib.stage_model_config(cfg, names, index)
        self.model_cfg.image_token_id = tokenizer.image_token_id
        self.model = build_model(self.model_cfg, mesh)
        self.total_steps = int(self.stage.num_steps)
        self.schedule = make_schedule(self.stage, self.total_steps)
        self.optimizer = make_optimizer(self.stage, self.total_steps)
        self.images_per_row = cfg.data.max_images_per_row if cfg.data.packing else 1
        init = state_initializer(
            self.model, self.optimizer, self.stage.trainable, self.model_cfg, cfg.data.seq_len,
            self.images_per_row,
        )
        with mesh, nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
            self.shardings = logical_shardings(nn.get_partition_spec(boxed), mesh)
            self.abstract = abstract_with_shardings(nn.meta.unbox(boxed), self.shardings)
        stages_lib.check_patterns(self.abstract["params"], self.stage.trainable, name)
        self._init = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=self.shardings)
        self.ckpt = StageCheckpoints(self.dir / "checkpoints", cfg.checkpoint.max_to_keep,
                                     cfg.checkpoint.async_save)

    def finished(self) -> bool:
        return self.ckpt.latest_step() == self.total_steps

    def final_params(self) -> Any:
        state = self.ckpt.restore(self.total_steps, self.abstract)
        return state["params"]

    def fresh_state(self, previous_params: Any | None) -> dict:
        rng = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), self.index)
        with self.mesh, nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            state = self._init(rng)
        if previous_params is not None:
            params = stages_lib.upcycle(
                previous_params, state["params"], self.model_cfg.moe.upcycle_noise_std,
                jax.random.fold_in(rng, 1),
            )
            state["params"] = jax.device_put(params, self.shardings["params"])
        return state

    def make_data(self, tokenizer) -> pipeline.DataIterator:
        return pipeline.make_iterator(
            self.cfg.data, self.model_cfg, tokenizer, self.mesh,
            global_batch_size=self.stage.batch_size, mixture=self.stage.mixture or None,
        )

    def run(self, previous_params: Any | None, data: pipeline.DataIterator, is_main: bool) -> Any:
        start = self.ckpt.latest_step()
        if start is None:
            state = self.fresh_state(previous_params)
            start = 0
        else:
            state = self.ckpt.restore(start, self.abstract, data)
        step_fn = functools.partial(
            train_step, model=self.model, moe_cfg=self.model_cfg.moe, optimizer=self.optimizer,
            schedule=self.schedule, trainable=tuple(self.stage.trainable),
            accum=self.stage.grad_accum, packed=self.cfg.data.packing, mesh=self.mesh,
        )
        jitted = jit_train_step(step_fn, self.shardings, self.mesh)
        writer = MetricsWriter(self.dir, self.name, self.total_steps, enabled=is_main)
        log_every, save_every = self.cfg.log_every, self.cfg.checkpoint.every
        stop = self.cfg.nan_policy == "stop"
        tokens, t0 = 0, time.perf_counter()
        with self.mesh, nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            for step in range(start + 1, self.total_steps + 1):
                batch = next(data)
                tokens += int(np.prod(batch["input_ids"].shape))
                new_state, metrics = jitted(state, batch)
                if stop and int(metrics["nonfinite"]):
                    # The step left params and optimizer state unchanged: save them as step - 1.
                    if self.ckpt.latest_step() != step - 1:
                        kept = {**new_state, "step": jnp.asarray(step - 1, jnp.int32)}
                        self.ckpt.save(step - 1, kept, data, self.cfg)
                    self.ckpt.wait()
                    raise NonFiniteLoss(
                        f"{self.name}: non-finite loss or gradient at step {step}; the state "
                        f"before it is saved as checkpoint {step - 1} in {self.ckpt.directory}")
                state = new_state
                if step % log_every == 0 or step == self.total_steps:
                    metrics = jax.device_get(metrics)
                    elapsed = time.perf_counter() - t0
                    metrics.update(step_time=elapsed / log_every, tokens_per_s=tokens / elapsed,
                                   **skipped(data))
                    writer.write(step, metrics)
                    tokens, t0 = 0, time.perf_counter()
                if step % save_every == 0 or step == self.total_steps:
                    self.ckpt.save(step, state, data, self.cfg)
        self.ckpt.wait()
        writer.close()
        if is_main:
            plot_stage(read_metrics(writer.path), self.dir / "training.png")
        return state["params"]


def skipped(data: pipeline.DataIterator) -> dict[str, int]:
    counts = pipeline.skip_counts(data)
    out = {f"skipped/{reason}": n for reason, n in counts.items() if n}
    out["skipped_records"] = sum(n for r, n in counts.items() if r != "truncated")
    return out


def run(cfg: ml_collections.ConfigDict, workdir: str | Path, mesh, tokenizer) -> Any:
    """Runs every configured stage in order; returns the last stage's parameters."""
    workdir = Path(workdir)
    names = stage_names(cfg)
    is_main = jax.process_index() == 0
    params = None
    for index, name in enumerate(names):
        runner = StageRunner(cfg, name, index, names, workdir, mesh, tokenizer)
        if runner.finished():
            print(f"{name}: already complete ({runner.total_steps} steps), skipping", flush=True)
            params = runner.final_params()
            continue
        params = runner.run(params, runner.make_data(tokenizer), is_main)
        runner.ckpt.close()
    return params
