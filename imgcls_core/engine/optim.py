"""Optimizers with per-group weight decay and LR, and per-step LR schedules.

Every schedule is built from torch.optim.lr_scheduler and advanced once per
optimizer step; warmup is a LinearLR chained in front with SequentialLR
(OneCycleLR has its own warm-up phase; ReduceLROnPlateau reacts per epoch to
the validation top-1 or loss once warmup, and with ``cosine_plateau`` the cosine
phase, is over). The cosine decays each parameter group to its own peak times
``min_lr_ratio`` (a backbone at a tenth of the head's LR ends at a tenth of the
head's floor).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.optim import lr_scheduler

from imgcls_core.config import OptimConfig
from imgcls_core.models import split_head_parameters


def scaled_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    """Linear LR scaling: ``lr * global_batch / ref_batch_size`` (off when ref_batch_size is 0)."""
    if cfg.ref_batch_size <= 0:
        return cfg.lr
    return cfg.lr * global_batch_size / cfg.ref_batch_size


def param_groups(
    model: nn.Module, cfg: OptimConfig, lr: float, backbone_lr_scale: float = 1.0
) -> list[dict]:
    """Split trainable parameters into (backbone|head) x (decay|no-decay) groups.

    Norm weights and biases (every parameter with ndim <= 1) get
    ``norm_weight_decay`` (0 by default): decaying them only hurts accuracy.
    """
    backbone, head = split_head_parameters(model)
    groups = []
    for named, scale in ((backbone, backbone_lr_scale), (head, 1.0)):
        decay = [p for _, p in named if p.ndim > 1]
        no_decay = [p for _, p in named if p.ndim <= 1]
        for params, wd in ((decay, cfg.weight_decay), (no_decay, cfg.norm_weight_decay)):
            if params:
                groups.append({"params": params, "weight_decay": wd, "lr": lr * scale})
    if not groups:
        raise ValueError("the model has no trainable parameters (are all stages frozen?)")
    return groups


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, betas=cfg.betas)


class LRSchedule:
    """One object the loop steps per batch (``step_batch``) and per epoch (``step_epoch``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int, steps_per_epoch: int):
        self.optimizer = optimizer
        self.kind = cfg.schedule
        self.steps_per_epoch = steps_per_epoch
        self.lr_used: float | None = None  # the LR of the last optimizer step taken
        total = max(1, epochs * steps_per_epoch)
        self.warmup_steps = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
        self.cosine_steps = (max(1, round(cfg.cosine_epochs * steps_per_epoch))
                             if cfg.schedule == "cosine_plateau" else 0)
        self.plateau_from = self.warmup_steps + self.cosine_steps  # the step after which plateau owns the LR
        self.plateau_key = f"val/{cfg.plateau_metric}"
        self.steps = 0
        self.plateau: lr_scheduler.ReduceLROnPlateau | None = None
        self.per_step = self._build(optimizer, cfg, total)

    def _build(self, opt, cfg: OptimConfig, total: int) -> lr_scheduler.LRScheduler | None:
        warm = self.warmup_steps
        if cfg.schedule == "onecycle":
            if total < 3:
                return None  # a one-cycle needs a rising and a falling step; keep the LR constant
            peaks = [g["lr"] for g in opt.param_groups]
            div = 1.0 / cfg.warmup_start_factor
            final_div = 1.0 / (div * cfg.min_lr_ratio) if cfg.min_lr_ratio > 0 else 1e4
            return lr_scheduler.OneCycleLR(
                opt, max_lr=peaks, total_steps=total, pct_start=min(max(warm, 2), total - 1) / total,  # torch divides by zero below 2
                div_factor=div, final_div_factor=final_div,
                # SGD's momentum cycles 0.95 -> 0.85 (at the LR's peak) -> 0.95, OneCycleLR's own
                # defaults (the recipes were tuned with them): optim.momentum only switches it on
                cycle_momentum=isinstance(opt, torch.optim.SGD) and cfg.momentum > 0,
            )
        warmup = lr_scheduler.LinearLR(opt, cfg.warmup_start_factor, 1.0, total_iters=warm) if warm else None
        main: lr_scheduler.LRScheduler | None = None
        rest = total - warm
        if cfg.schedule in ("cosine", "cosine_plateau"):
            main = lr_scheduler.LambdaLR(opt, _cosine(self.cosine_steps or rest, cfg.min_lr_ratio))
        elif cfg.schedule == "multistep":
            marks = sorted({max(1, round(m * total) - warm) for m in cfg.milestones})
            main = lr_scheduler.MultiStepLR(opt, milestones=marks, gamma=cfg.gamma)
        if cfg.schedule in ("plateau", "cosine_plateau"):
            self.plateau = lr_scheduler.ReduceLROnPlateau(
                opt, mode="min" if cfg.plateau_metric == "loss" else "max", factor=cfg.gamma,
                patience=cfg.plateau_patience,
            )
        if warmup and main:
            return lr_scheduler.SequentialLR(opt, [warmup, main], milestones=[warm])
        return warmup or main

    def step_batch(self) -> None:
        """After an optimizer step: the LR it used is :attr:`lr_used`; advance to the next step's."""
        self.lr_used = self.last_lr()
        self.steps += 1
        if self.per_step is None:
            return
        if self.plateau is not None and self.steps > self.plateau_from:
            return  # warmup (and cosine) over: plateau owns the LR from here
        self.per_step.step()

    def fast_forward(self, steps: int) -> None:
        """Advance a fresh schedule by ``steps`` optimizer steps without training (see Engine.adopt_state)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*lr_scheduler\.step\(\)", category=UserWarning)
            for _ in range(steps - self.steps):
                self.step_batch()

    def step_epoch(self, val_metrics: dict[str, float]) -> None:
        """The end of an epoch: plateau (once it owns the LR) gets val top-1 or loss, as configured."""
        if self.plateau is not None and self.steps >= self.plateau_from:
            self.plateau.step(val_metrics[self.plateau_key])

    def last_lr(self) -> float:
        """The (highest group's) LR the next optimizer step will use."""
        return max(g["lr"] for g in self.optimizer.param_groups)

    def epoch_lr(self) -> float:
        """The LR to report for the steps taken so far: the last one's (the next one's before any)."""
        return self.lr_used if self.lr_used is not None else self.last_lr()

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "steps_per_epoch": self.steps_per_epoch,
            "per_step": self.per_step.state_dict() if self.per_step else None,
            "plateau": self.plateau.state_dict() if self.plateau else None,
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("steps_per_epoch")  # absent from checkpoints of earlier versions
        if saved is not None and saved != self.steps_per_epoch:
            # the restored schedule's length and milestones are in steps: with another number per
            # epoch it would end early or late (a cosine stopping at a quarter of the peak, a
            # one-cycle raising "Tried to step ... times" before the last epoch ends)
            raise ValueError(
                f"the checkpoint's LR schedule was built for {saved} optimizer steps per epoch and this "
                f"run takes {self.steps_per_epoch} (another ray.num_workers, data.batch_size or number of "
                f"training images); resume with the settings it was trained with, or train in a new "
                f"train.output_dir")
        self.steps = state["steps"]
        if self.per_step and state["per_step"]:
            self.per_step.load_state_dict(state["per_step"])
        if self.plateau and state["plateau"]:
            self.plateau.load_state_dict(state["plateau"])


def _cosine(steps: int, floor: float):
    """LambdaLR's factor: a half cosine from 1 to ``floor`` over ``steps``, then ``floor``."""

    def factor(step: int) -> float:
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))

    return factor
