"""Preemption: a SIGTERM (or the TPU/GCE preemption notice) stops training at a step that every
process agrees on, after each has saved a checkpoint of it; the command then exits with
`exit_codes.EXIT_PREEMPTED`.

One process: a SIGTERM handler sets a flag, read at each step boundary. Several processes
(jax.distributed): jax's preemption sync manager (on by default) receives the notice (SIGTERM to
any one process, or the cloud's notice) and agrees on a step through the coordination service:
`multihost_utils.reached_preemption_sync_point` is True on every process at that same step.
"""

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):  # noqa: N818  (a stop, not an error)
    """Training stopped for preemption; the checkpoint of `step` of `stage` is saved."""

    def __init__(self, stage: str, step: int):
        super().__init__(f"{stage}: preempted, checkpoint {step} saved; re-run to resume")
        self.stage, self.step = stage, step


class PreemptionWatch:
    """Call `reached()` once per training step on every process, in the same order."""

    def __init__(self):
        self._calls = 0  # a step counter that only grows, across stages
        self._notice = False
        self._previous = None
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self._notice = True

    def reached(self) -> bool:
        """True at the step where every process saves and stops."""
        self._calls += 1
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(self._calls)
        return self._notice

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
