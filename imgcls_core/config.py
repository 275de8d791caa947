"""Typed configuration: one tree of dataclasses shared by every job.

YAML in, strict ``from_dict`` out: an unknown key, a wrong type or a value
outside its allowed set raises :class:`ConfigError` naming the dotted key and
what was expected. Command lines override single values with dotted keys::

    cfg = load_config("configs/digits.yaml", overrides=["optim.lr=0.2"])

:func:`set_dotted` is the one place that sets a dotted key in a config dict
(overrides and Ray Tune samples alike).

Dicts exist only at process boundaries (Ray's ``train_loop_config``, MLflow
params): ``cfg.to_dict()`` there, ``Config.from_dict(d)`` on the other side.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range."""


# --------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    """Where the images are and how they are batched."""

    # imagefolder: <root>/<split>/<class>/<image>; parquet: <root>/<split>/*.parquet
    # (written by imgcls_core.data.shards); cifar10/cifar100: the python-pickle
    # folder; digits: scikit-learn's digits, materialized under <root> on first use.
    format: Literal["imagefolder", "parquet", "cifar10", "cifar100", "digits", "multi_digits"] = "digits"
    root: str = "data/digits"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # Used only when <root>/<val_split> does not exist: a stratified, seeded
    # fraction of the training split becomes the validation split.
    val_fraction: float = 0.1
    image_size: int = 32  # side of the square network input, in pixels
    # "dataset": mean/std computed from the training split; "imagenet": the
    # ImageNet statistics (for pretrained backbones); "auto": with model.pretrained,
    # the weights' own (torchvision weights' transforms, an imgcls model.pt's or
    # checkpoint's recorded mean/std), imagenet for other files; else dataset.
    normalization: Literal["auto", "dataset", "imagenet"] = "auto"
    batch_size: int = 128  # per worker
    eval_batch_size: int = 256
    num_workers: int = 0  # DataLoader worker processes; 0 decodes in the main process
    # Class imbalance: "weighted_loss" weights the loss by inverse class frequency,
    # "weighted_sampler" draws training samples with inverse-frequency weights.
    balance: Literal["none", "weighted_loss", "weighted_sampler"] = "none"
    seed: int = 0  # split and shuffling seed
    # Multi-label: each image has a set of labels (any number, none included). imagefolder then reads
    # <root>/<split>/<image> files and labels_file; parquet reads a list-of-labels "labels" column;
    # multi_digits (2-4 real digits composed into one image) is multi-label always.
    multi_label: bool = False
    # imagefolder + multi_label: CSV (path,labels with labels separated by spaces) or JSON
    # ({"<split>/<file>": ["label", ...]}), relative to root; paths are relative to root too
    labels_file: str = "labels.csv"


@dataclass
class AugmentConfig:
    """Training augmentation; see imgcls_core/data/presets.py for the strength mapping."""

    # 0 = resize (+ optional flip) only, 1 = strong: crop range, colour jitter,
    # auto-augment magnitude and random-erasing probability all scale with it.
    strength: float = 0.3
    policy: Literal["trivialaugment", "randaugment", "none"] = "trivialaugment"
    hflip: bool = False  # off by default: flipping changes the meaning of digits and text
    mixup_alpha: float = 0.0  # 0 disables MixUp
    cutmix_alpha: float = 0.0  # 0 disables CutMix
    eval_crop_ratio: float = 1.0  # eval resizes to image_size / ratio, then centre-crops
    # Decode the training images once, at image_size, into memory and augment whole batches at a
    # time (crop, flip, brightness/contrast, erasing: presets.BatchAugment) instead of image by
    # image in DataLoader workers: far less CPU per image on small images. Needs policy=none and
    # a training split that fits in memory (N x 3 x image_size^2 bytes).
    batched: bool = False


TORCHVISION_PREFIX = "torchvision:"  # model.pretrained: torchvision weights by name, not a file


@dataclass
class ModelConfig:
    """Which network to build (a name in imgcls_core.models' registry)."""

    name: str = "resnet18"
    # 3x3 stride-1 stem with no max-pool, for inputs of 64 px or less.
    # None = decide from data.image_size.
    small_input: bool | None = None
    width: float = 1.0  # channel multiplier; 1.0 keeps torchvision's shapes
    zero_init_residual: bool = False
    dropout: float = 0.0  # before the classifier
    # A local state_dict file, or torchvision:<WeightsEnum>.<NAME> (e.g.
    # torchvision:ResNet50_Weights.IMAGENET1K_V2) from torch's cache ($TORCH_HOME), downloaded if missing
    pretrained: str | None = None
    # Number of leading stages frozen: 0 none, 1 the stem, 2 stem+layer1, ... 5 all
    # but the classifier.
    freeze_stages: int = 0
    backbone_lr_scale: float = 1.0  # LR multiplier for everything but the classifier


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1  # peak LR for the reference batch size below
    # LR scales linearly with global batch size: lr * global_batch / ref_batch_size.
    # 0 disables scaling.
    ref_batch_size: int = 0
    momentum: float = 0.9
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    norm_weight_decay: float = 0.0  # weight decay for norm and bias parameters
    # cosine_plateau: cosine over optim.cosine_epochs (after warmup), then ReduceLROnPlateau from there
    schedule: Literal["cosine", "onecycle", "multistep", "plateau", "cosine_plateau", "constant"] = "cosine"
    warmup_epochs: float = 0.0  # linear warmup, counted in (fractional) epochs
    warmup_start_factor: float = 0.1  # warmup starts at lr * this
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # multistep, fraction of epochs
    gamma: float = 0.1  # multistep and plateau decay factor
    plateau_patience: int = 2  # epochs without val improvement before plateau decays
    # what plateau watches: val top-1 (up), val mAP (up; multi-label) or val loss (down)
    plateau_metric: Literal["acc1", "mAP", "loss"] = "acc1"
    cosine_epochs: float = 0.0  # cosine_plateau: epochs of cosine decay (after warmup) before plateau takes over


@dataclass
class TrainConfig:
    """The training loop and its numerics."""

    epochs: int = 10
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # 0 disables EMA; typical 0.999 with ema_steps 1..32
    ema_steps: int = 1  # update the EMA every this many optimizer steps
    grad_clip_norm: float = 0.0  # 0 disables clipping
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "auto": bf16 on GPUs that support it, else fp16 with GradScaler; off on CPU.
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: bool = True  # applied on CUDA only
    compile: bool = False  # torch.compile the model
    cudnn_benchmark: bool = True
    deterministic: bool = False  # deterministic kernels; slower
    seed: int = 0
    log_every: int = 20  # steps between progress updates
    output_dir: str = "runs/local"
    checkpoint_every_epochs: int = 1
    keep_checkpoints: int = 2
    # Local runs: continue from output_dir's latest checkpoint if there is one; false refuses an
    # output_dir that holds checkpoints. (A Ray job resumes from ray.storage_path/ray.name.)
    resume: bool = True
    # Besides every checkpoint_every_epochs epochs, also checkpoint whenever this many minutes
    # have passed since the last one, checked every log_every steps, mid-epoch included
    # (0 = off). Resuming from a mid-epoch checkpoint skips the batches already trained.
    checkpoint_every_minutes: float = 0.0
    # The weights the run ships (model.pt, MLflow): "last" epoch's, its "ema", the "best" epoch's
    # (raw or EMA, by val top-1), or "auto": whichever of those measures best on val.
    final_weights: Literal["auto", "best", "last", "ema"] = "auto"
    # Multi-label loss: binary cross-entropy on every class, or the focal loss (torchvision.ops
    # sigmoid_focal_loss, alpha 0.25) that down-weights the many easy negatives
    multi_label_loss: Literal["bce", "focal"] = "bce"
    focal_gamma: float = 2.0


@dataclass
class TrackingConfig:
    """MLflow tracking; jobs log from rank 0 only."""

    enabled: bool = False
    tracking_uri: str | None = None  # None = MLFLOW_TRACKING_URI from the environment
    experiment: str = "imgcls"
    run_name: str | None = None
    register_as: str | None = None  # registered model name for the final model
    promote_margin: float = 0.0  # jobs.promote: test top-1 the challenger must gain over the champion
    # TensorBoard event files in <train.output_dir>/tensorboard (rank 0), logged to MLflow too
    tensorboard: bool = True


@dataclass
class RayConfig:
    """How jobs/ run on a Ray cluster (ignored by the local runner)."""

    num_workers: int = 2  # Ray Train workers = DDP ranks
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used with use_gpu; a fraction shares one GPU between workers
    accelerator_type: str | None = None  # e.g. "A10G", "H100": only schedule on that GPU type
    sync_batchnorm: bool = False  # SyncBatchNorm across ranks (for small per-GPU batches)
    # "ray_data": Ray Data reads the Parquet shards and decodes/augments in CPU tasks;
    # "dataloader": a torch DataLoader with a distributed sampler on each worker;
    # "auto": ray_data for data.format=parquet, else dataloader.
    ingest: Literal["auto", "ray_data", "dataloader"] = "auto"
    # Where checkpoints and run state live: a local folder (made absolute) or a pyarrow
    # filesystem URI (s3://bucket/prefix, gs://..., hdfs://...). Multi-node runs need a
    # URI or a shared file system.
    storage_path: str = "results"
    name: str | None = None  # run name under storage_path; None = the name of train.output_dir
    max_failures: int = 0  # worker-group restarts from the last checkpoint before the job fails
    # The cluster adds nodes on demand (cluster launcher, KubeRay autoscaler): jobs then don't
    # refuse workers that the nodes running now cannot hold.
    autoscaling: bool = False


@dataclass
class TuneConfig:
    """Hyperparameter sweeps (jobs.tune): each trial is one jobs.train run."""

    space: str = "default"  # a file in tune_spaces/ (or a path)
    num_samples: int = 8  # trials (with grid entries: samples of every grid point)
    search: Literal["random", "grid"] = "random"
    scheduler: Literal["asha", "pbt", "fifo"] = "asha"  # fifo: every trial runs all epochs
    # Maximized (a loss or ece minimized: check_tune_metric). With train.ema_decay > 0, val_ema/acc1
    # ranks the averaged weights, which read an unfinished run better than the raw ones
    # (bench/tune_asha.py: ASHA's rungs, epoch 4 of 8 vs final, Spearman 0.84 vs 0.80, epoch 5 0.92 vs 0.58).
    metric: str = "val/acc1"
    grace_period: int = 1  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: float = 2.0  # ASHA: keep the best 1/reduction_factor at each rung
    perturbation_interval: int = 1  # PBT: epochs between exploit/explore decisions
    pbt_mutate: list[str] = field(default_factory=lambda: ["optim.lr", "augment.strength"])  # PBT: keys it perturbs
    quantile_fraction: float = 0.25  # PBT: the bottom fraction copies the top fraction's checkpoints
    pbt_synch: bool = False  # PBT: wait for every trial at each perturbation point (deterministic, slower)
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's CPUs/GPUs fit
    # One-worker ASHA/FIFO trials train in the trial's own process (no worker group to start);
    # false: every trial on its own TorchTrainer, as multi-worker and PBT trials always are.
    in_trial: bool = True
    seed: int | None = None  # seeds the random search: the same seed draws the same trials
    name: str | None = None  # sweep name under ray.storage_path; None = "<ray.name>-sweep"


@dataclass
class ServeConfig:
    """The inference service (serve/): which registry model it serves and how it batches and scales."""

    model_name: str | None = None  # registered model; None = tracking.register_as
    alias: str = "champion"  # the registry alias it follows
    version: str | None = None  # pin one version instead of following the alias
    poll_interval_s: float = 15.0  # how often replicas check where the alias points (0 = never)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    top_k: int = 5  # default number of classes per image in a response
    max_batch_size: int = 32  # images per forward pass
    # "dynamic": each forward pass takes every image queued when the model becomes free (as
    # Triton's dynamic batcher); "timeout": Ray Serve's @serve.batch, which seals a batch
    # batch_wait_timeout_s after its first image. BENCHMARKS.md compares them.
    batcher: Literal["dynamic", "timeout"] = "dynamic"
    batch_wait_timeout_s: float = 0.01  # how long a "timeout" batch waits to fill
    max_concurrent_batches: int = 1  # forward passes a replica runs at once
    # Requests a replica accepts at once (raised to at least max_batch_size x max_concurrent_batches
    # so that batches can fill); those beyond a forward pass wait in the batcher's queue, and the next
    # batch takes them. Beyond this, max_queued_requests more wait at the replica, then 503.
    max_ongoing_requests: int = 64
    max_queued_requests: int = 64  # per caller (proxy); beyond it: 503 + Retry-After (-1 = unbounded)
    retry_after_s: float = 1.0  # the Retry-After of a 503
    request_timeout_s: float = 30.0  # a request still unanswered after this gets a 504
    max_body_bytes: int = 16 * 1024 * 1024  # larger bodies get 413
    max_files: int = 32  # images per request
    max_pixels: int = 25_000_000  # per image, checked from the header before decoding (413 above)
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 16.0  # autoscaling target per replica
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica; a fraction shares a GPU
    torch_threads: int = 0  # intra-op threads per replica (0 = torch's default)
    # Memory each replica declares to Ray (its "memory" resource), so Ray places replicas only where
    # they fit; 0 declares none. The default covers a small model's replica (measured RSS in README).
    memory_mb: int = 1024
    # Bearer token: when this environment variable is set (on the replicas), /v1/* answers
    # 401 to requests without "Authorization: Bearer <token>". Health probes stay open.
    token_env: str = "IMGCLS_SERVE_TOKEN"
    # "auto" runs the version's checked ONNX export (jobs.export) with ONNX Runtime when it has one
    # and it answers a batch of max_batch_size faster than PyTorch on the replica (timed at load;
    # /v1/model says which and why), else the PyTorch weights; "torch" the registered PyTorch
    # weights; "onnx" the ONNX export; "tensorrt" the version's TensorRT engine
    # (jobs.export --formats tensorrt; needs a GPU per replica and the tensorrt extra).
    backend: Literal["auto", "torch", "onnx", "tensorrt"] = "auto"
    # onnx backend: "int8" runs the version's int8 ONNX file instead of its fp32 export; torch (or
    # auto) backend: "bf16" runs its weights under bf16 autocast, on hardware with native bf16
    # (AVX512-BF16/AMX CPUs, Ampere+ GPUs). Each once jobs.compress (--method static|dynamic, or
    # bf16) tagged the version servable: its test top-1 within 1 point of fp32.
    precision: Literal["fp32", "int8", "bf16"] = "fp32"


#: serve.backend values that can serve each reduced serve.precision (auto serves bf16 with torch)
PRECISION_BACKENDS = {"int8": ("onnx",), "bf16": ("auto", "torch")}


def precision_backend_error(precision: str, backend: str) -> str | None:
    """Why ``serve.backend`` cannot serve ``serve.precision``, or None when it can (the one check
    of both config validation and the serving loader)."""
    backends = PRECISION_BACKENDS.get(precision, (backend,))
    if backend in backends:
        return None
    return f"serve.precision: {precision} is served by serve.backend={backends[-1]} (it is {backend})"


@dataclass
class DistillConfig:
    """Knowledge distillation (jobs.distill): the teacher whose soft labels the student learns from.

    The student is the config's ``model`` section; the loss is
    ``alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels)``.
    """

    teacher: str | None = None  # models:/name@alias, models:/name/version, or a model.pt path
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the distillation term; 0 = plain training


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Config:
        cfg = _build(cls, data or {}, "")
        validate(cfg)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """``{"optim.lr": 0.1, ...}``: for MLflow params and result tables."""
        return flat_config(self.to_dict())


def flat_config(data: dict[str, Any]) -> dict[str, Any]:
    """A config as a plain dict (``Config.to_dict()``, or the one a checkpoint stores) keyed
    ``section.key``: ``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``."""
    return {f"{section}.{key}": value for section, values in data.items() for key, value in values.items()}


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from defaults) and apply ``key.sub=value`` overrides.

    A file that cannot be used (missing, a folder, unreadable, not UTF-8, not valid YAML, not a
    mapping) raises :class:`ConfigError` with a one-line message naming it.
    """
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    for item in overrides or []:
        apply_override(data, item)
    return Config.from_dict(data)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file, not yet checked against the schema."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:  # permission denied, an I/O error, a dangling link, ...
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:  # an empty file (or only comments): the defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line: the problem and where (its own message spans several lines)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    if mark is None and isinstance(getattr(exc, "position", None), int):  # a ReaderError
        return f"{problem} (character {exc.position})"
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else str(problem)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b=value`` in a nested dict.

    The value is parsed as YAML (``0.2``, ``[1, 2]``, ``true``), except for text settings
    (``str`` and ``str | None`` fields: names, paths, versions), which take the text as written:
    YAML would turn ``12:30`` into 750, ``0755`` into 493, ``2024-01-15`` into a date and cut
    ``my run #2`` at the ``#``. Quotes (``'x'``, ``"x"``) are still removed, and for an optional
    text setting an empty value, ``null`` or ``~`` means None.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key = key.strip()
    kind = field_type(key)
    if _is_text(kind):
        set_dotted(data, key, _text_value(raw, optional=kind is not str))
        return
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {_yaml_problem(exc)}") from None
    set_dotted(data, key, value)


_YAML_NULLS = ("", "~", "null", "Null", "NULL")


def _is_text(tp: Any) -> bool:
    """``str`` or ``str | None``: a setting whose value is text (a name, a path, a version)."""
    if tp is str:
        return True
    return get_origin(tp) in (Union, types.UnionType) and set(get_args(tp)) == {str, type(None)}


def _text_value(raw: str, *, optional: bool) -> str | None:
    """A text setting's value from a command line: the text as written, surrounding blanks and one
    pair of YAML quotes removed; None for an empty value, and for ``null``/``~`` where None is allowed."""
    text = raw.strip()
    if not text or (optional and text in _YAML_NULLS):
        return None  # for a required setting, Config.from_dict then says a string is expected
    quoted = _quoted_scalar(text)
    return text if quoted is None else quoted


def _quoted_scalar(text: str) -> str | None:
    """The value of ``text`` when all of it is one YAML-quoted scalar (``'my run'``, ``"a\tb"``), else None."""
    if text[0] not in "'\"":
        return None
    try:
        scalars = [t for t in yaml.scan(text) if isinstance(t, yaml.ScalarToken)]
    except yaml.YAMLError:
        return None  # an unbalanced quote: the text as written
    if len(scalars) == 1 and scalars[0].style in ("'", '"') and scalars[0].end_mark.index == len(text):
        return scalars[0].value
    return None


def field_type(key: str, *, schema: type | None = None) -> Any:
    """The type of the dotted config key ``key`` in ``schema`` (default :class:`Config`), e.g.
    ``float`` for ``optim.lr``.

    Every part of the key is checked: a misspelt section or key raises a :class:`ConfigError`
    that names it, the close matches and the allowed names."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"config key {key!r} must look like section.key")
    tp: Any = Config if schema is None else schema
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"config key {key!r}: {where!r} is a value, not a section")
        fields = {f.name: f for f in dataclasses.fields(tp)}
        if part not in fields:
            raise ConfigError(_unknown_key(_join(where, part), list(fields), where))
        tp = typing.get_type_hints(tp)[part]
    return tp


def set_dotted(data: dict[str, Any], key: str, value: Any, *, schema: type | None = None) -> None:
    """Set the dotted config key ``key`` (``optim.lr``; any depth) to ``value`` in ``data``, a
    config in its dict form (``Config.to_dict()``, a YAML file's mapping), in place.

    Every part of the key is checked against ``schema`` (default :class:`Config`) first
    (:func:`field_type`), so a misspelt section or key fails here with a :class:`ConfigError`
    that names it, the close matches and the allowed names, and changes nothing. Missing
    sections are created. The value itself is checked later, by ``Config.from_dict``.
    Command-line overrides (:func:`apply_override`) and Ray Tune samples
    (``tune_spaces.apply_sample_dict``) both set keys through this function.
    """
    field_type(key, schema=schema)
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:  # absent, or a section left empty in a YAML file
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:depth + 1])}: expected a mapping, got {child!r}")
        node = child
    node[parts[-1]] = value


def _unknown_key(key: str, allowed: list[str], prefix: str) -> str:
    """``unknown config key 'optim.lrr' (did you mean 'lr'?); allowed keys in optim: ...``."""
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, allowed, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return (f"unknown config key {key!r}{hint}; allowed keys{' in ' + prefix if prefix else ''}: "
            f"{', '.join(allowed)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted((k for k in data if k not in names), key=str)  # a YAML key can be a number
    if unknown:
        raise ConfigError(_unknown_key(_join(prefix, str(unknown[0])), names, prefix))
    kwargs = {name: _coerce(hints[name], data[name], _join(prefix, name)) for name in names if name in data}
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(tp: Any, value: Any, key: str) -> Any:  # noqa: PLR0911 - one branch per type kind
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, key)  # a section left empty in a YAML file: None
    if origin is Literal:
        allowed = get_args(tp)
        if value is False and "off" in allowed:  # YAML 1.1 reads an unquoted off (or no, false) as False
            return "off"
        if value not in allowed:
            hint = (" (YAML reads unquoted yes/no/on/off/true/false as a boolean)"
                    if isinstance(value, bool) else "")
            raise ConfigError(f"{key}: {value!r} is not allowed{hint}; choose one of {list(allowed)}")
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key}: a value is required")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            number = _float_or_none(value)  # YAML 1.1 reads 1e-4 (no dot) as text
            value = value if number is None else number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # `version: 3` in a YAML file reads as the integer 3
        if isinstance(value, datetime.date):  # a datetime too
            raise ConfigError(f"{key}: YAML reads the unquoted {value.isoformat()} as a date; quote it to keep "
                              f"it as text ({key.rsplit('.', 1)[-1]}: \"{value.isoformat()}\")")
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")  # a schema bug


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- validation

# (dotted key, lowest, highest) allowed value of numeric fields, both inclusive.
_RANGES: list[tuple[str, float, float]] = [
    ("data.val_fraction", 0.0, 0.9),
    ("data.image_size", 8, 4096),
    ("data.batch_size", 1, 1 << 16),
    ("data.eval_batch_size", 1, 1 << 16),
    ("data.num_workers", 0, 256),
    ("data.seed", 0, 2**32 - 1),  # numpy's and scikit-learn's seeds
    ("augment.strength", 0.0, 1.0),
    ("augment.mixup_alpha", 0.0, 10.0),
    ("augment.cutmix_alpha", 0.0, 10.0),
    ("augment.eval_crop_ratio", 0.1, 1.0),
    ("model.width", 0.0625, 8.0),
    ("model.dropout", 0.0, 0.99),
    ("model.freeze_stages", 0, 5),
    ("model.backbone_lr_scale", 0.0, 10.0),
    ("optim.lr", 1e-8, 100.0),
    ("optim.ref_batch_size", 0, 1 << 20),
    ("optim.momentum", 0.0, 0.999),
    ("optim.weight_decay", 0.0, 1.0),
    ("optim.norm_weight_decay", 0.0, 1.0),
    ("optim.warmup_start_factor", 1e-4, 1.0),
    ("optim.min_lr_ratio", 0.0, 1.0),
    ("optim.gamma", 1e-4, 1.0),
    ("optim.plateau_patience", 0, 1000),
    ("optim.cosine_epochs", 0.0, 100_000.0),
    ("train.epochs", 1, 100_000),
    ("train.label_smoothing", 0.0, 0.5),
    ("train.ema_decay", 0.0, 0.99999),
    ("train.ema_steps", 1, 10_000),
    ("train.grad_clip_norm", 0.0, 1e6),
    ("train.log_every", 1, 1_000_000),
    ("train.checkpoint_every_epochs", 1, 100_000),
    ("train.keep_checkpoints", 1, 1000),
    ("train.checkpoint_every_minutes", 0.0, 1e6),
    ("train.focal_gamma", 0.0, 10.0),
    ("ray.num_workers", 1, 10_000),
    ("ray.cpus_per_worker", 0.0, 1024),
    ("ray.gpus_per_worker", 0.0, 64),
    ("ray.max_failures", -1, 1000),
    ("tracking.promote_margin", -1.0, 1.0),  # a difference of two fractions (top-1 or mAP)
    ("tune.num_samples", 1, 100_000),
    ("tune.grace_period", 1, 100_000),
    ("tune.reduction_factor", 1.01, 100.0),
    ("tune.perturbation_interval", 1, 100_000),
    ("tune.quantile_fraction", 0.01, 0.5),
    ("tune.max_concurrent_trials", 0, 100_000),
    ("serve.poll_interval_s", 0.0, 86_400.0),
    ("serve.top_k", 1, 1000),
    ("serve.max_batch_size", 1, 4096),
    ("serve.batch_wait_timeout_s", 0.0, 60.0),
    ("serve.max_concurrent_batches", 1, 64),
    ("serve.max_ongoing_requests", 1, 100_000),
    ("serve.max_queued_requests", -1, 1_000_000),
    ("serve.retry_after_s", 0.0, 3600.0),
    ("serve.request_timeout_s", 0.1, 3600.0),
    ("serve.max_body_bytes", 1024, 2**31),
    ("serve.max_files", 1, 4096),
    ("serve.max_pixels", 1, 2**31),
    ("serve.min_replicas", 0, 10_000),
    ("serve.max_replicas", 1, 10_000),
    ("serve.target_ongoing_requests", 0.1, 100_000.0),
    ("serve.upscale_delay_s", 0.0, 86_400.0),
    ("serve.downscale_delay_s", 0.0, 86_400.0),
    ("serve.num_cpus", 0.0, 1024.0),
    ("serve.num_gpus", 0.0, 64.0),
    ("serve.torch_threads", 0, 1024),
    ("serve.memory_mb", 0, 1 << 20),
    ("distill.temperature", 0.05, 100.0),
    ("distill.alpha", 0.0, 1.0),
]


def validate(cfg: Config) -> None:
    """Range and cross-field checks that the types alone cannot express."""
    flat = cfg.flat()
    for key, low, high in _RANGES:
        value = flat[key]
        if not low <= value <= high:
            raise ConfigError(f"{key}: {value!r} is out of range; expected {low} <= value <= {high}")
    if not 0.0 <= cfg.optim.warmup_epochs < cfg.train.epochs:
        raise ConfigError(
            f"optim.warmup_epochs: {cfg.optim.warmup_epochs} must be >= 0 and less than "
            f"train.epochs ({cfg.train.epochs})"
        )
    if cfg.optim.schedule == "cosine_plateau" and not (
            0.0 < cfg.optim.cosine_epochs <= cfg.train.epochs - cfg.optim.warmup_epochs):
        raise ConfigError(
            f"optim.cosine_epochs: {cfg.optim.cosine_epochs} must be > 0 and at most train.epochs - "
            f"optim.warmup_epochs ({cfg.train.epochs - cfg.optim.warmup_epochs:g}) with schedule cosine_plateau"
        )
    if cfg.optim.schedule == "cosine_plateau" and cfg.optim.min_lr_ratio <= 0:
        raise ConfigError(
            "optim.min_lr_ratio: cosine_plateau hands the LR the cosine ends at to plateau, which only lowers "
            "it; with 0 the plateau epochs train at LR 0. Set a floor, e.g. optim.min_lr_ratio=0.1")
    if cfg.optim.schedule in ("plateau", "cosine_plateau") and cfg.optim.gamma >= 1.0:
        raise ConfigError(f"optim.gamma: {cfg.optim.gamma} must be below 1 with schedule {cfg.optim.schedule} "
                          f"(the factor plateau multiplies the LR by)")
    if not all(0.0 <= beta < 1.0 for beta in cfg.optim.betas) or len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: {list(cfg.optim.betas)} must be two numbers in [0, 1) (AdamW's moment decays)")
    splits = {"data.train_split": cfg.data.train_split, "data.val_split": cfg.data.val_split,
              "data.test_split": cfg.data.test_split}
    # the same folder however written: "train/", "./train", and "Train" on a case-insensitive file system
    if len({os.path.normpath(v).casefold() for v in splits.values()}) < len(splits):
        raise ConfigError(f"{', '.join(f'{k}={v!r}' for k, v in splits.items())}: the three splits must be "
                          f"different folders (a model tested on its training images would look better than it is)")
    if not cfg.tracking.experiment.strip():
        raise ConfigError("tracking.experiment: an MLflow experiment needs a name (default: imgcls)")
    for key in ("tracking.register_as", "serve.model_name"):
        if (error := registered_name_error(flat[key])) is not None:
            raise ConfigError(f"{key}: {error}")
    if cfg.serve.version is not None and not re.fullmatch(r"[1-9][0-9]*", cfg.serve.version):
        raise ConfigError(f"serve.version: {cfg.serve.version!r} is not a registered model version (1, 2, 3, ... "
                          f"as MLflow numbers them, without leading zeros)")
    if cfg.train.final_weights == "ema" and cfg.train.ema_decay <= 0:
        raise ConfigError("train.final_weights: ema needs an EMA of the weights; set train.ema_decay (e.g. 0.98) "
                          "or choose auto, best or last")
    if any(not 0.0 < m < 1.0 for m in cfg.optim.milestones) or sorted(cfg.optim.milestones) != list(
        cfg.optim.milestones
    ):
        raise ConfigError(
            f"optim.milestones: {cfg.optim.milestones} must be increasing fractions of training in (0, 1)"
        )
    if cfg.augment.batched and cfg.augment.policy != "none":
        raise ConfigError(f"augment.batched: batch augmentation has no auto-augment policy (crops, flips, "
                          f"brightness/contrast and erasing only); set augment.policy=none "
                          f"(it is {cfg.augment.policy!r})")
    if cfg.augment.batched and cfg.data.balance == "weighted_sampler":
        raise ConfigError("augment.batched draws its own shuffled order per epoch; data.balance=weighted_sampler "
                          "is not available with it (data.balance=weighted_loss is)")
    if cfg.tune.metric.startswith("val_ema/") and cfg.train.ema_decay <= 0:
        raise ConfigError(f"tune.metric: {cfg.tune.metric} is reported only for runs with an EMA of the weights; "
                          f"set train.ema_decay (e.g. 0.98) or use val/{cfg.tune.metric.split('/', 1)[1]}")
    _validate_multi_label(cfg)
    if cfg.ray.sync_batchnorm and not cfg.ray.use_gpu:
        raise ConfigError("ray.sync_batchnorm: SyncBatchNorm runs on GPUs only; set ray.use_gpu=true or turn it off")
    if error := precision_backend_error(cfg.serve.precision, cfg.serve.backend):
        raise ConfigError(error)
    if cfg.serve.min_replicas > cfg.serve.max_replicas:
        raise ConfigError(f"serve.min_replicas: {cfg.serve.min_replicas} is more than serve.max_replicas "
                          f"({cfg.serve.max_replicas})")
    # the registry and its models are the source of truth (imported here: they import this module)
    from imgcls_core.models import check_model_config, list_models

    if cfg.model.name not in list_models():
        raise ConfigError(f"model.name: {cfg.model.name!r} is not registered; choose one of {list_models()}")
    try:
        check_model_config(cfg.model, cfg.data.image_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def registered_name_error(name: str | None) -> str | None:
    """Why MLflow's model registry would refuse ``name`` (None: it takes it, or no name is given)."""
    if name is None:
        return None
    if not name.strip():
        return "a registered model needs a name"
    if "/" in name or ":" in name:
        return f"{name!r}: MLflow's registered model names cannot contain '/' or ':'"
    return None


def is_multi_label(cfg: Config | DataConfig) -> bool:
    """Whether a run's images carry label sets (data.multi_label, or a multi-label data format)."""
    data = cfg.data if isinstance(cfg, Config) else cfg
    return data.multi_label or data.format == "multi_digits"


def score_name(cfg: Config) -> str:
    """The metric a run is judged by (best epoch, final weights, checkpoints kept, promotion):
    top-1 accuracy, or mean average precision for multi-label runs."""
    return "mAP" if is_multi_label(cfg) else "acc1"


def _validate_multi_label(cfg: Config) -> None:
    """Settings that only make sense with one label per image (or with label sets)."""
    if not is_multi_label(cfg):
        if cfg.optim.schedule in ("plateau", "cosine_plateau") and cfg.optim.plateau_metric == "mAP":
            raise ConfigError("optim.plateau_metric: mAP is reported by multi-label runs only; use acc1 or loss")
        return
    if cfg.data.format in ("cifar10", "cifar100", "digits"):
        raise ConfigError(f"data.multi_label: data.format={cfg.data.format} has one label per image; use "
                          "imagefolder (with data.labels_file), parquet (a labels column) or multi_digits")
    single = {
        "augment.mixup_alpha": cfg.augment.mixup_alpha > 0, "augment.cutmix_alpha": cfg.augment.cutmix_alpha > 0,
        "train.label_smoothing": cfg.train.label_smoothing > 0, "data.balance": cfg.data.balance != "none",
        "distill.teacher": cfg.distill.teacher is not None, "ray.ingest": cfg.ray.ingest == "ray_data",
    }
    for key, used in single.items():
        if used:
            raise ConfigError(f"{key}: not available for multi-label runs (data.multi_label); unset it"
                              + (" or use ray.ingest=dataloader" if key == "ray.ingest" else ""))
    if cfg.optim.schedule in ("plateau", "cosine_plateau") and cfg.optim.plateau_metric == "acc1":
        raise ConfigError("optim.plateau_metric: acc1 is a single-label metric; multi-label runs report mAP "
                          "(use mAP or loss)")


# What each epoch's validation reports (imgcls_core.evaluation: EvalReport / MultiLabelReport.metrics),
# and whether a sweep looks for its largest ("max") or smallest ("min") value.
TUNE_METRICS = {"acc1": "max", "acc5": "max", "macro_f1": "max", "loss": "min", "ece": "min"}
MULTI_LABEL_TUNE_METRICS = {"mAP": "max", "micro_f1": "max", "macro_f1": "max", "micro_precision": "max",
                            "micro_recall": "max", "loss": "min"}


def check_tune_metric(cfg: Config) -> str:
    """A sweep's metric must be one its runs report on val each epoch (``val/<name>``, or
    ``val_ema/<name>`` with an EMA; multi-label runs report mAP, not top-1). Returns its mode:
    "max", or "min" for a loss or calibration error."""
    prefix, _, name = cfg.tune.metric.partition("/")
    multi = is_multi_label(cfg)
    names = MULTI_LABEL_TUNE_METRICS if multi else TUNE_METRICS
    if multi and name in ("acc1", "acc5"):
        raise ConfigError(f"tune.metric: {cfg.tune.metric} is a single-label metric; multi-label runs report "
                          f"val/mAP (set tune.metric=val/mAP)")
    if prefix not in ("val", "val_ema") or name not in names:
        raise ConfigError(f"tune.metric: {cfg.tune.metric!r} is not reported by {'multi-label ' if multi else ''}"
                          f"runs each epoch; choose val/<name> or val_ema/<name> with <name> one of {list(names)}")
    return names[name]


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
