"""Every option of every config group composes, and instantiates to its class.

Options that need an outside resource are instantiated where that resource is built for real:
the Hugging Face text encoders and re-writer in tests/models/test_text.py and
tests/rewrite/test_rewriter.py (tiny models saved to a temp dir), the GPU trainer only on a
GPU. Here they must still compose and name an importable class.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf, open_dict

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "local")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]

# Values a real run supplies on the command line.
REQUIRED = {
    ("text", "hf_t5"): ["text.path=/models/t5"],
    ("text", "hf_clip"): ["text.path=/models/clip"],
    ("rewriter", "openai"): ["rewriter.model=local-llm"],
    ("rewriter", "hf"): ["rewriter.path=/models/llm"],
    ("data", "shards"): ["data.train_shards=/data/shards"],
    ("data", "latents"): ["data.train_shards=/data/latents"],
    ("experiment", "finetune_full"): ["init_from=/runs/dit/export", "data.train_shards=/data/shards"],
    ("experiment", "finetune_lora"): ["init_from=/runs/dit/export", "data.train_shards=/data/shards"],
    ("experiment", "pretrain_100M"): ["text.path=/models/t5", "data.train_shards=/data/shards"],
    ("experiment", "pretrain_1B"): ["text.path=/models/t5", "data.train_shards=/data/shards"],
    ("experiment", "vae_standard"): ["data.train_shards=/data/shards"],
    ("experiment", "wan_lora"): ["pretrained=/models/Wan2.1-T2V-1.3B-Diffusers", "data.train_shards=/data/shards"],
}
EXTERNAL = {("text", "hf_t5"), ("text", "hf_clip"), ("rewriter", "hf"), ("trainer", "gpu")}


def _compose(overrides: list[str], return_hydra_config: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sora_train.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=return_hydra_config)
    GlobalHydra.instance().clear()
    return cfg


def test_every_group_has_options():
    for g in ("task", "vae", "dit", "text", "rewriter", "diffusion", "data", "trainer", "strategy", "logger", "callbacks", "launcher", "experiment", "hparams_search"):
        assert g in GROUPS and list((CONF / g).glob("*.yaml")), g


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}", f"run_dir={tmp_path}", f"paths.data_dir={tmp_path}"] + REQUIRED.get((group, option), [])
    cfg = _compose(overrides, return_hydra_config=group in ("launcher", "hparams_search"))
    if group in ("launcher", "hparams_search"):
        # Hydra-level overlays: the launcher/sweeper they select must be an importable plugin.
        for node in ("launcher", "sweeper"):
            target = cfg.hydra[node].get("_target_")
            assert target and get_class(target)
        return
    if group == "experiment":
        _check_experiment(cfg, tmp_path)
        return
    node = cfg[group]
    if (group, option) in EXTERNAL:
        assert get_class(node._target_)
        return
    if group in ("logger", "callbacks"):
        for name, sub in node.items():
            if sub is not None:
                assert instantiate(sub) is not None, name
        return
    if group == "task":
        from sora_train.cli.build import build_module

        module = build_module(cfg)  # the task's LightningModule with every part built
        assert isinstance(module, get_class(node._target_))
        return
    obj = instantiate(node)
    if group == "dit":
        with torch.device("meta"):  # 1B/3B sizes: no memory
            model = obj(in_channels=4, text_dim=32)
        assert model.num_params() > 0
    elif group in ("optimizer", "scheduler"):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
        made = obj([torch.nn.Parameter(torch.zeros(2))]) if group == "optimizer" else obj(opt)
        assert made is not None
    else:
        assert obj is not None


def _check_experiment(cfg, tmp_path):
    """An experiment composes, its data module builds and its model's parts instantiate."""
    from sora_train.cli.build import is_vae_config

    assert instantiate(cfg.data) is not None
    if is_vae_config(cfg):
        vae = instantiate(cfg.vae)
        assert vae.num_params() > 0
        return
    with torch.device("meta"):
        dit = instantiate(cfg.dit)(in_channels=16, text_dim=64)
    assert dit.num_params() > 0
    assert instantiate(cfg.diffusion) is not None


def test_unknown_option_is_one_line_error(capsys):
    from sora_train.cli.common import validate_overrides

    with pytest.raises(SystemExit) as e:
        validate_overrides("train", ["experiment=demo", "trainer.max_stepz=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bad config option") and "max_stepz" in err and "\n" not in err
    with pytest.raises(SystemExit):
        validate_overrides("train", ["dit=2B"])
    err = capsys.readouterr().err.strip()
    assert "dit/2B" in err and "1B" in err and "\n" not in err


def _documented_overrides() -> list[list[str]]:
    """The `sora-train ...` lines of the bash blocks in docs/configs.md, as override lists."""
    import re
    import shlex

    text = (CONF.parent / "docs" / "configs.md").read_text(encoding="utf-8")
    lines = [ln for block in re.findall(r"```bash\n(.*?)```", text, re.S) for ln in block.splitlines()]
    return [shlex.split(ln)[1:] for ln in lines if ln.startswith("sora-train ")]


def test_documented_overrides_compose():
    """docs/configs.md's examples are plain overrides that do what the text says they do."""
    runs = _documented_overrides()
    assert len(runs) >= 8
    for overrides in runs:
        cfg = _compose(overrides)
        if "dit=1B" in overrides:
            with torch.device("meta"):
                dit = instantiate(cfg.dit)(in_channels=16, text_dim=64)
            hidden = 1024 if "dit.hidden_size=1024" in overrides else 1536  # null: the size's own
            assert dit.hidden_size == hidden, overrides
        if any(o.startswith("data.caption_probs=") for o in overrides):  # complete: nothing merged in
            assert dict(cfg.data.caption_probs) == {"rewritten": 0.8, "original": 0.2, "dense": 0}
        if any(o.startswith("task.conditioning.weights=") for o in overrides):
            assert {k: v for k, v in cfg.task.conditioning.weights.items() if v} == {"t2v": 1.0}


def test_dict_options_name_every_key():
    """A dict override merges, so the dict options whose keys are alternatives list them all:
    a plain override naming every key then replaces the whole distribution."""
    sources = {"original", "dense", "rewritten"}
    for option in ("shapes", "shards"):
        assert set(_compose([f"data={option}"] + REQUIRED.get(("data", option), [])).data.caption_probs) == sources, option
    for name in ("finetune_full", "shapes_quality"):  # experiments that pick one source
        cfg = _compose([f"experiment={name}"] + REQUIRED.get(("experiment", name), []))
        assert {k for k, v in cfg.data.caption_probs.items() if v} == {"original"}, name


def test_saved_config_holds_no_secret(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-should-never-appear")
    cfg = _compose(["rewriter=openai", "rewriter.model=m"])
    assert "sk-test" not in OmegaConf.to_yaml(cfg)
    with open_dict(cfg):
        assert cfg.rewriter.api_key_env == "OPENAI_API_KEY"


def test_export_rebuilds_with_the_paths_the_run_resolved(monkeypatch, tmp_path):
    """vae_ckpt: ${oc.env:SORA_QUALITY_DIR,...}/vae/export must mean, to sora-export, what it
    meant in training, whatever the variable is (or is not) in the exporting shell."""
    from sora_train.cli.build import load_run_config, record_run_paths
    from sora_train.utils.errors import SoraError

    monkeypatch.setenv("SORA_QUALITY_DIR", str(tmp_path / "q"))
    cfg = _compose(["experiment=shapes_quality"])
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))  # unresolved, as Hydra saves it
    record_run_paths(cfg, run)
    monkeypatch.delenv("SORA_QUALITY_DIR")
    assert OmegaConf.load(run / ".hydra" / "config.yaml").vae_ckpt == "outputs/shapes_quality/vae/export"  # the trap
    loaded = load_run_config(run)
    assert loaded.vae_ckpt == f"{tmp_path}/q/vae/export"
    assert loaded.data.train_shards == f"{tmp_path}/q/latents/train" and loaded.run_dir == str(run.resolve())
    (run / ".hydra" / "run_paths.json").write_text("{not json")
    with pytest.raises(SoraError, match="run_paths.json: not valid JSON"):
        load_run_config(run)
