"""Knowledge distillation: a trained teacher's softened outputs as extra targets for a student.

The loss (Hinton et al., 2015) mixes the usual cross-entropy with a KL term
between the teacher's and the student's temperature-softened distributions::

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

``T^2`` keeps the KL term's gradients on the scale of the CE term's as ``T``
grows. ``labels`` may be class indices or the soft N x C targets of MixUp /
CutMix: the CE term is the engine's own criterion, and the teacher sees the
same mixed images as the student.

The teacher is named by ``distill.teacher``: ``models:/<name>@<alias>`` or
``models:/<name>/<version>`` (the MLflow model registry) or a local
``model.pt`` / checkpoint path. :func:`resolve_teacher` pins an alias to the
version it points at (a job resolves once, on the driver, so every worker and
every restart distils from the same weights); :func:`load_teacher` loads it
(``weights_only=True``) and checks it against the student's data: the same
class names in the same order and the same input size, else ``ValueError``.
A teacher trained with other normalization statistics gets a
:class:`Renormalized` wrapper that maps the student's inputs onto its own
(normalization is per-channel affine, so this is exact up to float rounding).
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from imgcls_core.data.preprocessing import Preprocessing

REGISTRY_SCHEME = "models:/"
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


# --------------------------------------------------------------------------- loss


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over the batch (float32)."""
    t = float(temperature)
    student_log_p = F.log_softmax(student_logits.float() / t, dim=1)
    teacher_log_p = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(student_log_p, teacher_log_p, reduction="batchmean", log_target=True) * (t * t)


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
    temperature: float, alpha: float, criterion: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, kd, ce)``: the mixed loss and its two terms (``kd`` already includes ``T^2``).

    ``targets`` are class indices (N) or soft targets (N x C); ``criterion``
    defaults to plain cross-entropy (the engine passes its own, with label
    smoothing and class weights)."""
    ce = (criterion or nn.CrossEntropyLoss())(student_logits, targets)
    kd = kd_term(student_logits, teacher_logits.detach(), temperature)
    return alpha * kd + (1.0 - alpha) * ce, kd, ce


# --------------------------------------------------------------------------- teacher spec


@dataclass(frozen=True)
class TeacherSpec:
    """A parsed ``distill.teacher``: a registry version/alias, or a local file."""

    spec: str
    name: str | None = None  # registered model name
    alias: str | None = None
    version: str | None = None
    path: str | None = None  # local model.pt / checkpoint file or directory

    @property
    def in_registry(self) -> bool:
        return self.name is not None

    @property
    def pinned(self) -> str:
        """The spec with an alias replaced by its version (after :func:`resolve_teacher`)."""
        if self.in_registry and self.version is not None:
            return f"{REGISTRY_SCHEME}{self.name}/{self.version}"
        return self.spec


def parse_teacher_spec(spec: str) -> TeacherSpec:
    """``models:/name@alias``, ``models:/name/3`` or a local path; anything else is a ValueError."""
    spec = (spec or "").strip()
    if not spec:
        raise ValueError("distill.teacher is empty; give models:/<name>@<alias>, models:/<name>/<version> "
                         "or the path of a model.pt")
    if spec.startswith("models:"):
        match = _REGISTRY_URI.match(spec)
        if match is None:
            raise ValueError(f"distill.teacher={spec!r} is not a registry URI of the form "
                             f"models:/<name>@<alias> or models:/<name>/<version>")
        return TeacherSpec(spec, name=match["name"], alias=match["alias"], version=match["version"])
    if "://" in spec:
        raise ValueError(f"distill.teacher={spec!r}: only models:/ registry URIs and local paths are supported; "
                         f"register the model or download its model.pt first")
    return TeacherSpec(spec, path=spec)


def resolve_teacher(spec: str | TeacherSpec, tracking_uri: str | None) -> TeacherSpec:
    """Pin a registry alias to the version it points at now; versions and paths are checked to exist."""
    parsed = parse_teacher_spec(spec) if isinstance(spec, str) else spec
    if not parsed.in_registry:
        if not Path(parsed.path).exists():
            raise FileNotFoundError(f"distill.teacher={parsed.path} does not exist")
        return parsed
    from imgcls_core.registry import Registry  # imports mlflow: only when a registry teacher is used

    registry = Registry(tracking_uri, parsed.name)
    if parsed.alias is not None:
        found = registry.alias(parsed.alias)
        if found is None:
            raise ValueError(f"distill.teacher={parsed.spec}: registered model {parsed.name!r} has no alias "
                             f"{parsed.alias!r} in the registry at {tracking_uri or 'MLFLOW_TRACKING_URI'}")
        return TeacherSpec(parsed.spec, name=parsed.name, alias=parsed.alias, version=str(found.version))
    try:
        registry.client.get_model_version(parsed.name, parsed.version)
    except Exception as exc:  # noqa: BLE001 - MlflowException for a missing version or model
        raise ValueError(f"distill.teacher={parsed.spec}: no version {parsed.version} of registered model "
                         f"{parsed.name!r} at {tracking_uri or 'MLFLOW_TRACKING_URI'}") from exc
    return parsed


# --------------------------------------------------------------------------- teacher model


class Renormalized(nn.Module):
    """A teacher trained with other mean/std, fed the student's normalized inputs.

    ``x_student = (pixels - m_s) / s_s`` becomes ``(pixels - m_t) / s_t`` =
    ``x_student * (s_s / s_t) + (m_s - m_t) / s_t`` per channel."""

    def __init__(self, model: nn.Module, student: Preprocessing, teacher: Preprocessing):
        super().__init__()
        self.model = model
        s_mean, s_std = torch.tensor(student.mean), torch.tensor(student.std)
        t_mean, t_std = torch.tensor(teacher.mean), torch.tensor(teacher.std)
        self.register_buffer("scale", (s_std / t_std).view(1, -1, 1, 1))
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)


@dataclass
class Teacher:
    """A loaded teacher, frozen and in eval mode, and where it came from.

    ``model`` takes the student's inputs (the engine calls it); ``network`` is the bare
    teacher, which takes inputs preprocessed its own way (``preprocessing``), e.g. to
    evaluate it with :class:`imgcls_core.predict.Predictor`."""

    model: nn.Module
    network: nn.Module
    preprocessing: Preprocessing
    spec: TeacherSpec
    renormalized: bool

    def describe(self) -> str:
        where = self.spec.pinned + (f" (alias {self.spec.alias})" if self.spec.alias else "")
        params = sum(p.numel() for p in self.model.parameters())
        note = "; re-normalizing the student's inputs to the teacher's mean/std" if self.renormalized else ""
        return f"teacher {where}: {params:,} params{note}"


def check_teacher_compatible(teacher: Preprocessing, student: Preprocessing, where: str) -> None:
    """The teacher must score the student's classes, in the same order, at the same input size, and
    be of the same kind (single-label softmax or multi-label sigmoids)."""
    if teacher.multi_label != student.multi_label:
        kinds = ("single-label", "multi-label")
        raise ValueError(
            f"teacher {where} is a {kinds[teacher.multi_label]} model but the student's data is "
            f"{kinds[student.multi_label]}; distil from a {kinds[student.multi_label]} teacher trained on "
            f"the same classes"
        )
    if list(teacher.classes) != list(student.classes):
        raise ValueError(
            f"teacher {where} was trained on classes {_preview(teacher.classes)} but the student's data has "
            f"{_preview(student.classes)}; distil from a teacher trained on the same classes (same order)"
        )
    if teacher.image_size != student.image_size:
        raise ValueError(
            f"teacher {where} takes {teacher.image_size} px inputs but the student's data.image_size is "
            f"{student.image_size}; set data.image_size={teacher.image_size} or use a teacher trained at "
            f"{student.image_size} px"
        )


def same_normalization(a: Preprocessing, b: Preprocessing, tol: float = 1e-5) -> bool:
    pairs = list(zip(a.mean, b.mean)) + list(zip(a.std, b.std))
    return len(a.mean) == len(b.mean) and all(math.isclose(x, y, rel_tol=tol, abs_tol=tol) for x, y in pairs)


def load_teacher(
    spec: str | TeacherSpec, student: Preprocessing, *, tracking_uri: str | None = None,
    device: str | torch.device = "cpu", memory_format: torch.memory_format = torch.contiguous_format,
) -> Teacher:
    """Fetch (registry: download into a temporary folder, removed after loading), check and freeze."""
    from imgcls_core.predict import Predictor  # predict imports the engine: import here, not at the top

    parsed = resolve_teacher(spec, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="imgcls-teacher-") as tmp:
        if parsed.in_registry:
            from imgcls_core.registry import Registry

            file = Registry(tracking_uri, parsed.name).model_file(parsed.version, dst=tmp)
        else:
            file = Path(parsed.path)
        try:
            predictor = Predictor.from_file(file)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"teacher {parsed.pinned} ({file}) is not an imgcls model file: {exc}") from exc
    check_teacher_compatible(predictor.pre, student, parsed.pinned)
    network = predictor.model.to(device, memory_format=memory_format).eval().requires_grad_(False)
    renormalized = not same_normalization(predictor.pre, student)
    model = Renormalized(network, student, predictor.pre).to(device) if renormalized else network
    return Teacher(model, network, predictor.pre, parsed, renormalized)


def _preview(classes: list[str], limit: int = 6) -> str:
    classes = list(classes)
    if len(classes) <= limit:
        return repr(classes)
    return f"[{', '.join(repr(c) for c in classes[:limit])}, ...] ({len(classes)} classes)"
