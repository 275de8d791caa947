"""Knowledge distillation: the loss, the frozen teacher inside the engine, and loading teachers."""

import pytest
import torch
import torch.nn.functional as F

from imgcls_core.config import load_config
from imgcls_core.data.presets import build_batch_mix
from imgcls_core.engine import Engine, Preprocessing, save_inference_model, setup_runtime
from imgcls_core.engine.distill import (
    Renormalized,
    distillation_loss,
    kd_term,
    load_teacher,
    parse_teacher_spec,
    resolve_teacher,
)
from imgcls_core.models import create_model

CLASSES = ["a", "b", "c"]


def _logits(seed: int, n: int = 6, c: int = 3) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * 3


def _batches(n=4, size=16, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, size, size, generator=g), torch.randint(0, classes, (8,), generator=g))
            for _ in range(n)]


def _cfg(*overrides):
    return load_config(None, ["model.name=cnn3", "model.width=0.25", "data.batch_size=8", "optim.lr=0.05",
                              "optim.schedule=constant", *overrides])


def _teacher(seed: int = 1):
    torch.manual_seed(seed)
    return create_model("cnn3", len(CLASSES), width=0.5)


def _engine(*overrides, teacher=None, batch_mix=None):
    cfg = _cfg(*overrides)
    torch.manual_seed(0)
    return Engine(cfg, create_model("cnn3", len(CLASSES), width=0.25), setup_runtime(cfg.train), steps_per_epoch=4,
                  teacher=teacher, batch_mix=batch_mix)


def _pre(classes=CLASSES, size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> Preprocessing:
    return Preprocessing(size, list(mean), list(std), 1.0, list(classes))


def _teacher_file(tmp_path, pre: Preprocessing, seed: int = 1):
    model = _teacher(seed)
    model_config = load_config(None, ["model.name=cnn3", "model.width=0.5"]).to_dict()["model"]
    return save_inference_model(tmp_path / "teacher.pt", model.state_dict(), model_config, pre), model


# --------------------------------------------------------------------------- the loss


def test_alpha_zero_is_plain_cross_entropy_for_hard_and_soft_labels():
    student, teacher = _logits(0), _logits(1)
    hard = torch.tensor([0, 1, 2, 0, 1, 2])
    loss, _, ce = distillation_loss(student, teacher, hard, temperature=4.0, alpha=0.0)
    assert torch.equal(loss, F.cross_entropy(student, hard)) and torch.equal(ce, loss)
    soft = torch.softmax(_logits(2), dim=1)  # MixUp/CutMix targets: N x C probabilities
    loss, _, _ = distillation_loss(student, teacher, soft, temperature=4.0, alpha=0.0)
    torch.testing.assert_close(loss, -(soft * F.log_softmax(student, dim=1)).sum(1).mean())


def test_kd_term_is_t_squared_times_the_kl_of_softened_distributions():
    student, teacher = _logits(0), _logits(1)
    for t in (1.0, 2.0, 4.0):
        p_teacher = F.softmax(teacher / t, dim=1)
        kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / t, dim=1))).sum(1).mean()  # batchmean
        torch.testing.assert_close(kd_term(student, teacher, t), t * t * kl)
    assert kd_term(teacher, teacher, 4.0).abs() < 1e-6  # a student that matches its teacher pays nothing
    loss, kd, ce = distillation_loss(student, teacher, torch.zeros(6, dtype=torch.long), temperature=3.0, alpha=0.7)
    torch.testing.assert_close(loss, 0.7 * kd + 0.3 * ce)


def test_kd_gradient_keeps_its_scale_as_t_grows():
    # The T^2 factor exists so that d(kd)/d(logits) tends to a constant at high T (the logit gap over
    # C*N) instead of shrinking as 1/T^2: doubling T from 8 to 16 leaves it about where it was.
    teacher = _logits(1)
    norms = []
    for t in (8.0, 16.0):
        student = _logits(0).requires_grad_()
        kd_term(student, teacher, t).backward()
        norms.append(student.grad.norm().item())
    assert 0.8 < norms[1] / norms[0] < 1.25, norms  # without T^2 it would be ~1/4


# --------------------------------------------------------------------------- the engine


def test_a_step_updates_the_student_and_leaves_the_teacher_untouched():
    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}  # BN running stats included
    teacher.train()  # the engine must put it in eval mode
    engine = _engine("distill.alpha=0.5", teacher=teacher)
    student_before = [p.detach().clone() for p in engine.model.parameters()]
    engine.train_epoch(_batches(n=2))
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"teacher's {key} changed"
    assert any(not torch.equal(p, b) for p, b in zip(engine.model.parameters(), student_before))


def test_the_teacher_stays_out_of_the_checkpoint_and_a_distill_checkpoint_resumes():
    engine = _engine("train.ema_decay=0.9", teacher=_teacher())
    engine.train_epoch(_batches(n=2))
    state = engine.state_dict()
    plain = _engine("train.ema_decay=0.9")
    assert state["model"].keys() == plain.state_dict()["model"].keys()
    assert state["ema"].keys() == plain.state_dict()["ema"].keys()
    resumed = _engine("train.ema_decay=0.9", teacher=_teacher())
    resumed.load_state_dict(state)
    assert resumed.step == 2
    for a, b in zip(resumed.model.parameters(), engine.model.parameters()):
        assert torch.equal(a, b)


def test_training_with_a_teacher_lowers_the_kd_loss():
    engine = _engine("distill.alpha=1.0", "distill.temperature=2.0", teacher=_teacher())
    data = _batches(n=4)
    first = engine.train_epoch(data)
    for _ in range(6):
        last = engine.train_epoch(data)
    assert last["train/kd_loss"] < 0.7 * first["train/kd_loss"], (first, last)
    # train/loss is the mixed loss; with alpha=1 it is the KD term alone
    assert last["train/loss"] == pytest.approx(last["train/kd_loss"], rel=1e-5)
    assert "train/ce_loss" in last


def test_without_a_teacher_the_metrics_and_loss_are_those_of_plain_training():
    torch.manual_seed(0)
    plain = _engine().train_epoch(_batches(n=2))
    assert "train/kd_loss" not in plain
    # alpha=0 with a teacher computes the same loss as no teacher at all
    zero = _engine("distill.alpha=0.0", teacher=_teacher()).train_epoch(_batches(n=2))
    assert zero["train/loss"] == pytest.approx(plain["train/loss"], rel=1e-6)
    assert zero["train/ce_loss"] == pytest.approx(plain["train/loss"], rel=1e-6)


def test_mixup_soft_labels_and_bf16_autocast_work_with_a_teacher():
    engine = _engine("train.amp=bf16", "augment.mixup_alpha=0.4", teacher=_teacher(),
                     batch_mix=build_batch_mix(load_config(None, ["augment.mixup_alpha=0.4"]).augment, 3))
    assert engine.runtime.amp_dtype is torch.bfloat16
    metrics = engine.train_epoch(_batches(n=2))
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("train/loss", "train/kd_loss", "train/ce_loss"))
    assert metrics["train/kd_loss"] > 0


# --------------------------------------------------------------------------- loading teachers


def test_teacher_specs_parse_into_registry_versions_aliases_and_paths():
    alias = parse_teacher_spec("models:/digits@champion")
    assert (alias.name, alias.alias, alias.version, alias.in_registry) == ("digits", "champion", None, True)
    version = parse_teacher_spec("models:/digits/3")
    assert (version.name, version.version, version.pinned) == ("digits", "3", "models:/digits/3")
    path = parse_teacher_spec("runs/teacher/model.pt")
    assert not path.in_registry and path.path == "runs/teacher/model.pt" and path.pinned == "runs/teacher/model.pt"
    for bad in ("models:/digits", "models:/digits/latest", "models:/a/b/c", "models:/@x"):
        with pytest.raises(ValueError, match="models:/<name>@<alias> or models:/<name>/<version>"):
            parse_teacher_spec(bad)
    with pytest.raises(ValueError, match="only models:/ registry URIs and local paths"):
        parse_teacher_spec("s3://bucket/model.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_teacher("no/such/model.pt", tracking_uri=None)


def test_a_teacher_file_loads_frozen_and_predicts_like_the_saved_network(tmp_path):
    pre = _pre()
    file, model = _teacher_file(tmp_path, pre)
    teacher = load_teacher(str(file), pre)
    assert not teacher.renormalized and teacher.model is teacher.network
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(teacher.model(x), model.eval()(x))


def test_a_teacher_of_other_classes_or_input_size_is_refused_naming_both(tmp_path):
    file, _ = _teacher_file(tmp_path, _pre(classes=["cat", "dog", "eel"]))
    with pytest.raises(ValueError, match=r"classes \['cat', 'dog', 'eel'\].*student's data has \['a', 'b', 'c'\]"):
        load_teacher(str(file), _pre())
    file, _ = _teacher_file(tmp_path, _pre(size=32))
    with pytest.raises(ValueError, match="takes 32 px inputs but the student's data.image_size is 16"):
        load_teacher(str(file), _pre(size=16))


def test_a_teacher_with_other_normalization_sees_its_own_inputs(tmp_path):
    teacher_pre = _pre(mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7))
    student_pre = _pre(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    file, model = _teacher_file(tmp_path, teacher_pre)
    teacher = load_teacher(str(file), student_pre)
    assert teacher.renormalized and isinstance(teacher.model, Renormalized)
    assert "re-normalizing" in teacher.describe()
    pixels = torch.rand(4, 3, 16, 16)

    def norm(p: Preprocessing) -> torch.Tensor:
        return (pixels - torch.tensor(p.mean).view(1, 3, 1, 1)) / torch.tensor(p.std).view(1, 3, 1, 1)

    torch.testing.assert_close(teacher.model(norm(student_pre)), model.eval()(norm(teacher_pre)), rtol=1e-4,
                               atol=1e-4)


# --------------------------------------------------------------------------- the job's driver (no Ray)


def test_the_distill_job_needs_a_teacher(capsys, tmp_path):
    from jobs.distill import main

    assert main([f"--set=train.output_dir={tmp_path}"]) == 2
    assert "distill.teacher is not set" in capsys.readouterr().err


def test_the_driver_refuses_a_wrong_teacher_before_starting_workers(digits_root, tmp_path):
    from jobs.train import plan_training

    file, _ = _teacher_file(tmp_path, _pre(size=32))  # classes a, b, c; the digits are 0..9
    cfg = load_config(None, ["data.format=imagefolder", f"data.root={digits_root}", f"distill.teacher={file}",
                             f"train.output_dir={tmp_path / 'out'}", f"ray.storage_path={tmp_path / 'results'}"])
    with pytest.raises(ValueError, match=r"trained on classes \['a', 'b', 'c'\] but the student's data has \['0', '1'"):
        plan_training(cfg, log=lambda _line: None)
