"""Hyperparameter sweeps on Ray Tune: every trial is one jobs.train run (Ray Train V2 pattern).

    python -m jobs.submit -- python -m jobs.tune --config configs/digits_ray.yaml \\
        --set tune.space=default --set tune.num_samples=8 [--set tune.scheduler=asha]

The search space is a file in tune_spaces/ (validated before any trial starts).
Each trial samples it, applies the sample to the config and runs its own
TorchTrainer, whose metrics reach Tune through TuneReportCallback; ASHA stops
weak trials early by ``epoch``. MLflow holds one parent run per sweep (space,
scheduler, search settings as params; results table, plots and the best
trial's config as artifacts) with one nested child run per trial. The best
config is written to ``<train.output_dir>/best_config.yaml`` and is accepted
unchanged by ``python -m jobs.train --config``. Re-running a sweep with the same
name resumes it (Tuner.restore): finished trials are not run again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from imgcls_core.config import Config
from jobs.common import add_config_args, init_ray, job_config, resolve_config_paths

BASE_KEY = "__imgcls_base__"
TRIAL_DRIVER_CPU = 0.1  # Tune needs a non-empty request for the function that drives a trial  # carries the base config and sweep ids inside Tune's param space


def concurrent_trials(cfg: Config, cluster: dict[str, float]) -> int:
    """How many trials fit at once: cluster CPUs (and GPUs) over one trial's workers' needs."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    fits = [cluster.get("CPU", 1) / (cfg.ray.num_workers * cfg.ray.cpus_per_worker + TRIAL_DRIVER_CPU)]
    if cfg.ray.use_gpu:
        fits.append(cluster.get("GPU", 0) / max(cfg.ray.num_workers * cfg.ray.gpus_per_worker, 1e-9))
    return max(1, int(min(fits)))


def run_trial(params: dict[str, Any]) -> None:
    """One Tune trial: the base config + this trial's sample, trained by jobs.train."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.train import build_trainer, plan_training, start_tracking
    from tune_spaces import apply_sample

    meta = params[BASE_KEY]
    sample = {k: v for k, v in params.items() if k != BASE_KEY}
    cfg = apply_sample(Config.from_dict(meta["config"]), sample)
    trial = ray.tune.get_context().get_trial_name()
    cfg.ray.name = f"{meta['sweep']}-{trial}"
    cfg.train.output_dir = str(Path(meta["output_dir"]) / trial)
    cfg.tracking.run_name = trial
    plan = plan_training(cfg, log=lambda m: None)
    start_tracking(plan, parent_run_id=meta["parent_run_id"])
    build_trainer(plan, callbacks=[TuneReportCallback()]).fit()


def run_sweep(cfg: Config, *, log=print) -> dict[str, Any]:
    """Run (or resume) the sweep on the connected Ray cluster; returns the best trial's summary."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from imgcls_core.tracking import Tracker
    from tune_spaces import apply_sample, load_space

    cfg = resolve_config_paths(cfg)
    space = load_space(cfg.tune.space, cfg)  # fails here, before any trial, on a bad space
    sweep = cfg.tune.name or f"{cfg.ray.name or Path(cfg.train.output_dir).name}-sweep"
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    parent = Tracker(cfg.tracking, log=log).start(run_key=f"sweep:{cfg.ray.storage_path}/{sweep}", run_name=sweep,
                                                  tags={"imgcls.job": "tune"})
    parent.log_params({"sweep.name": sweep, "sweep.space": cfg.tune.space, "sweep.scheduler": cfg.tune.scheduler,
                       "sweep.search": cfg.tune.search, "sweep.num_samples": cfg.tune.num_samples,
                       "sweep.metric": cfg.tune.metric, "sweep.grace_period": cfg.tune.grace_period,
                       "sweep.reduction_factor": cfg.tune.reduction_factor, **space.params()})

    param_space = space.to_ray() if cfg.tune.search == "random" else _as_grid(space)
    param_space[BASE_KEY] = {"config": cfg.to_dict(), "sweep": sweep, "output_dir": str(out / "trials"),
                             "parent_run_id": parent.run_id}
    epochs = cfg.train.epochs
    scheduler = (
        ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=min(cfg.tune.grace_period, epochs),
                      reduction_factor=cfg.tune.reduction_factor)
        if cfg.tune.scheduler == "asha" else FIFOScheduler()
    )
    concurrency = concurrent_trials(cfg, ray.cluster_resources())
    log(f"sweep {sweep}: {cfg.tune.num_samples} samples of {space.name} "
        f"({', '.join(space.dists)}), {cfg.tune.scheduler}, {concurrency} trial(s) at a time")
    # The trial function only drives its TorchTrainer, which reserves the workers' resources itself.
    trainable = tune.with_resources(run_trial, {"CPU": TRIAL_DRIVER_CPU})
    path = f"{cfg.ray.storage_path}/{sweep}"
    if tune.Tuner.can_restore(path):
        log(f"resuming sweep {sweep} from {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, param_space=param_space, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode="max", scheduler=scheduler,
                                        num_samples=cfg.tune.num_samples, max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=sweep, storage_path=cfg.ray.storage_path),
        )
    results = tuner.fit()
    table = results.get_dataframe()
    table.to_csv(out / "sweep_results.csv", index=False)
    best = results.get_best_result(metric=cfg.tune.metric, mode="max", scope="all")
    best_sample = {k: v for k, v in best.config.items() if k != BASE_KEY}
    best_cfg = apply_sample(Config.from_dict(cfg.to_dict()), best_sample)
    (out / "best_config.yaml").write_text(best_cfg.to_yaml())
    histories = {r.path.rsplit("/", 1)[-1]: r.metrics_dataframe for r in results if r.metrics_dataframe is not None}
    plot = _plot_sweep(histories, table, cfg.tune.metric, list(space.dists), out / "sweep_curves.png")
    for file in (out / "sweep_results.csv", out / "best_config.yaml", plot):
        parent.log_artifact(file)
    best_value = best.metrics.get(cfg.tune.metric) if best.metrics else None
    parent.log_metrics({f"best/{cfg.tune.metric}": best_value or 0.0,
                        "trials": len(results), "errored_trials": results.num_errors}, step=0)
    summary = {"sweep": sweep, "trials": len(results), "errors": results.num_errors,
               "best_metric": best_value, "best_sample": best_sample,
               "best_checkpoint": getattr(best.checkpoint, "path", None) or best.metrics.get("checkpoint_path"),
               "best_config": str(out / "best_config.yaml"), "parent_run_id": parent.run_id}
    (out / "sweep_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    parent.close(status="FINISHED" if results.num_errors == 0 else "FAILED")
    return summary


def _as_grid(space) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, dist in space.dists.items():
        if dist.kind not in ("choice", "grid"):
            raise ValueError(f"tune.search=grid needs list distributions; {key} is {dist.kind}")
        out[key] = tune.grid_search(list(dist.args))
    return out


def _plot_sweep(histories: dict, table, metric: str, keys: list[str], path: Path) -> Path:
    """Metric vs epoch for every trial, and the final metric against each numeric searched key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [k for k in keys if f"config/{k}" in table and table[f"config/{k}"].dtype.kind in "fi"]
    fig, axes = plt.subplots(1, 1 + len(numeric), figsize=(5 * (1 + len(numeric)), 3.8), squeeze=False)
    for name, frame in histories.items():
        if metric in frame and "epoch" in frame:
            rows = frame[frame.get("mid_epoch", 0) != 1] if "mid_epoch" in frame else frame
            axes[0][0].plot(rows["epoch"], rows[metric], marker="o", ms=3, label=name[:24])
    axes[0][0].set_xlabel("epoch")
    axes[0][0].set_ylabel(metric)
    axes[0][0].set_title("every trial")
    for ax, key in zip(axes[0][1:], numeric):
        ax.scatter(table[f"config/{key}"], table[metric])
        ax.set_xlabel(key)
        ax.set_ylabel(f"last {metric}")
        if key.endswith(".lr"):
            ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.tune", description=__doc__.split("\n\n")[0])
    add_config_args(parser, ray_address=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tune_spaces import SpaceError

    args, cfg, done = job_config(build_parser(), argv)
    if done is not None:
        return done
    try:
        from tune_spaces import load_space

        load_space(cfg.tune.space, cfg)  # a bad space fails before Ray starts
    except SpaceError as exc:
        print(f"error: bad search space: {exc}", file=sys.stderr)
        return 2
    init_ray(args.address)
    try:
        summary = run_sweep(cfg)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1, default=str))
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    from jobs.tune import main as _main  # run the importable module: Ray pickles __main__ by value

    sys.exit(_main())
