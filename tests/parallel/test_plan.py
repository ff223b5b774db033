"""The memory planner: docs/strategies.md's arithmetic, measured CPU peaks, and sora-plan."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sora_train.models.dit.sizes import build_dit
from sora_train.parallel.plan import LatentGeometry, Setup, activation_bytes, dit_shape, longest_clip, model_state_bytes, plan_memory
from sora_train.utils.errors import SoraError

ROOT = Path(__file__).resolve().parents[2]


def shape_of(size: str):
    with torch.device("meta"):
        return dit_shape(build_dit(size, in_channels=16, text_dim=4096))


def test_bytes_per_parameter_match_the_strategies_table():
    """docs/strategies.md, "Memory per parameter" (bf16-mixed, Adam, N = 8)."""
    P, N = 1_000_000, 8
    per = {}
    for s in ("ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_2_offload"):
        params, grads, optim, _, cpu = model_state_bytes(P, Setup(strategy=s, world_size=N))
        per[s] = ((params + grads + optim) / P, cpu / P)
    assert per["ddp"][0] == pytest.approx(4 + 2 + 4 + 8)  # fp32 weights + autocast's bf16 copy + fp32 grads + Adam
    assert per["deepspeed_stage_1"][0] == pytest.approx(2 + 2 + 12 / N)
    assert per["deepspeed_stage_2"][0] == pytest.approx(2 + 14 / N)
    assert per["deepspeed_stage_3"][0] == pytest.approx(16 / N)
    assert per["deepspeed_stage_2_offload"] == (pytest.approx(2 + 2 / N), pytest.approx(16 / N))
    fp32 = model_state_bytes(P, Setup(strategy="deepspeed_stage_3", precision="32-true", world_size=N))
    assert sum(fp32[:3]) / P == pytest.approx(16 / N)  # stage 3 steps its fp32 shard in place


def test_worked_examples_of_the_strategies_doc():
    """The 1B / 3B figures quoted in docs/strategies.md come from the size registry."""
    one, three = shape_of("1B"), shape_of("3B")
    assert one.num_params == pytest.approx(1.021e9, rel=1e-3)
    assert three.num_params == pytest.approx(2.968e9, rel=1e-3)
    s2 = Setup(strategy="deepspeed_stage_2", world_size=8)
    assert sum(model_state_bytes(one.num_params, s2)[:3]) / 1e9 == pytest.approx(3.83, abs=0.01)
    assert sum(model_state_bytes(three.num_params, s2)[:3]) / 1e9 == pytest.approx(11.13, abs=0.01)
    tokens = LatentGeometry(4, 8).tokens(97, 512, 512, one.patch_size)
    assert tokens == 25_600
    assert activation_bytes(one, tokens, s2) / 1e9 == pytest.approx(67.4, abs=0.1)
    ckpt = Setup(strategy="deepspeed_stage_2", world_size=8, activation_checkpointing=True)
    assert activation_bytes(one, tokens, ckpt) / 1e9 == pytest.approx(6.3, abs=0.1)
    # Ulysses: every rank holds a quarter of the tokens.
    sp4 = Setup(strategy="deepspeed_stage_2", world_size=8, activation_checkpointing=True, sequence_parallel_size=4)
    assert activation_bytes(one, tokens, sp4) == pytest.approx(activation_bytes(one, tokens, ckpt) / 4, rel=0.01)


def test_longest_clip_is_the_edge_of_fitting():
    one, geo = shape_of("1B"), LatentGeometry(4, 8)
    setup = Setup(strategy="deepspeed_stage_2", world_size=8, activation_checkpointing=True)
    frames = longest_clip(one, geo, 256, 256, setup, 80e9)
    assert frames > 1 and (frames - 1) % 4 == 0
    assert plan_memory(one, geo.tokens(frames, 256, 256, one.patch_size), setup).fits(80e9)
    assert not plan_memory(one, geo.tokens(frames + 4, 256, 256, one.patch_size), setup).fits(80e9)
    assert longest_clip(one, geo, 256, 256, Setup(strategy="ddp"), 10e9) == 0  # states alone are 18 GB


def test_bad_setup_is_one_clear_error():
    with pytest.raises(SoraError, match="strategy='zero9'"):
        Setup(strategy="zero9")
    with pytest.raises(SoraError, match="not divisible by sequence_parallel_size"):
        Setup(world_size=6, sequence_parallel_size=4)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_plan", ROOT / "bench" / "bench_plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_is_within_25_percent_of_a_measured_cpu_peak(checkpointing):
    """Real fp32 training steps (2, AdamW) of a small DiT: peak RSS over the baseline."""
    r = _bench().compare(dict(hidden=128, depth=4, heads=2, latent=(4, 32, 32), checkpointing=checkpointing, steps=2))
    assert 0.75 <= r["ratio"] <= 1.25, r


def test_sora_plan_cli(capsys):
    from sora_train.cli.plan import main

    main(["experiment=pretrain_1B", "--gpu-mem", "80", "--json"])
    p = json.loads(capsys.readouterr().out)
    assert p["setup"]["strategy"] == "deepspeed_stage_2" and p["setup"]["activation_checkpointing"] is True
    assert p["fits"] and p["longest_clip"]["num_frames"] > p["clip"]["num_frames"]
    main(["experiment=pretrain_1B", "--gpu-mem", "80"])  # the rich table
    out = capsys.readouterr().out
    assert "optimizer state" in out and "fits" in out and "longest clip" in out
    main(["experiment=pretrain_100M", "--gpu-mem", "24", "--frames", "65", "--json", "parallel.activation_checkpointing=false"])
    assert json.loads(capsys.readouterr().out)["setup"]["activation_checkpointing"] is False


@pytest.mark.parametrize("argv, message", [
    (["experiment=nope"], "Could not find 'experiment/nope'"),
    (["experiment=pretrain_1B", "--gpu-mem", "0"], "--gpu-mem 0: must be a positive"),
    (["experiment=pretrain_1B", "--gpu-mem", "-8"], "--gpu-mem -8: must be a positive"),
])
def test_sora_plan_bad_input_is_one_line(argv, message, capsys):
    from sora_train.cli.plan import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_sora_plan_reads_the_architecture_of_init_from(tmp_path, capsys):
    """Fine-tuning trains the export's DiT, whatever size the config names."""
    from sora_train.cli.plan import main
    from sora_train.models.export import export_parts
    from sora_train.models.text import TinyTextEncoder
    from sora_train.models.vae import build_vae

    text = TinyTextEncoder(dim=32, depth=1, num_heads=2)
    vae = build_vae("debug")
    dit = build_dit("debug", in_channels=vae.latent_channels, text_dim=text.dim, hidden_size=96, depth=3, num_heads=2)
    export = export_parts(tmp_path / "export", {"vae": vae, "text": text, "dit": dit}, {"task": "dit"})
    main(["experiment=finetune_full", f"init_from={export}", "--json"])
    p = json.loads(capsys.readouterr().out)
    assert (p["dit"]["hidden_size"], p["dit"]["depth"], p["dit"]["params"]) == (96, 3, dit.num_params())
    with pytest.raises(SystemExit):
        main(["experiment=finetune_full", f"init_from={tmp_path / 'nothing'}"])
    err = capsys.readouterr().err.strip()
    assert "init_from=" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        main(["experiment=wan_lora"])  # pretrained: ??? (or a Wan folder): one line, not a traceback
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_sora_plan_counts_the_frozen_text_encoder_on_every_rank(tmp_path, capsys):
    """A frozen T5 is outside the strategy: its bf16 weights sit on every GPU (T5-XXL: 9.5 GB)."""
    from sora_train.cli.plan import main

    t5_xxl = {"model_type": "t5", "d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 10240, "num_layers": 24,
              "vocab_size": 32128, "feed_forward_proj": "gated-gelu", "is_gated_act": True}
    (tmp_path / "config.json").write_text(json.dumps(t5_xxl))
    main(["experiment=pretrain_1B", f"text.path={tmp_path}", "--json"])
    p = json.loads(capsys.readouterr().out)
    vae_bytes = 59_339_107 * 4  # standard_4x8x8_16c in fp32 (task.vae_dtype)
    t5_params = 32128 * 4096 + 24 * (4 * 4096 * 64 * 64 + 3 * 4096 * 10240)
    assert p["bytes"]["frozen"] == pytest.approx(vae_bytes + 2 * t5_params)
    assert 9.5e9 < 2 * t5_params < 9.6e9
    assert not any("T5-XXL-sized" in n for n in p["notes"])
