"""Run N local processes of one `python -m` module as a multi-process JAX job on CPU.

    python launch/local.py --num-processes=2 --devices-per-process=2 \
        moe_lvlm.train --config=configs/demo.py --workdir=/tmp/moe_lvlm_2proc

Everything after the module name goes to it unchanged. Process i gets
`MOE_LVLM_COORDINATOR=127.0.0.1:<free port>`, `MOE_LVLM_NUM_PROCESSES=N`, `MOE_LVLM_PROCESS_ID=i`
(read by `moe_lvlm.parallel.distributed.initialize_from_env`) and its own K fake CPU devices
(`JAX_PLATFORMS=cpu`, `JAX_NUM_CPU_DEVICES=K`). Output lines are prefixed `[pI]`; if one process
fails the others are stopped, and the exit status is the first failure's. A SIGTERM to this
launcher is forwarded to every process (a preemption: they save the same step and exit with
EXIT_PREEMPTED = 75, which is then this launcher's status too). `--dry-run` prints the commands
instead. From Python (tests): `run_local(module, args, num_processes, ...)`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # moe_lvlm, when run as `python launch/local.py`

from moe_lvlm.exit_codes import EXIT_PREEMPTED  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ProcessResult:
    process_id: int
    returncode: int  # negative: stopped by that signal (another process failed, or timeout)
    output: str  # stdout and stderr, interleaved


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, devices_per_process: int,
                port: int) -> dict[str, str]:
    """The variables that make one process part of the local job."""
    return {
        "MOE_LVLM_COORDINATOR": f"127.0.0.1:{port}",
        "MOE_LVLM_NUM_PROCESSES": str(num_processes),
        "MOE_LVLM_PROCESS_ID": str(process_id),
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": str(devices_per_process),
    }


def command_lines(module: str, args: Sequence[str], num_processes: int,
                  devices_per_process: int, port: int, python: str = "python") -> list[str]:
    """The shell command of each process, as `--dry-run` prints them."""
    return [
        " ".join(f"{k}={shlex.quote(v)}" for k, v in
                 process_env(i, num_processes, devices_per_process, port).items())
        + " " + shlex.join([python, "-m", module, *args])
        for i in range(num_processes)
    ]


def _pump(i: int, stream, chunks: list[str], echo: bool, lock: threading.Lock) -> None:
    for line in stream:
        chunks.append(line)
        if echo:
            with lock:
                sys.stdout.write(f"[p{i}] {line}")
                sys.stdout.flush()


def _signal_all(procs: Sequence[subprocess.Popen], signum: int) -> None:
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                os.killpg(proc.pid, signum)


def _stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_local(module: str, args: Sequence[str] = (), num_processes: int = 2,
              devices_per_process: int = 1, port: int | None = None,
              timeout_s: float | None = None, cwd: str = REPO_ROOT,
              env: Mapping[str, str] | None = None, echo: bool = True) -> list[ProcessResult]:
    """Run the job to the end; one result per process, in process order.

    A failing process stops the others (SIGTERM to their process groups); so does `timeout_s`.
    A process that exits with EXIT_PREEMPTED is not a failure: the others are preempted too and
    are left to save and exit. A SIGTERM to this process (main thread) goes to every process."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(f"num_processes={num_processes} and devices_per_process="
                         f"{devices_per_process} must both be >= 1")
    port = port or free_port()
    base_env = dict(os.environ if env is None else env)
    procs, outputs, pumps = [], [], []
    lock = threading.Lock()
    forward = threading.current_thread() is threading.main_thread()
    previous = (signal.signal(signal.SIGTERM, lambda *_: _signal_all(procs, signal.SIGTERM))
                if forward else None)
    try:
        for i in range(num_processes):
            child_env = {**base_env,
                         **process_env(i, num_processes, devices_per_process, port)}
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args], cwd=cwd, env=child_env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                start_new_session=True)
            procs.append(proc)
            outputs.append([])
            pump = threading.Thread(target=_pump, args=(i, proc.stdout, outputs[i], echo, lock),
                                    daemon=True)
            pump.start()
            pumps.append(pump)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs):
            failed = any(p.poll() not in (None, 0, EXIT_PREEMPTED) for p in procs)
            if failed or (deadline is not None and time.monotonic() > deadline):
                break
            time.sleep(0.05)
    finally:
        if forward:
            signal.signal(signal.SIGTERM, previous)
        for proc in procs:
            _stop(proc)
        for pump in pumps:
            pump.join()
    return [ProcessResult(i, p.returncode, "".join(outputs[i])) for i, p in enumerate(procs)]


def exit_status(results: Sequence[ProcessResult]) -> int:
    """0 if every process succeeded; EXIT_PREEMPTED if every other one was preempted; else the
    first positive failure code (or 1)."""
    codes = [r.returncode for r in results if r.returncode != 0]
    if codes and all(c == EXIT_PREEMPTED for c in codes):
        return EXIT_PREEMPTED
    return next((c for c in codes if c > 0 and c != EXIT_PREEMPTED), 1) if codes else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [options] MODULE [ARGS...]")
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=1,
                        help="fake CPU devices in each process")
    parser.add_argument("--port", type=int, default=None,
                        help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds, then stop all")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("module", help="module run as `python -m MODULE`")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed to the module unchanged")
    opts = parser.parse_args(argv)
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    port = opts.port or free_port()
    if opts.dry_run:
        print("\n".join(command_lines(opts.module, args, opts.num_processes,
                                      opts.devices_per_process, port)))
        return 0
    results = run_local(opts.module, args, opts.num_processes, opts.devices_per_process, port,
                        opts.timeout)
    for r in results:
        print(f"[launch/local.py] process {r.process_id} exited with {r.returncode}",
              file=sys.stderr)
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
