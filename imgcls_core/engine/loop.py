"""The training engine: one object holding everything a run's state is made of.

The same engine runs in the local runner and in every Ray Train worker: it
takes any iterable of ``(images, labels)`` batches (a DataLoader or Ray Data's
``iter_torch_batches``), and a distributed job hands it a ``wrap`` (DDP) for
the forward/backward model while the engine keeps the bare module for state.
With a ``teacher`` (knowledge distillation, imgcls_core.engine.distill) the
loss mixes in the teacher's softened outputs; the teacher is frozen, never
wrapped, averaged or saved: checkpoints are the student's alone.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from imgcls_core.config import Config, is_multi_label, score_name
from imgcls_core.engine.distill import distillation_loss
from imgcls_core.engine.optim import LRSchedule, build_optimizer, param_groups, scaled_lr
from imgcls_core.engine.runtime import Runtime, epoch_seed, rng_state, seed_everything, set_rng_state
from imgcls_core.evaluation import EvalReport, MultiLabelReport, accumulator
from imgcls_core.models import keep_frozen_bn_eval

Batch = tuple[torch.Tensor, torch.Tensor]
PROGRESS = ("loss_n", "correct", "n", "kd_n", "ce_n", "seconds")  # Engine's running sums of an epoch
BatchMix = Callable[[torch.Tensor, torch.Tensor], Batch]


def ddp_without_buffer_broadcast() -> dict[str, bool]:
    """DistributedDataParallel's keyword that turns off its per-step broadcast of rank 0's buffers
    (torch >= 2.14 names it forward_sync_buffers; buffers are still synced once, at wrap time). A
    job that passes it lets :meth:`Engine.sync_buffers` average the buffers once per epoch instead."""
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}


def multi_label_loss(kind: str, gamma: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Loss over every class of N x C multi-hot targets: binary cross-entropy, or torchvision's focal
    loss (alpha 0.25, ``gamma``), both averaged over images and classes."""
    if kind == "bce":
        return nn.BCEWithLogitsLoss()
    from torchvision.ops import sigmoid_focal_loss

    def focal(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sigmoid_focal_loss(logits, targets.to(logits.dtype), gamma=gamma, reduction="mean")

    return focal


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the LR is too high or the data is broken."""


class Engine:
    """Model + EMA + optimizer + schedule + scaler + counters, and the epoch loop."""

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        runtime: Runtime,
        steps_per_epoch: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        class_weights: torch.Tensor | None = None,
        batch_mix: BatchMix | None = None,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        teacher: nn.Module | None = None,
    ):
        self.cfg, self.runtime, self.rank, self.world_size = cfg, runtime, rank, world_size
        self.steps_per_epoch = steps_per_epoch
        self.model = model.to(runtime.device, memory_format=runtime.memory_format)
        self.global_batch_size = cfg.data.batch_size * world_size
        self.lr = scaled_lr(cfg.optim, self.global_batch_size)
        groups = param_groups(self.model, cfg.optim, self.lr, cfg.model.backbone_lr_scale)
        self.optimizer = build_optimizer(groups, cfg.optim)
        self.schedule = LRSchedule(self.optimizer, cfg.optim, cfg.train.epochs, steps_per_epoch)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.use_grad_scaler)
        self.ema = self._build_ema()
        # Multi-label runs (labels are N x C multi-hot) are judged by val mAP, single-label ones by top-1
        self.multi_label, self.score = is_multi_label(cfg), score_name(cfg)
        self.train_accuracy = "train/label_acc" if self.multi_label else "train/acc1"
        weight = class_weights.to(runtime.device) if class_weights is not None else None
        self.criterion = (multi_label_loss(cfg.train.multi_label_loss, cfg.train.focal_gamma) if self.multi_label
                          else nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing))
        self.batch_mix = batch_mix
        # Distillation (cfg.distill's temperature and alpha): a frozen network on the student's
        # device and memory format, outside DDP, the EMA and the state dict.
        self.teacher = (
            teacher.to(runtime.device, memory_format=runtime.memory_format).eval().requires_grad_(False)
            if teacher is not None else None
        )
        self._last_terms = (0.0, 0.0)  # the last step's (kd, ce) when distilling
        compiled = torch.compile(self.model) if cfg.train.compile else self.model
        self.train_model = wrap(compiled) if wrap else compiled
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken
        self.epoch_step = 0  # steps taken in the current, unfinished epoch (mid-epoch checkpoints)
        # The current epoch's running sums (loss * n, correct, n, kd * n, ce * n, seconds) on this rank;
        # a mid-epoch checkpoint stores their mean over ranks, and a run resumed from it starts from them.
        self._sums = torch.zeros(len(PROGRESS), dtype=torch.float64)
        self._checkpointed_sums: torch.Tensor | None = None  # the sums at the last mid-epoch checkpoint
        self._started = 0.0  # when this session's pass over the current epoch began
        self.best_acc1 = -1.0  # the best val score so far (top-1, or mAP when multi-label)
        # The best epoch's weights (train.final_weights best or auto): {"epoch", "source" ("last" or
        # "ema": the raw or averaged weights), "acc1" (its val score: top-1, or mAP when multi-label),
        # "model" (a CPU copy of the state)}.
        self.keep_best = cfg.train.final_weights in ("best", "auto")
        self.best: dict[str, Any] | None = None

    def _build_ema(self) -> AveragedModel | None:
        if self.cfg.train.ema_decay <= 0:
            return None
        # use_buffers=True averages BN running stats too, so the EMA model evaluates as is.
        return AveragedModel(
            self.model, multi_avg_fn=get_ema_multi_avg_fn(self.cfg.train.ema_decay), use_buffers=True
        )

    def describe(self) -> str:
        return (
            f"{self.runtime.describe()} world_size={self.world_size} "
            f"global_batch={self.global_batch_size} peak_lr={self.lr:.4g} "
            f"(optim.lr={self.cfg.optim.lr}, ref_batch_size={self.cfg.optim.ref_batch_size or 'off'})"
        )

    # ------------------------------------------------------------------ training

    def train_epoch(
        self, batches: Iterable[Batch], on_step: Callable[[dict[str, float]], None] | None = None
    ) -> dict[str, float]:
        """Train for one pass over ``batches``; returns ``train/*`` metrics averaged over ranks.

        After a mid-epoch checkpoint (``epoch_step`` > 0) the first ``epoch_step`` batches are
        skipped, the RNG is reseeded as the run that wrote the checkpoint reseeded it then, and the
        epoch's sums so far come from the checkpoint: the epoch continues where it was left, with
        the same random draws and the same epoch metrics."""
        self._reseed()
        self.train_model.train()
        keep_frozen_bn_eval(self.model)
        if self.teacher is not None:
            self.teacher.eval()  # BN statistics and dropout of the teacher stay frozen
        skip, restored = self.epoch_step, self._checkpointed_sums
        fresh = torch.zeros(len(PROGRESS), dtype=torch.float64)
        self._sums = restored.clone() if skip and restored is not None else fresh
        self._started = start = time.perf_counter()
        n_batches, earlier_s = 0, self._sums[5].item()
        it = iter(batches)
        if skip:
            for _ in zip(range(skip), it):  # loads (and augments) what was trained before the checkpoint
                pass
            self.reseed_mid_epoch()
        for images, labels in it:
            loss, correct, n = self._train_step(images, labels)
            self.epoch_step += 1
            kd, ce = self._last_terms if self.teacher is not None else (0.0, 0.0)
            self._sums[:5] += torch.tensor([loss * n, correct, n, kd * n, ce * n], dtype=torch.float64)
            n_batches += 1
            if on_step is not None and n_batches % self.cfg.train.log_every == 0:
                on_step({"loss": self._sums[0].item() / self._sums[2].item(), "lr": self.schedule.epoch_lr()})
        seconds = earlier_s + time.perf_counter() - start
        self.epoch_step, self._checkpointed_sums = 0, None  # the pass is complete; the next starts at its first batch
        self.sync_buffers()
        sums = self._all_reduce(self._sums[:5].clone())
        if sums[2] == 0:
            raise RuntimeError("the training data yielded no batches; is the training split empty?")
        metrics = {
            "train/loss": sums[0].item() / sums[2].item(),
            self.train_accuracy: sums[1].item() / sums[2].item(),
            "train/images_per_s": sums[2].item() / max(seconds, 1e-9),
            "train/epoch_s": seconds,
            "lr": self.schedule.epoch_lr(),  # the epoch's last step's (not the next epoch's first)
        }
        if self.teacher is not None:  # train/loss is the mixed loss; these are its two terms
            metrics["train/kd_loss"] = sums[3].item() / sums[2].item()
            metrics["train/ce_loss"] = sums[4].item() / sums[2].item()
        return metrics

    def mid_epoch_progress(self) -> None:
        """Every rank, before a mid-epoch checkpoint (collectives): keep the epoch's sums so far,
        summed over ranks and divided by their number, for :meth:`state_dict`. A run resumed from
        the checkpoint starts each rank from them, and the epoch's all-reduced sums come out whole.
        The ranks' BatchNorm statistics are averaged first, as at an epoch's end: every rank of the
        resumed run loads rank 0's, so all ranks of this run continue from that same average."""
        self.sync_buffers()
        sums = self._sums.clone()
        sums[5] += time.perf_counter() - self._started  # seconds: before this session (resumed) + in it
        self._checkpointed_sums = self._all_reduce(sums) / self.world_size

    def reseed_mid_epoch(self) -> None:
        """Reseed for the rest of the epoch from its step: after a mid-epoch checkpoint in the run that
        writes it, and in a run resumed from it once the trained batches are skipped."""
        seed_everything(epoch_seed(self.cfg.train.seed, self.epoch, self.rank, step=self.epoch_step))

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
        device = self.runtime.device
        images = images.to(device, non_blocking=True, memory_format=self.runtime.memory_format)
        labels = labels.to(device, non_blocking=True)
        hard = labels
        if self.batch_mix is not None:
            images, labels = self.batch_mix(images, labels)  # labels become soft (N x C)
        with torch.autocast(device.type, dtype=self.runtime.amp_dtype, enabled=self.runtime.amp_dtype is not None):
            logits = self.train_model(images)
            if self.teacher is None:
                loss = self.criterion(logits, labels)
            else:
                loss = self._distill(images, logits, labels)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.step} (epoch {self.epoch + 1}); "
                f"lower optim.lr (now {self.lr:.4g}) or check the input data"
            )
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step_batch()
        self.step += 1
        self._update_ema()
        if self.multi_label:  # the fraction of an image's class decisions (at probability 0.5) that are right
            correct = ((logits.detach() > 0) == (hard > 0.5)).float().mean(1).sum().item()
        else:
            correct = (logits.argmax(1) == hard).sum().item()
        return loss.item(), correct, hard.shape[0]

    def _distill(self, images: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The distillation loss of a step (inside the step's autocast); keeps its terms for the metrics.

        no_grad, not inference_mode: the teacher's logits meet the student's graph in the loss."""
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        loss, kd, ce = distillation_loss(logits, teacher_logits, labels, temperature=self.cfg.distill.temperature,
                                         alpha=self.cfg.distill.alpha, criterion=self.criterion)
        self._last_terms = tuple(torch.stack([kd.detach().float(), ce.detach().float()]).tolist())
        return loss

    def _update_ema(self) -> None:
        if self.ema is None or self.step % self.cfg.train.ema_steps:
            return
        self.ema.update_parameters(self.model)
        if self.epoch < self.cfg.optim.warmup_epochs:
            # During LR warmup the weights move fast; restart the average so it doesn't lag
            # (torchvision's reference recipe does the same).
            self.ema.n_averaged.fill_(0)

    def _reseed(self) -> None:
        seed_everything(epoch_seed(self.cfg.train.seed, self.epoch, self.rank))

    def end_epoch(self, metrics: dict[str, float]) -> None:
        """Advance the epoch counter, give the plateau schedule its metric and keep the weights
        when they are the best on val so far (``metrics``: the epoch's ``val/`` and ``val_ema/``)."""
        self.schedule.step_epoch(metrics)
        self.epoch += 1
        self.epoch_step = 0
        self.best_acc1 = max(self.best_acc1, metrics[f"val/{self.score}"])
        if self.keep_best:
            self._offer_best(metrics)

    def _offer_best(self, metrics: dict[str, float]) -> None:
        candidates = [("last", metrics[f"val/{self.score}"], self.model)]
        if self.ema is not None and f"val_ema/{self.score}" in metrics:
            candidates.append(("ema", metrics[f"val_ema/{self.score}"], self.ema.module))
        source, acc1, module = max(candidates, key=lambda c: c[1])  # a tie keeps the raw weights
        if self.best is None or acc1 > self.best["acc1"]:  # a tie keeps the earlier epoch
            self.best = {"epoch": self.epoch, "source": source, "acc1": float(acc1),
                         "model": {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch], class_names: list[str], use_ema: bool = False,
                 model: nn.Module | None = None) -> EvalReport | MultiLabelReport:
        """Evaluate on every rank's share and sum the counts over ranks before computing metrics
        (the trained weights, their EMA with ``use_ema``, or ``model``)."""
        if model is None:
            model = self.ema.module if use_ema and self.ema is not None else self.model
        model.eval()
        acc = accumulator(len(class_names), self.multi_label)
        device = self.runtime.device
        for images, labels in batches:
            images = images.to(device, non_blocking=True, memory_format=self.runtime.memory_format)
            with torch.autocast(device.type, dtype=self.runtime.amp_dtype, enabled=self.runtime.amp_dtype is not None):
                logits = model(images)
            acc.update(logits.float().cpu(), labels.cpu())
        if dist.is_available() and dist.is_initialized():
            acc = type(acc).from_state({k: self._all_reduce(v) for k, v in acc.state().items()})
        return acc.report(class_names)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (a collective: all ranks call it)."""
        return bool(self._all_reduce(torch.tensor([float(flag)], dtype=torch.float64)).item() > 0)

    def sync_buffers(self) -> None:
        """Average the floating-point buffers (BatchNorm running statistics) of the model and its
        EMA over ranks, so validation and checkpoints see one model: distributed jobs wrap the model
        in DDP without its per-step broadcast of rank 0's buffers, and every training pass ends here."""
        if self.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return
        modules = [self.model] + ([self.ema.module] if self.ema is not None else [])
        buffers = [b for m in modules for b in m.buffers() if b.is_floating_point()]
        if not buffers:
            return
        # one collective for all of them (a ResNet-50 has over 150), in float64 as _all_reduce sends
        flat = self._all_reduce(torch.cat([b.detach().reshape(-1).double() for b in buffers])) / self.world_size
        for buffer, mean in zip(buffers, flat.split([b.numel() for b in buffers])):
            buffer.copy_(mean.view_as(buffer))

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if not (dist.is_available() and dist.is_initialized()):
            return tensor
        # gloo and NCCL both reduce float64/int64; NCCL needs the tensor on the GPU.
        on = tensor.to(self.runtime.device) if dist.get_backend() == "nccl" else tensor.clone()
        dist.all_reduce(on)
        return on.cpu()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "epoch_step": self.epoch_step,
            "epoch_sums": self._checkpointed_sums if self.epoch_step else None,
            "best_acc1": self.best_acc1,
            "best": self.best,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self._load_scaler(state["scaler"])
        self.epoch, self.step, self.best_acc1 = state["epoch"], state["step"], state["best_acc1"]
        self.epoch_step = state.get("epoch_step", 0)
        self._checkpointed_sums = state.get("epoch_sums")
        self.best = state.get("best") if self.keep_best else None
        set_rng_state(state["rng"])

    def adopt_state(self, state: dict[str, Any]) -> None:
        """Continue from another run's state under this engine's own hyperparameters.

        Population-based training copies a stronger trial's checkpoint into a
        trial whose LR, weight decay or augmentation were just perturbed: the
        weights, EMA, optimizer moments and counters come from ``state``; the
        per-group LR and weight decay and the LR schedule come from this config,
        with the schedule advanced to the adopted step."""
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])  # moments; its group settings are replaced below
        for group, own in zip(self.optimizer.param_groups, hyper):
            group.update(own)
        self._load_scaler(state["scaler"])
        self.epoch, self.step, self.best_acc1 = state["epoch"], state["step"], state["best_acc1"]
        self.epoch_step = state.get("epoch_step", 0)
        self._checkpointed_sums = state.get("epoch_sums")
        self.best = None  # this trial's best counts from the adopted epoch on, under its own hyperparameters
        self.schedule.fast_forward(self.step)

    def _load_scaler(self, state: dict[str, Any]) -> None:
        """The GradScaler's state; an empty one (a run without fp16, which keeps no scale) leaves a
        fresh scaler, so a bf16 or fp32 checkpoint resumes under fp16 (amp auto on another GPU)."""
        if state:
            self.scaler.load_state_dict(state)

    def inference_model(self, weights: str = "last") -> nn.Module:
        """A standalone copy of the weights to export: ``last`` (as trained), ``ema`` (their
        average; the trained ones without an EMA) or ``best`` (the best epoch's, see end_epoch)."""
        source = self.ema.module if weights == "ema" and self.ema is not None else self.model
        model = copy.deepcopy(source)
        if weights == "best":
            if self.best is None:
                raise ValueError("no best epoch was kept (train.final_weights is neither best nor auto)")
            model.load_state_dict(self.best["model"])
        return model.eval().to(memory_format=torch.contiguous_format)

