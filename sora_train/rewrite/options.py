"""A re-writer from its option in the config tree (``conf/rewriter/NAME.yaml``) and overrides.

sora-sample and sora-data recaption both take ``--rewriter NAME --rewriter-opt KEY=VALUE``; this
is where that becomes a Rewriter, below both entry layers. Only the ``rewriter`` group of the
packaged config tree is composed.
"""

from __future__ import annotations

from sora_train.utils.errors import SoraError

CONFIG_MODULE = "sora_train.conf"


def rewriter_from_option(name: str | None, overrides: list[str]):
    """``conf/rewriter/NAME.yaml`` with ``KEY=VALUE`` overrides -> a Rewriter (None for no name)."""
    if not name:
        return None
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"rewriter={name}"] + [f"rewriter.{o}" for o in overrides])
    except Exception as e:  # Hydra raises several types; each is a bad option or override here
        raise SoraError(f"--rewriter {name}: {str(e).splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()
    return instantiate(cfg.rewriter)
