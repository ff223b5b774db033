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


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn``; a SoraError becomes ``error: <message>`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SoraError as e:
            die(str(e))
        except KeyboardInterrupt:
            die("interrupted", 130)

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
