"""A jax.profiler trace of chosen training steps (`config.profile`), for TensorBoard/Perfetto.

The profiler writes local files; a trace for a remote workdir (gs://) is written to a local
temporary folder and uploaded through the path layer when it ends (the profiler's own GCS client
neither reads the project's credentials setup nor a GCS emulator)."""

import shutil
import tempfile

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
        self.local = None  # where the profiler writes: the directory, or a temporary folder
        self.active = False

    def before(self, step: int) -> None:
        if self.first <= step <= self.last and not self.active:
            if paths.is_remote(self.directory):
                self.local = tempfile.mkdtemp(prefix="moe_lvlm_profile_")
            else:
                self.directory.mkdir(parents=True, exist_ok=True)
                self.local = str(self.directory)
            jax.profiler.start_trace(self.local)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            if self.local != str(self.directory):
                paths.upload(self.local, self.directory)
                shutil.rmtree(self.local, ignore_errors=True)
            print(f"profile: trace of steps {self.first}-{self.last} in {self.directory}",
                  flush=True)
