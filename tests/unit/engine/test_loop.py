import pytest
import torch

from imgcls_core.config import load_config
from imgcls_core.engine import Engine, NonFiniteLossError, setup_runtime
from imgcls_core.engine.runtime import resolve_amp
from imgcls_core.models import create_model


def _batches(n=4, size=16, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, size, size, generator=g), torch.randint(0, classes, (8,), generator=g))
            for _ in range(n)]


def _engine(*overrides, device=None):
    cfg = load_config(None, ["model.name=cnn3", "model.width=0.25", "data.batch_size=8", *overrides])
    model = create_model("cnn3", 3, width=0.25)
    return Engine(cfg, model, setup_runtime(cfg.train, device), steps_per_epoch=4)


def test_an_epoch_lowers_the_loss_on_a_fixed_batch():
    engine = _engine("optim.lr=0.05", "optim.schedule=constant")
    data = _batches(n=1) * 8
    first = engine.train_epoch(data[:1])["train/loss"]
    for _ in range(5):
        last = engine.train_epoch(data)["train/loss"]
    assert last < first
    assert engine.step == 1 + 5 * 8


def test_bf16_autocast_runs_on_the_cpu():
    engine = _engine("train.amp=bf16")
    assert engine.runtime.amp_dtype is torch.bfloat16 and not engine.runtime.use_grad_scaler
    metrics = engine.train_epoch(_batches())
    assert metrics["train/loss"] > 0


def test_amp_auto_and_fp16_degrade_to_fp32_on_the_cpu():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == (None, False)
    with pytest.warns(UserWarning, match="needs CUDA"):
        assert resolve_amp("fp16", cpu) == (None, False)
    assert not _engine("train.channels_last=true", device=cpu).runtime.channels_last  # CUDA only


def test_non_finite_loss_stops_with_a_clear_error():
    engine = _engine()
    images, labels = _batches(n=1)[0]
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="lower optim.lr"):
        engine.train_epoch([(images, labels)])


def test_gradient_clipping_bounds_the_update():
    engine = _engine("train.grad_clip_norm=0.001", "optim.lr=1.0", "optim.momentum=0.0",
                     "optim.weight_decay=0.0", "optim.schedule=constant")
    before = [p.detach().clone() for p in engine.model.parameters()]
    engine.train_epoch(_batches(n=1))
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(engine.model.parameters(), before)])
    assert moved.norm() <= 0.001 * 1.0 + 1e-6  # |update| = lr * |clipped grad|


def test_ema_follows_the_weights_and_is_saved():
    engine = _engine("train.ema_decay=0.5")
    engine.train_epoch(_batches())
    state = engine.state_dict()
    assert state["ema"] is not None and int(state["ema"]["n_averaged"]) == 4
    ema_w = engine.ema.module.fc.weight
    assert not torch.equal(ema_w, engine.model.fc.weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_and_channels_last(amp):
    engine = _engine(f"train.amp={amp}", "train.channels_last=true", device=torch.device("cuda"))
    assert engine.runtime.channels_last
    assert engine.runtime.use_grad_scaler == (amp == "fp16")
    metrics = engine.train_epoch(_batches())
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    weight = next(p for p in engine.model.parameters() if p.ndim == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)


def test_adopt_state_takes_weights_and_moments_but_keeps_its_own_lr_schedule():
    """A PBT exploit: the donor's weights and step count, the receiver's (perturbed) LR and decay."""
    donor = _engine("optim.lr=0.1", "optim.schedule=cosine", "train.epochs=4", "optim.weight_decay=1e-4")
    for _ in range(2):
        donor.train_epoch(_batches())
        donor.end_epoch({"val/acc1": 0.5})
    receiver = _engine("optim.lr=0.02", "optim.schedule=cosine", "train.epochs=4", "optim.weight_decay=1e-3")
    reference = _engine("optim.lr=0.02", "optim.schedule=cosine", "train.epochs=4", "optim.weight_decay=1e-3")
    for _ in range(2):  # the LR a run with the receiver's settings has after 8 steps
        reference.train_epoch(_batches())
        reference.end_epoch({"val/acc1": 0.5})

    receiver.adopt_state(donor.state_dict())

    assert (receiver.epoch, receiver.step) == (2, 8)
    for a, b in zip(receiver.model.state_dict().values(), donor.model.state_dict().values()):
        assert torch.equal(a, b)
    momentum = next(iter(receiver.optimizer.state.values()))["momentum_buffer"]
    assert torch.equal(momentum, next(iter(donor.optimizer.state.values()))["momentum_buffer"])
    assert receiver.schedule.last_lr() == pytest.approx(reference.schedule.last_lr())
    assert receiver.schedule.last_lr() < 0.5 * donor.schedule.last_lr()
    assert {g["weight_decay"] for g in receiver.optimizer.param_groups} == {1e-3, 0.0}
    receiver.train_epoch(_batches())  # and training goes on from there
    assert receiver.step == 12


def test_the_best_epoch_is_kept_and_survives_a_checkpoint_round_trip():
    """end_epoch keeps a copy of the weights at the best val top-1, raw or EMA, and a resumed
    engine has the same copy (torch.save / weights_only load, as checkpoints do)."""
    import io

    engine = _engine("train.ema_decay=0.9", "train.epochs=4")
    seen = []
    for acc1, ema_acc1 in [(0.5, 0.4), (0.7, 0.8), (0.6, 0.6)]:
        engine.train_epoch(_batches())
        engine.end_epoch({"val/acc1": acc1, "val_ema/acc1": ema_acc1})
        seen.append({k: v.clone() for k, v in engine.ema.module.state_dict().items()})
    best = engine.best
    assert (best["epoch"], best["source"], best["acc1"]) == (2, "ema", 0.8)
    for key, value in best["model"].items():  # epoch 2's EMA weights, not epoch 3's
        assert torch.equal(value, seen[1][key]), key
    assert not all(torch.equal(best["model"][k], seen[2][k]) for k in seen[2] if seen[2][k].is_floating_point())
    buf = io.BytesIO()
    torch.save(engine.state_dict(), buf)
    buf.seek(0)
    resumed = _engine("train.ema_decay=0.9", "train.epochs=4")
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.best["epoch"] == 2
    shipped = resumed.inference_model("best").state_dict()
    assert all(torch.equal(shipped[k], best["model"][k]) for k in best["model"])


def test_only_best_and_auto_keep_a_best_copy():
    engine = _engine("train.final_weights=last")
    engine.train_epoch(_batches())
    engine.end_epoch({"val/acc1": 0.5})
    assert engine.best is None
    with pytest.raises(ValueError, match="no best epoch"):
        engine.inference_model("best")
