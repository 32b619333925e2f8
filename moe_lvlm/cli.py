"""How every `python -m moe_lvlm.*` command ends on a user mistake.

A `UserError` (config, data, workdir or path mistake; `ConfigError`, `DataError` and
`WorkdirError` are ones) prints one line `error: ...` on stderr and exits with code 2, before
or instead of any traceback. `--debug` on the command line (or MOE_LVLM_DEBUG=1) shows the
traceback of user errors too. Any other exception is an internal error and keeps its traceback.
"""

import difflib
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

USER_ERROR_EXIT = 2
DEBUG_FLAG = "--debug"
DEBUG_ENV = "MOE_LVLM_DEBUG"


class UserError(Exception):
    """A mistake of the user; the message names what is wrong and what to change."""


def one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def take_debug_flag(argv: Sequence[str]) -> tuple[list[str], bool]:
    """(argv without --debug, whether tracebacks of user errors are wanted)."""
    rest = [a for a in argv if a != DEBUG_FLAG]
    return rest, len(rest) < len(argv) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run(main: Callable[[], Any], debug: bool = False) -> Any:
    """Calls `main`; a UserError becomes `error: ...` on stderr and exit code 2."""
    try:
        return main()
    except UserError as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT) from None


def run_argparse(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> Any:
    """Entry point of an argparse command: `main(argv)` under `run`, `--debug` taken out."""
    argv, debug = take_debug_flag(sys.argv[1:] if argv is None else argv)
    return run(lambda: main(argv), debug)


def run_absl(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)` under `run`; flag mistakes (an unknown `--config.` key included)
    are user errors too."""
    from absl import app, flags  # noqa: PLC0415

    argv, debug = take_debug_flag(sys.argv)

    def parse(args: list[str]) -> list[str]:
        try:
            return flags.FLAGS(args)
        except flags.Error as e:
            text = str(e)
            if "Traceback (most recent call last)" in text:  # a config file that raised
                text = f"{text.split(':', 1)[0]}: " + [
                    line for line in text.splitlines() if line.strip()][-1].strip()
            raise UserError(f"{text} (see --help)") from e
        except (AttributeError, KeyError) as e:
            override = unknown_override(args)
            if override is None:
                raise
            raise UserError(override) from e

    run(lambda: app.run(main, argv=argv, flags_parser=parse), debug)


def unknown_override(argv: Sequence[str]) -> str | None:
    """The message for the first `--config.a.b=v` of `argv` naming no field of the config, with
    the closest field names; None when every override names a field (or no config loaded)."""
    config = _config_file(argv)
    if config is None:
        return None
    for arg in argv:
        m = re.match(r"--config\.([\w.]+)", arg)
        if not m:
            continue
        section, parents = config, []
        for key in m.group(1).split("."):
            if not hasattr(section, "keys") or key not in section:
                where = ".".join(parents) or "the config"
                known = [str(k) for k in section.keys()] if hasattr(section, "keys") else []
                close = difflib.get_close_matches(key, known, 3, 0.6)
                hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                return (f"unknown config key {m.group(1)!r} in {arg!r}: {where} has no field "
                        f"{key!r}{hint}")
            section, parents = section[key], [*parents, key]
    return None


def _config_file(argv: Sequence[str]) -> Any:
    """The config that `--config=FILE.py[:ARG]` in `argv` names, before any override."""
    import importlib.util  # noqa: PLC0415

    values = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    if not values:
        return None
    path, _, arg = values[-1].partition(":")
    spec = importlib.util.spec_from_file_location("_moe_lvlm_config", path)
    if spec is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
