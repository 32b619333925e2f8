"""A jax.profiler trace of chosen training steps (`config.profile`), for TensorBoard/Perfetto."""

import jax
import ml_collections

from moe_lvlm import paths


class StepTrace:
    """Traces steps [start_step, start_step + num_steps) of a stage into `directory`
    (num_steps 0: off). Call `before(step)` ahead of a step and `after(step, outputs)` once it
    is dispatched; `close()` ends a trace the stage's end cut short."""

    def __init__(self, cfg: ml_collections.ConfigDict, directory: paths.PathLike):
        self.first = cfg.start_step
        self.last = cfg.start_step + cfg.num_steps - 1 if cfg.num_steps > 0 else -1
        self.directory = paths.path(directory)
        if jax.process_count() > 1:
            self.directory = self.directory / f"process_{jax.process_index()}"
        self.active = False

    def before(self, step: int) -> None:
        if self.first <= step <= self.last and not self.active:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            print(f"profile: trace of steps {self.first}-{self.last} in {self.directory}",
                  flush=True)
