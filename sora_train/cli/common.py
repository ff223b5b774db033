"""What every entry point shares: one-line errors, config pre-validation, instantiation helpers."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

from sora_train.utils.errors import SoraError

CONFIG_MODULE = "sora_train.conf"


def die(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def stop_worker_processes(grace_s: float = 5.0) -> None:
    """Kill this process's multiprocessing children (DataLoader workers) on the way out of a
    failed run. A worker inherits the run's SIGTERM handler, which only notes the signal (so a
    preempted run can save its step first); the terminate multiprocessing sends its daemonic
    children at exit is then ignored, and the exit joins them forever: a run whose loader
    raised printed its error and hung (measured: still alive 40 minutes later)."""
    import multiprocessing

    children = multiprocessing.active_children()
    for p in children:
        p.kill()
    for p in children:
        p.join(timeout=grace_s)


def _worker_message(message: str) -> str:
    """A SoraError raised in a DataLoader worker comes back as "Caught SoraError in DataLoader
    worker process 0." plus the worker's whole traceback; its last line is the message."""
    if not message.startswith("Caught ") or "Original Traceback" not in message:
        return message
    last = [ln for ln in message.splitlines() if ln.strip()][-1].strip()
    prefix = f"{SoraError.__module__}.{SoraError.__name__}: "
    return "data loader worker: " + (last[len(prefix):] if last.startswith(prefix) else last)


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn``; a SoraError becomes ``error: <message>`` on stderr and exit status 2. Any
    failure first stops the worker processes it leaves (:func:`stop_worker_processes`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SoraError as e:
            stop_worker_processes()
            die(_worker_message(str(e)))
        except KeyboardInterrupt:
            stop_worker_processes()
            die("interrupted", 130)
        except BaseException:
            stop_worker_processes()
            raise

    return wrapper


def _hydra_message(e: BaseException) -> str:
    """Hydra/OmegaConf errors span several lines; keep what names the problem."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    first = lines[0]
    detail = next((ln for ln in lines[1:] if ln.startswith(("Key '", "full_key", "Available options"))), "")
    if "Available options" in detail:
        idx = lines.index(detail)
        options = []
        for x in lines[idx + 1 :]:
            if x.startswith("Config search path"):
                break
            options.append(x)
        detail = "available: " + ", ".join(options[:30])
    msg = f"{first} {detail}".strip()
    if first.startswith("Could not override") and not detail:
        msg += " No such option in the config (see `sora-train --cfg job` for the composed config)."
    return msg


def validate_overrides(config_name: str, argv: list[str]) -> None:
    """Compose the config once with the command line's overrides, so an unknown option or a
    typo'd group choice fails in one line before Hydra, Lightning or any data is touched.

    Skipped for multirun (-m): sweep syntax is the sweeper's to parse.
    """
    if any(a in ("-m", "--multirun") for a in argv) or any(a.startswith(("--cfg", "-c", "--help", "-h", "--info", "--hydra-help", "--shell-completion")) for a in argv):
        return
    overrides = [a for a in argv if not a.startswith("-") and not a.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))]
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    try:
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            compose(config_name=config_name, overrides=overrides)
    except Exception as e:  # Hydra raises several types; all are the user's config problem here
        die(f"bad config option: {_hydra_message(e)}")
    finally:
        GlobalHydra.instance().clear()


def run_hydra(task_fn: Callable[[Any], Any], config_name: str) -> None:
    """Run ``task_fn(cfg)`` as a Hydra app over the packaged config tree."""
    import hydra

    validate_overrides(config_name, sys.argv[1:])
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    app = hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=config_name)(one_line_errors(task_fn))
    app()
