"""The EMA schedules (rdm.ema) against diffusers' EMAModel and EDM's formula, the cosine learning
rate against diffusers' scheduler, and the further EMAs a run keeps: trained, checkpointed,
resumed exactly and sampled by name."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from test_train import assert_same_weights, patch_loss, tiny_cfg, tiny_dataset

import rdm.train
from rdm.checkpoint import latest_checkpoint, load_run
from rdm.config import ConfigError, RunConfig, TrainConfig
from rdm.ema import EmaSpec, EmaSpecError, ema_decay_at
from rdm.errors import RdmError
from rdm.train import lr_at, train


@pytest.mark.parametrize("power", [2 / 3, 0.75])
def test_power_warm_up_is_diffusers_ema_model(power):
    from diffusers.training_utils import EMAModel

    ref = EMAModel(torch.nn.Linear(1, 1).parameters(), use_ema_warmup=True, power=power)
    spec = EmaSpec.parse(f"power:{power}")
    ours = [spec.decay(step, 64) for step in range(1, 3001)]
    # EMAModel.step() increments optimization_step, then asks get_decay for it
    theirs = [ref.get_decay(step) for step in range(1, 3001)]
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert ours[0] == 0.0 and ours[-1] == pytest.approx(1 - 3000**-power)


def test_ldm_spec_is_the_main_emas_rule():
    spec = EmaSpec.parse("ldm:0.999")
    assert [spec.decay(s, 64) for s in (1, 90, 10**6)] == [2 / 11, 91 / 100, 0.999]
    assert spec.decay(7, 64) == ema_decay_at(7, 0.999)


def test_halflife_is_edms_with_its_ramp_up():
    spec = EmaSpec.parse("halflife:6400")
    assert spec.decay(1, 64) == 0.0  # nothing seen yet: copy the weights
    # step 11: 640 images seen, ramp-up half-life 0.05 * 640 = 32 images
    assert spec.decay(11, 64) == pytest.approx(0.5 ** (64 / 32))
    # after 128000 images the half-life is the full 6400: 100 steps of 64 halve the old weight
    beta = spec.decay(10_000, 64)
    assert beta == pytest.approx(0.5 ** (64 / 6400))
    assert beta**100 == pytest.approx(0.5)


@pytest.mark.parametrize(
    "bad", ["power", "power:x", "halflife:-5", "ldm:1.0", "cosine:3", "ldm:nan"]
)
def test_bad_specs_are_refused(bad):
    with pytest.raises(EmaSpecError, match="ldm:DECAY"):
        EmaSpec.parse(bad)
    with pytest.raises(ConfigError, match="train.ema_extra"):
        TrainConfig(ema_extra=[bad])


def test_the_same_ema_twice_is_refused():
    with pytest.raises(ConfigError, match="twice"):
        TrainConfig(ema_extra=["power:0.75", "power:0.750"])


def test_cosine_lr_is_diffusers_schedule_after_our_warm_up():
    from diffusers.optimization import get_cosine_schedule_with_warmup

    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=100, lr_schedule="cosine")
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=cfg.lr)
    ref = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps).lr_lambdas[0]
    assert [lr_at(s, cfg) for s in range(0, 101)] == pytest.approx(
        [cfg.lr * ref(s) for s in range(0, 101)], abs=1e-15
    )
    assert lr_at(55, cfg) == pytest.approx(cfg.lr * 0.5)  # half-way through the decay
    assert lr_at(100, cfg) == pytest.approx(0.0, abs=1e-18)
    assert lr_at(55, replace(cfg, lr_schedule="constant")) == cfg.lr


def extra_cfg(steps=6):
    cfg = tiny_cfg(steps=steps, checkpoint_every=3)
    cfg.train = replace(
        cfg.train, ema_extra=["power:0.75", "halflife:20"], lr_schedule="cosine", warmup_steps=2
    )
    return cfg


def test_further_emas_follow_their_schedules(tmp_path, monkeypatch):
    """Each further EMA is updated once per step with its own β, towards the same weights."""
    cfg = extra_cfg(steps=3)
    seen: list[float] = []
    real = rdm.train.ema_update

    def spy(ema, model, decay):
        seen.append(decay)
        real(ema, model, decay)

    monkeypatch.setattr(rdm.train, "ema_update", spy)
    train(cfg, tmp_path / "run", tiny_dataset(), progress=False)
    power, half = EmaSpec.parse("power:0.75"), EmaSpec.parse("halflife:20")
    batch = cfg.train.batch_size
    expected = [
        d
        for s in (1, 2, 3)
        for d in (ema_decay_at(s, cfg.train.ema_decay), power.decay(s, batch), half.decay(s, batch))
    ]
    assert seen == pytest.approx(expected)
    assert {p.name for p in (tmp_path / "run").glob("ema*.safetensors")} == {
        "ema.safetensors",
        "ema-power-0.75.safetensors",
        "ema-halflife-20.safetensors",
    }


def test_killed_and_resumed_run_keeps_its_further_emas_exactly(tmp_path, monkeypatch):
    cfg, data = extra_cfg(), tiny_dataset()
    train(cfg, tmp_path / "a", data, progress=False)
    patch_loss(monkeypatch, 5, "kill")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", data, progress=False)
    assert latest_checkpoint(tmp_path / "b").name == "step-0000003"
    monkeypatch.undo()
    train(cfg, tmp_path / "b", data, resume=True, progress=False)
    for name in ("ema.safetensors", "ema-power-0.75.safetensors", "ema-halflife-20.safetensors"):
        assert_same_weights(tmp_path / "a" / name, tmp_path / "b" / name)


def test_a_cosine_run_cannot_change_its_steps_on_resume(tmp_path):
    cfg, data = extra_cfg(steps=3), tiny_dataset()
    train(cfg, tmp_path / "run", data, progress=False)
    longer = RunConfig.from_dict(cfg.to_dict())
    longer.train.steps = 6
    with pytest.raises(RdmError, match="cosine learning rate"):
        train(longer, tmp_path / "run", data, resume=True, progress=False)


def test_load_run_picks_a_further_ema_by_name(tmp_path):
    cfg = extra_cfg(steps=3)
    train(cfg, tmp_path / "run", tiny_dataset(), progress=False)
    main, _ = load_run(tmp_path / "run", "ema")
    power, _ = load_run(tmp_path / "run", "ema-power-0.75")
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(main.parameters(), power.parameters(), strict=True)
    )
    assert diff > 0 and math.isfinite(diff)  # a different average of the same trajectory
    with pytest.raises(RdmError, match="ema-halflife-20"):
        load_run(tmp_path / "run", "ema-power-0.5")
