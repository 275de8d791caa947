import io
import math

import pytest
import torch

from imgcls_core.config import OptimConfig
from imgcls_core.engine.optim import LRSchedule, build_optimizer, param_groups, scaled_lr
from imgcls_core.models import create_model


@pytest.fixture
def model():
    return create_model("resnet18", 10, small_input=True, width=0.25)


def test_norm_and_bias_parameters_get_no_weight_decay(model):
    groups = param_groups(model, OptimConfig(weight_decay=1e-4, norm_weight_decay=0.0), lr=0.1)
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        expected = 0.0 if (p.ndim == 1) else 1e-4
        assert by_id[id(p)] == expected, name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_backbone_lr_scale_leaves_the_head_at_full_lr(model):
    groups = param_groups(model, OptimConfig(), lr=0.1, backbone_lr_scale=0.1)
    fc_ids = {id(p) for p in model.fc.parameters()}
    for g in groups:
        head = all(id(p) in fc_ids for p in g["params"])
        assert g["lr"] == pytest.approx(0.1 if head else 0.01)


def test_linear_lr_scaling_with_global_batch():
    assert scaled_lr(OptimConfig(lr=0.1, ref_batch_size=256), 512) == pytest.approx(0.2)
    assert scaled_lr(OptimConfig(lr=0.1, ref_batch_size=0), 512) == pytest.approx(0.1)


def _lrs(kind: str, epochs=4, spe=10, metrics=None, **kw):
    net = torch.nn.Linear(2, 2)
    cfg = OptimConfig(lr=1.0, schedule=kind, **kw)
    opt = build_optimizer(param_groups_for(net, cfg), cfg)
    sched = LRSchedule(opt, cfg, epochs, spe)
    seen = []
    for epoch in range(epochs):
        for _ in range(spe):
            seen.append(sched.last_lr())
            opt.step()
            sched.step_batch()
        value = metrics[epoch] if metrics else 0.5
        sched.step_epoch(value if isinstance(value, dict) else {"val/acc1": value, "val/loss": 1.0})
    return seen, sched, opt


def param_groups_for(net, cfg):
    return [{"params": list(net.parameters()), "lr": cfg.lr, "weight_decay": 0.0}]


def test_cosine_with_linear_warmup():
    lrs, *_ = _lrs("cosine", warmup_epochs=1, warmup_start_factor=0.1)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[1] > lrs[0] and lrs[9] < 1.0  # rising during warmup
    assert lrs[10] == pytest.approx(1.0)  # peak right after warmup
    assert lrs[-1] < 0.01  # annealed to ~0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_multistep_drops_at_fractions_of_training():
    lrs, *_ = _lrs("multistep", milestones=[0.5, 0.75], gamma=0.1)
    assert lrs[19] == pytest.approx(1.0)
    assert lrs[20] == pytest.approx(0.1)
    assert lrs[30] == pytest.approx(0.01)


def test_onecycle_peaks_at_end_of_warmup_and_ends_low():
    lrs, *_ = _lrs("onecycle", warmup_epochs=1, warmup_start_factor=0.04)
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert 8 <= peak <= 11
    assert lrs[0] == pytest.approx(0.04)
    assert lrs[-1] < 1e-3


def test_plateau_decays_when_validation_stalls():
    lrs, *_ = _lrs("plateau", epochs=6, metrics=[0.5, 0.6, 0.6, 0.6, 0.6, 0.6], plateau_patience=1, gamma=0.5)
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[-1] < 1.0


def test_plateau_on_val_loss_decays_when_the_loss_stalls_whatever_top1_does():
    # top-1 keeps rising, the loss stops falling after epoch 2: plateau_metric=loss decays, acc1 does not
    rows = [{"val/acc1": 0.5 + 0.05 * e, "val/loss": max(1.0 - 0.3 * e, 0.4)} for e in range(6)]
    on_loss, *_ = _lrs("plateau", epochs=6, metrics=rows, plateau_patience=1, gamma=0.5, plateau_metric="loss")
    on_acc1, *_ = _lrs("plateau", epochs=6, metrics=rows, plateau_patience=1, gamma=0.5)
    assert on_acc1[-1] == pytest.approx(1.0)
    assert on_loss[29] == pytest.approx(1.0) and on_loss[-1] == pytest.approx(0.5)  # decayed after 2 flat epochs


def test_cosine_then_plateau():
    """cosine over cosine_epochs after the warmup, then ReduceLROnPlateau from the LR it reached."""
    flat = [0.9] * 8
    lrs, *_ = _lrs("cosine_plateau", epochs=8, metrics=flat, warmup_epochs=1, cosine_epochs=3, min_lr_ratio=0.2,
                   plateau_patience=1, gamma=0.5)
    assert lrs[10] == pytest.approx(1.0)  # the peak after warmup
    assert all(a > b for a, b in zip(lrs[10:40], lrs[11:40]))  # cosine over epochs 2-4
    assert lrs[40] == pytest.approx(0.2)  # the cosine floor, where plateau takes over
    assert lrs[49] == pytest.approx(0.2)  # no decay while plateau waits out its patience
    assert lrs[59] == pytest.approx(0.2) and lrs[60] == pytest.approx(0.1)  # halved after 2 epochs without gain
    assert all(a >= b for a, b in zip(lrs[40:], lrs[41:]))  # never back up (the cosine past T_max would)


def test_constant_schedule_with_warmup_stays_at_peak():
    lrs, *_ = _lrs("constant", warmup_epochs=1)
    assert lrs[0] < 1.0 and lrs[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["cosine", "onecycle", "multistep", "plateau", "cosine_plateau", "constant"])
def test_schedule_state_survives_a_weights_only_round_trip(kind):
    lrs, sched, opt = _lrs(kind, epochs=2, warmup_epochs=1, cosine_epochs=0.5)
    buf = io.BytesIO()
    torch.save({"s": sched.state_dict(), "o": opt.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    net = torch.nn.Linear(2, 2)
    cfg = OptimConfig(lr=1.0, schedule=kind, warmup_epochs=1, cosine_epochs=0.5)
    opt2 = build_optimizer(param_groups_for(net, cfg), cfg)
    sched2 = LRSchedule(opt2, cfg, 2, 10)
    opt2.load_state_dict(state["o"])
    sched2.load_state_dict(state["s"])
    assert sched2.steps == sched.steps
    assert math.isclose(sched2.last_lr(), sched.last_lr())


def _trace(opt, sched, key: str, steps: int) -> list[float]:
    """The first parameter group's ``key`` (lr, momentum) before each of ``steps`` optimizer steps."""
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0][key])
        opt.step()
        sched.step_batch()
    return seen


def test_cosine_decays_each_group_to_its_own_floor():
    """A backbone at a tenth of the head's LR ends at a tenth of the head's floor (a floor taken from
    optim.lr alone made a small backbone LR rise over the 'decay')."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    cfg = OptimConfig(lr=1.0, schedule="cosine", min_lr_ratio=0.1)
    groups = [{"params": list(net[0].parameters()), "lr": 0.05, "weight_decay": 0.0},
              {"params": list(net[1].parameters()), "lr": 1.0, "weight_decay": 0.0}]
    opt = build_optimizer(groups, cfg)
    backbone = _trace(opt, LRSchedule(opt, cfg, 2, 10), "lr", steps=20)
    assert all(a >= b for a, b in zip(backbone, backbone[1:]))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005) and opt.param_groups[1]["lr"] == pytest.approx(0.1)


def test_the_reported_lr_is_the_one_the_last_step_used():
    lrs, sched, _ = _lrs("cosine", epochs=2, warmup_epochs=1, warmup_start_factor=0.1)
    assert sched.epoch_lr() == pytest.approx(lrs[-1])  # not the next (0) one
    assert sched.last_lr() < sched.epoch_lr()


def test_a_resume_with_other_steps_per_epoch_is_refused():
    _, sched, _ = _lrs("cosine", epochs=4, spe=10)
    net = torch.nn.Linear(2, 2)
    cfg = OptimConfig(lr=1.0, schedule="cosine")
    other = LRSchedule(build_optimizer(param_groups_for(net, cfg), cfg), cfg, 4, 5)
    with pytest.raises(ValueError, match="built for 10 optimizer steps per epoch and this run takes 5"):
        other.load_state_dict(sched.state_dict())


def test_onecycle_cycles_sgd_momentum_as_torch_does():
    """OneCycleLR's own 0.95 -> 0.85 -> 0.95 (README): optim.momentum only switches the cycle on."""
    net = torch.nn.Linear(2, 2)
    cfg = OptimConfig(lr=1.0, schedule="onecycle", momentum=0.5, warmup_epochs=1)
    opt = build_optimizer(param_groups_for(net, cfg), cfg)
    seen = _trace(opt, LRSchedule(opt, cfg, 2, 10), "momentum", steps=20)
    assert max(seen) == pytest.approx(0.95) and min(seen) == pytest.approx(0.85, abs=0.01)


@pytest.mark.parametrize("sets, message", [
    ({"schedule": "cosine_plateau", "cosine_epochs": 1.0}, "with 0 the plateau epochs train at LR 0"),
    ({"schedule": "plateau", "gamma": 1.0}, "must be below 1 with schedule plateau"),
])
def test_schedules_that_would_not_decay_are_refused(sets, message):
    from imgcls_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"optim.{k}={v}" for k, v in sets.items()] + ["train.epochs=4"])
