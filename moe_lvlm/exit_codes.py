"""Exit statuses that launchers act on (docs/training.md)."""

# Preempted (SIGTERM or the cloud's preemption notice): every process saved a checkpoint of the
# same step; re-running the same command resumes from it. 75 is EX_TEMPFAIL of sysexits.h.
EXIT_PREEMPTED = 75
