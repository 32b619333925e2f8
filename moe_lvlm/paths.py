"""One path layer for every file the project reads or writes: local paths and gs:// alike.

`etils.epath` (what orbax uses) with its fsspec/gcsfs backend for gs://. Never wrap a user path in
`pathlib.Path` (it turns `gs://bucket/run` into a local folder `gs:/bucket/run`): go through `path`.
"""

import os

from etils import epath

PathLike = str | os.PathLike


def is_remote(p: PathLike) -> bool:
    """Whether `p` names an object store (gs://, s3://, ...) rather than a local file."""
    return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
    """`p` as an `epath.Path`: gs:// as such, local paths with `~` expanded and made absolute
    (orbax needs absolute paths)."""
    if is_remote(p):
        return epath.Path(os.fspath(p))
    return epath.Path(os.fspath(p)).expanduser().absolute()


def join(root: PathLike, name: str) -> str:
    """`name` under `root` as a string ('' root: `name` unchanged; absolute or remote `name`:
    itself), e.g. a LLaVA image file name under its image root."""
    if not root or is_remote(name) or os.path.isabs(name):
        return name
    return os.fspath(path(root) / name)


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


def write_bytes(p: PathLike, data: bytes) -> None:
    """Writes `data` to `p`, creating its parent folders."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def write_text(p: PathLike, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def write_text_atomic(p: PathLike, text: str) -> None:
    """Writes `text` to `p` so that a reader sees the old or the new file, never a part: a
    temporary file renamed locally; one object upload (atomic already) on an object store."""
    target = path(p)
    if is_remote(p):
        write_text(target, text)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f"{target.name}.tmp-{os.getpid()}"
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, target)


def cache_dir() -> epath.Path:
    """Local folder for copies of remote data: `$MOE_LVLM_CACHE`, else ~/.cache/moe_lvlm."""
    return path(os.environ.get("MOE_LVLM_CACHE", "~/.cache/moe_lvlm"))


def _filesystem(p: PathLike):
    import fsspec  # noqa: PLC0415

    scheme, _, rest = os.fspath(p).partition("://")
    return fsspec.filesystem(scheme), scheme, rest.strip("/")


def local_copy(folder: PathLike) -> str:
    """A local folder with the files of `folder` (itself when local).

    For readers that only open local files (ArrayRecord's C++ reader under TFDS): the remote
    files are copied under `cache_dir()/remote/<scheme>/<bucket>/...`, each written to a
    temporary name and renamed, so several processes on one host may copy at once; a file
    already there with the same size is not fetched again."""
    if not is_remote(folder):
        return os.fspath(path(folder))
    fs, scheme, rest = _filesystem(folder)
    target = cache_dir() / "remote" / scheme / rest
    for name, info in fs.find(rest, detail=True).items():
        local = target / os.path.relpath(name.strip("/"), rest)
        if local.exists() and local.stat().length == info["size"]:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.parent / f"{local.name}.partial-{os.getpid()}"
        fs.get_file(name, os.fspath(partial))
        os.replace(partial, local)
    return os.fspath(target)


def upload(local_folder: PathLike, folder: PathLike) -> None:
    """Copies the files under `local_folder` to `folder` (remote), keeping relative paths."""
    fs, _, rest = _filesystem(folder)
    root = os.fspath(local_folder)
    for parent, _, files in os.walk(root):
        for name in files:
            relative = os.path.relpath(os.path.join(parent, name), root)
            fs.put_file(os.path.join(parent, name), f"{rest}/{relative}")

