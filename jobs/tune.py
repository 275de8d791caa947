"""Hyperparameter sweeps on Ray Tune: every trial is one jobs.train run (Ray Train V2 pattern).

    python -m jobs.submit -- python -m jobs.tune --config configs/digits_ray.yaml \\
        --set tune.space=default --set tune.num_samples=8 [--set tune.scheduler=asha]

The search space is a file in tune_spaces/ (validated before any trial starts).
Each trial samples it, applies the sample to the config and trains: a trial
of one worker (ASHA/FIFO) in its own process (the same training session as a
Train worker, no worker group to start), otherwise on its own TorchTrainer,
whose metrics reach Tune through TuneReportCallback; ASHA stops
weak trials early by ``epoch``; PBT (``tune.scheduler=pbt``) trains
``tune.perturbation_interval`` epochs at a time and lets weak trials continue
from a strong trial's checkpoint with perturbed ``tune.pbt_mutate`` values. MLflow holds one parent run per sweep (space,
scheduler, search settings as params; results table, plots and the best
trial's config as artifacts) with one nested child run per trial. The best
config is written to ``<train.output_dir>/best_config.yaml`` and is accepted
unchanged by ``python -m jobs.train --config``. Re-running a sweep with the same
name resumes it (Tuner.restore): finished trials are not run again. A sweep whose
runs are not in the MLflow store configured now (a new local server, another
tracking URI) cannot be resumed into it: its finished trials would have no runs
there to promote. It is then renamed ``<name>.other-store-<time>`` beside and
started over. The Tune folder's ``imgcls_sweep_run.json`` records the parent run
the trials report to; a sweep whose record names another run, or that has none,
is set aside that way.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from imgcls_core.config import Config, check_tune_metric
from jobs.common import (
    INGEST_CPUS, add_config_args, fit_to_cluster, init_ray, is_uri, job_config, local_folder, read_record,
    resolve_config_paths, run_main,
)
from jobs.train import SUMMARY_FILE, check_data, resolve_ingest
from tune_spaces import SpaceError, plain

TRIAL_DRIVER_CPU = 0.1  # Tune needs a non-empty request for the function that drives a trial


def concurrent_trials(cfg: Config, cluster: dict[str, float], ingest: str = "dataloader") -> int:
    """How many trials fit at once: cluster CPUs (and GPUs) over one trial's workers' needs, plus
    a CPU for each trial's Ray Data tasks with that ingest."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    per_trial = cfg.ray.num_workers * cfg.ray.cpus_per_worker + (0.0 if trains_in_trial(cfg) else TRIAL_DRIVER_CPU)
    fits = [cluster.get("CPU", 1) / (per_trial + (INGEST_CPUS if ingest == "ray_data" else 0.0))]
    if cfg.ray.use_gpu:
        fits.append(cluster.get("GPU", 0) / max(cfg.ray.num_workers * cfg.ray.gpus_per_worker, 1e-9))
    return max(1, int(min(fits)))


def trains_in_trial(cfg: Config) -> bool:
    """Whether a trial trains in its own process rather than through a TorchTrainer: a one-worker
    trial (ASHA/FIFO) has nothing to distribute, and a worker group's start (a Train controller, a
    placement group, a worker actor, a process group) would cost every trial several seconds. PBT
    trials keep the TorchTrainer, which restarts from an exploited checkpoint in stretches."""
    return cfg.tune.in_trial and cfg.ray.num_workers == 1 and cfg.tune.scheduler != "pbt"


def trial_resources(cfg: Config) -> dict[str, float]:
    """What Tune reserves for one trial's function: the one worker's CPU (and GPU) when it trains
    in the trial, else a sliver to drive its TorchTrainer, which reserves the workers itself."""
    if not trains_in_trial(cfg):
        return {"CPU": TRIAL_DRIVER_CPU}
    return {"CPU": cfg.ray.cpus_per_worker, **({"GPU": cfg.ray.gpus_per_worker} if cfg.ray.use_gpu else {})}


def trial_config(sweep: dict[str, Any], sample: dict[str, Any], trial: str) -> Config:
    """The base config with a trial's sample applied, its own output folder, run name and checkpoint
    budget: the sweep's config dict is parsed (and validated) once per trial, here."""
    from tune_spaces import apply_sample_dict

    return Config.from_dict(apply_sample_dict(sweep["config"], {
        **sample, "ray.name": f"{sweep['name']}-{trial}", "train.output_dir": str(Path(sweep["output_dir"]) / trial),
        "train.keep_checkpoints": 1, "tracking.run_name": trial,
    }))


PBT_TIME = "pbt/epoch"


def run_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One Tune trial: the base config + this trial's sample, trained by jobs.train's TorchTrainer.

    ASHA/FIFO: one TorchTrainer for all epochs, its per-epoch metrics passed to Tune by
    TuneReportCallback (Tune stops the trial to stop it early). PBT: the trainer runs
    ``tune.perturbation_interval`` epochs at a time and each stretch's checkpoint is
    reported to Tune, which hands a weaker trial a stronger one's checkpoint (exploit)
    together with perturbed values (explore); the workers adopt that checkpoint's
    weights under the new hyperparameters (Engine.adopt_state)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.train import build_trainer, plan_training, start_tracking
    from tune_spaces import clip

    trial = ray.tune.get_context().get_trial_name()
    cfg = trial_config(sweep, clip(config, sweep["bounds"]), trial)
    run_key = f"{sweep['storage']}/{sweep['name']}/{trial}"  # one MLflow child run per trial, across restarts
    if (last := finished_trial_metrics(cfg)) is not None:
        # It finished, but the sweep's driver died before Tune recorded that: report its last
        # epoch again rather than start its workers (nothing is left to train).
        ray.tune.report(last)
        return
    if sweep["scheduler"] != "pbt":
        plan = plan_training(cfg, log=lambda m: None, run_key=run_key)
        start_tracking(plan, parent_run_id=sweep["parent_run_id"])
        if trains_in_trial(cfg):
            train_in_trial(plan)
        else:
            build_trainer(plan, callbacks=[TuneReportCallback()]).fit()
        return

    start = ray.tune.get_checkpoint()  # None, this trial's own last one, or (exploit) a stronger trial's
    if start is not None and _checkpoint_epoch(start) >= cfg.train.epochs:
        return  # PBT paused the trial at its last epoch (it perturbs there too): nothing is left to train
    source = Path(start.path).parent.name if start is not None else ""
    # A fresh Train run for each starting point: a Train run resumes its own checkpoints, and
    # after an exploit those are the wrong ones.
    segment = hashlib.sha1((start.path if start is not None else "scratch").encode()).hexdigest()[:8]
    cfg.ray.name = f"{cfg.ray.name}-{segment}"
    plan = plan_training(cfg, log=lambda m: None, run_key=run_key)
    own = Path(ray.tune.get_context().get_trial_dir()).name
    exploited = int(bool(source) and source != own)
    start_tracking(plan, parent_run_id=sweep["parent_run_id"], params=start is None)
    while True:
        result = build_trainer(plan, stop_after=sweep["perturbation_interval"], init_checkpoint=start).fit()
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        metrics["pbt/exploited"] = exploited  # this stretch started from another trial's checkpoint
        if metrics["epoch"] < cfg.train.epochs:
            metrics[PBT_TIME] = metrics["epoch"]  # the final report carries no time: no perturbation there
        metrics.update({f"pbt/{k}": v for k, v in cfg.flat().items()  # the values this stretch trained with
                        if k in sweep["pbt_mutate"] and isinstance(v, (int, float))})
        ray.tune.report(metrics, checkpoint=result.checkpoint)
        if metrics["epoch"] >= cfg.train.epochs:
            return
        start, exploited = None, 0  # the Train run resumes from its own checkpoint from here on


def train_in_trial(plan) -> None:
    """A one-worker trial's run in the trial's own process: the core's training session over
    DataLoaders, hosted like a Train worker but reporting metrics and checkpoints to Tune, and
    resuming from the checkpoint Tune hands back after a restart."""
    import ray.tune
    import torch

    from imgcls_core.data.preprocessing import Preprocessing
    from imgcls_core.engine.runtime import setup_runtime
    from imgcls_core.runner import build_session
    from imgcls_core.tracking import Tracker
    from jobs.train_worker import RayTrainHost, restore_checkpoint

    cfg = plan.cfg
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    host = RayTrainHost(0, Path(cfg.train.output_dir), api=ray.tune)
    runtime = setup_runtime(cfg.train)
    checkpoint = ray.tune.get_checkpoint()
    # restored first: a trial resuming from its checkpoint does not load model.pretrained again
    restored = restore_checkpoint(checkpoint, runtime.device, host.log) if checkpoint is not None else None
    session, _splits = build_session(cfg, host, job="train", pre=Preprocessing.from_dict(plan.preprocessing),
                                     runtime=runtime, resume=restored[0] if restored else None)
    if restored is not None:
        session.resume(*restored)
    tracker = Tracker(cfg.tracking, log=host.log).start(run_id=plan.mlflow_run_id or session.checkpoint_run_id,
                                                        run_key=plan.run_key)
    session.run(tracker)


def finished_trial_metrics(cfg: Config) -> dict[str, float] | None:
    """The last epoch's metrics of a trial whose run already finished every epoch (its
    train_summary.json says so), else None."""
    from imgcls_core.engine.session import read_history

    out = Path(cfg.train.output_dir)
    summary = out / SUMMARY_FILE
    if not summary.is_file() or json.loads(summary.read_text()).get("epochs", 0) < cfg.train.epochs:
        return None
    rows = read_history(out)
    return {k: v for k, v in rows[-1].items() if isinstance(v, (int, float))} if rows else None


def _checkpoint_epoch(checkpoint) -> int:
    with checkpoint.as_directory() as directory:
        return int(json.loads((Path(directory) / "metrics.json").read_text()).get("epoch", 0))


def check_sweep_data(cfg: Config) -> None:
    """Fail, before Ray or any trial starts, when the data every trial would train on is not there:
    jobs.train's data check, then the splits loaded as a trial's driver loads them. Raises
    FileNotFoundError or ValueError with the reason."""
    from imgcls_core.data import load_dataset

    cfg = resolve_config_paths(Config.from_dict(cfg.to_dict()))
    if is_uri(cfg.data.root):
        return  # remote data: each trial's driver checks what it can read
    check_data(cfg, resolve_ingest(cfg), missing="does not exist, so every trial would fail; prepare the data "
                                                  "(python -m jobs.prepare) or set data.root")
    load_dataset(cfg.data)


def run_sweep(cfg: Config, *, log=print, check_data: bool = True) -> dict[str, Any]:
    """Run (or resume) the sweep on the connected Ray cluster; returns the best trial's summary.

    The search space and the data are checked before any trial starts (``check_data=False``:
    the caller did). Once the sweep's MLflow run started, any error ends it FAILED."""
    import ray
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from imgcls_core.tracking import Tracker
    from tune_spaces import apply_sample, load_space

    # Tune snapshots the experiment state on every checkpoint (num_to_keep is set) and warns when that
    # happens more than once in 5 s, which short trials on a local disk always do, at no real cost.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # A mid-epoch checkpoint (train.checkpoint_every_minutes) is reported before the epoch's validation,
    # without the sweep's metric; Tune would end the whole sweep over it. Its schedulers skip such a
    # report, and tune.metric is checked against what every epoch reports (check_tune_metric).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    cfg = resolve_config_paths(cfg)
    mode = check_tune_metric(cfg)
    space = load_space(cfg.tune.space, cfg)  # fails here, before any trial, on a bad space
    mutations = space.mutations(cfg.tune.pbt_mutate) if cfg.tune.scheduler == "pbt" else {}
    param_space = space.to_ray() if cfg.tune.search == "random" else _as_grid(space)
    if check_data:
        check_sweep_data(cfg)
    sweep = cfg.tune.name or f"{cfg.ray.name or Path(cfg.train.output_dir).name}-sweep"
    path = f"{cfg.ray.storage_path}/{sweep}"
    definition = sweep_definition(cfg, space)
    if tune.Tuner.can_restore(path):
        _check_same_sweep(path, sweep, definition)  # before its MLflow run is touched
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _warn_without_state_api(log)

    parent = Tracker(cfg.tracking, log=log).start(run_key=f"sweep:{cfg.ray.storage_path}/{sweep}", run_name=sweep,
                                                  tags={"imgcls.job": "tune"})
    try:
        parent.log_params({"sweep.name": sweep, "sweep.space": cfg.tune.space, "sweep.scheduler": cfg.tune.scheduler,
                           "sweep.search": cfg.tune.search, "sweep.num_samples": cfg.tune.num_samples,
                           "sweep.metric": cfg.tune.metric, "sweep.epochs": cfg.train.epochs,
                           **_scheduler_params(cfg), **space.params()})
        for file in space.files:
            parent.log_artifact(file, "space")

        in_trial = trains_in_trial(cfg)
        if in_trial:
            cfg.ray.ingest = "dataloader"  # the trial's own process reads the data
        cluster, ingest = ray.cluster_resources(), resolve_ingest(cfg)
        concurrency = concurrent_trials(cfg, cluster, ingest)
        # Every trial then uses the ingest that fits beside the others (its own plan sees the whole cluster).
        cfg.ray.ingest = fit_to_cluster(cfg, ingest, cluster, trials=concurrency, log=log,
                                        trial_cpus=0.0 if in_trial else TRIAL_DRIVER_CPU)
        settings = {"config": cfg.to_dict(), "name": sweep, "storage": cfg.ray.storage_path,
                    "output_dir": str(out / "trials"), "parent_run_id": parent.run_id,
                    "scheduler": cfg.tune.scheduler, "perturbation_interval": cfg.tune.perturbation_interval,
                    "pbt_mutate": cfg.tune.pbt_mutate, "bounds": space.bounds()}
        log(f"sweep {sweep}: {cfg.tune.num_samples} sample(s) of {space.name} "
            f"({', '.join(space.dists)}), {cfg.tune.scheduler}, {concurrency} trial(s) at a time, "
            + ("each training in its trial's process" if in_trial else "each on a TorchTrainer"))
        trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=settings), trial_resources(cfg))
        started = time.perf_counter()
        restorable = tune.Tuner.can_restore(path)
        if restorable and _tracked_elsewhere(path, parent):
            moved, restorable = _set_aside(path, cfg), False
            log(f"sweep {sweep}: {path} holds a sweep tracked in another MLflow store (this store does not "
                f"hold its runs); starting it over, the old one kept as {moved}")
        _record_parent_run(path, parent, definition)
        if restorable:
            log(f"resuming sweep {sweep} from {path}: finished trials are kept, unfinished ones continue")
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=mode, scheduler=_scheduler(cfg, mutations),
                                            # (an explicit search_alg ignores max_concurrent_trials, with a
                                            # warning: it gets its own limit and the Tuner none)
                                            search_alg=BasicVariantGenerator(random_state=cfg.tune.seed,
                                                                             max_concurrent=concurrency)
                                            if cfg.tune.seed is not None else None,
                                            num_samples=cfg.tune.num_samples,
                                            max_concurrent_trials=concurrency if cfg.tune.seed is None else None,
                                            reuse_actors=False),
                run_config=tune.RunConfig(name=sweep, storage_path=cfg.ray.storage_path,
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
            )
        results = tuner.fit()
        seconds = time.perf_counter() - started
        _end_trial_runs(parent, results)

        table = results.get_dataframe()
        table.to_csv(out / "sweep_results.csv", index=False)
        best = _best_result(results, cfg, out / "trials", mode)
        best_sample = {k: plain(v) for k, v in best.config.items()}
        best_trial = _trial_dir(out / "trials", best).name
        best_cfg = apply_sample(cfg, best_sample)
        (out / "best_config.yaml").write_text(best_cfg.to_yaml())
        histories = {Path(r.path).name: r.metrics_dataframe for r in results if r.metrics_dataframe is not None}
        plot = _plot_sweep(histories, table, cfg.tune.metric, list(space.dists), out / "sweep_curves.png")
        for file in (out / "sweep_results.csv", out / "best_config.yaml", plot):
            parent.log_artifact(file)
        epochs_run = int(sum(_epochs(r) for r in results))
        exploits = int(sum(r.metrics_dataframe.get("pbt/exploited", 0).sum() for r in results
                           if r.metrics_dataframe is not None and "pbt/exploited" in r.metrics_dataframe))
        best_value = best.metrics.get(cfg.tune.metric)
        parent.log_metrics({f"best/{cfg.tune.metric}": best_value or 0.0, "trials": len(results),
                            "errored_trials": results.num_errors, "epochs_run": epochs_run, "pbt_exploits": exploits,
                            "sweep_seconds": seconds}, step=0)
        summary = {"sweep": sweep, "trials": len(results), "errors": results.num_errors, "epochs_run": epochs_run,
                   "epochs_without_stopping": len(results) * cfg.train.epochs, "pbt_exploits": exploits,
                   "seconds": round(seconds, 1), "best_metric": best_value, "best_sample": best_sample,
                   "best_trial": best_trial, "best_output_dir": str(out / "trials" / best_trial),
                   "best_config": str(out / "best_config.yaml"), "parent_run_id": parent.run_id,
                   "results": str(out / "sweep_results.csv")}
        (out / "sweep_summary.json").write_text(json.dumps(summary, indent=1, default=str))
        parent.log_artifact(out / "sweep_summary.json")
        parent.close(status="FINISHED" if results.num_errors == 0 else "FAILED")
        log(f"sweep {sweep}: {len(results)} trial(s), {results.num_errors} failed, {epochs_run} epochs in "
            f"{seconds:.0f} s; best {cfg.tune.metric} {best_value} ({summary['best_trial']})")
        return summary
    except BaseException as exc:
        # Whatever ends the sweep early ends its MLflow run too, and its trials' runs, rather than
        # leaving them RUNNING.
        # (ray.init's SIGTERM handler exits: SystemExit is a stop, as Ctrl-C is)
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
        _end_trial_runs(parent, None, status)
        parent.close(status=status)
        raise


def sweep_definition(cfg: Config, space) -> dict[str, Any]:
    """What a sweep is, for telling whether a re-run resumes the same one: the searched space and
    every setting of its trials and scheduler, less those a re-run may change (where it runs and
    reports: ray.*, tracking.*, serve.*; how many trials run at once)."""
    keep = {k: v for k, v in cfg.flat().items()
            if not k.startswith(("ray.", "tracking.", "serve.")) and k not in ("tune.max_concurrent_trials", "tune.name")}
    for key in PATH_KEYS:  # resolved to absolute paths (resolve_config_paths): the same folder through a symlink
        if isinstance(keep.get(key), str) and os.path.isabs(keep[key]):
            keep[key] = os.path.realpath(keep[key])
    return {**json.loads(json.dumps(keep, default=str)), **space.params()}


PATH_KEYS = ("data.root", "train.output_dir", "model.pretrained")  # (a torchvision: weights name is no path)


def _check_same_sweep(path: str, sweep: str, definition: dict[str, Any]) -> None:
    """Refuse to resume the sweep at ``path`` with other settings than it started with: Tuner.restore
    keeps its space, sample count and scheduler, while its trials would train with the new config."""
    was = read_record(_sweep_run_file(path)).get("definition")
    if not isinstance(was, dict):
        return  # remote storage, or a sweep recorded before definitions were
    # settings only one side has (a version of imgcls with other settings wrote the record) are not compared
    changed = [f"{k} {was[k]!r} -> {definition[k]!r}" for k in sorted(set(was) & set(definition))
               if was[k] != definition[k]]
    if set(was) ^ set(definition) and any(k.startswith("space.") for k in set(was) ^ set(definition)):
        changed.append(f"searched keys {sorted(k[6:] for k in was if k.startswith('space.'))} -> "
                       f"{sorted(k[6:] for k in definition if k.startswith('space.'))}")
    if changed:
        raise ValueError(
            f"sweep {sweep} in {path} was started with other settings ({'; '.join(changed[:8])}"
            f"{f'; and {len(changed) - 8} more' if len(changed) > 8 else ''}); re-running it resumes it as it was. "
            f"Set tune.name to start a new sweep, or re-run with the settings it started with")


def _end_trial_runs(parent, results, status: str = "KILLED") -> None:
    """End the MLflow runs of trials that did not end them: a trial stopped early (ASHA) or lost (an
    error, a dead worker) is ended by Tune killing its process. With ``results`` (the sweep's
    ResultGrid) a trial that errored ends FAILED, one that was stopped KILLED; without (the sweep
    itself failed), each ends ``status``."""
    if not parent.active:
        return
    errored = [Path(r.path).name for r in results if r.error] if results is not None else []

    def end() -> None:
        runs = parent.client.search_runs(
            [parent.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}' and attributes.status = 'RUNNING'")
        for run in runs:
            name = run.info.run_name or ""
            failed = any(d == name or d.startswith(f"{name}_") for d in errored)
            parent.client.set_terminated(run.info.run_id, status="FAILED" if failed else status)

    parent.call("the trials' run status", end)


SWEEP_RUN_FILE = "imgcls_sweep_run.json"  # in the sweep's Tune folder: the parent run its trials report to


def _sweep_run_file(path: str) -> Path | None:
    """The sweep's parent-run record, on local storage (None on remote storage)."""
    folder = local_folder(path)
    return folder / SWEEP_RUN_FILE if folder is not None else None


def _tracked_elsewhere(path: str, parent) -> bool:
    """Whether the restorable sweep at ``path`` reported to runs the current store does not hold:
    this store had no parent run for it, or the sweep's record names another (or none: the
    sweep predates the record, and resuming it may leave trials without runs here)."""
    if not parent.active:
        return False  # tracking is off or down: nothing to compare with, resume as before
    if not parent.continued:
        return True
    record = _sweep_run_file(path)
    if record is None:
        return False
    return read_record(record).get("parent_run_id") != parent.run_id  # no record, or not one this module wrote


def _record_parent_run(path: str, parent, definition: dict[str, Any]) -> None:
    """Record the sweep's parent run and definition; a run without tracking keeps the parent run
    recorded before (a later tracked run continues that one)."""
    record = _sweep_run_file(path)
    if record is None:
        return
    run_id = parent.run_id if parent.active else read_record(record).get("parent_run_id")
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"parent_run_id": run_id, "definition": definition}))


def _set_aside(path: str, cfg: Config) -> str:
    """Rename a sweep's Tune folder (local storage) so that a new sweep can take its name."""
    record = _sweep_run_file(path)
    if record is None:
        raise RuntimeError(
            f"the sweep in {path} was tracked in another MLflow store than "
            f"{cfg.tracking.tracking_uri or os.environ.get('MLFLOW_TRACKING_URI') or 'the default one'}, so its "
            f"finished trials have no runs there; point tracking.tracking_uri at the store it used, or set "
            f"tune.name to start a new sweep")
    old = record.parent
    new = old.with_name(f"{old.name}.other-store-{time.strftime('%Y%m%d-%H%M%S')}")
    old.rename(new)
    return str(new)


def _scheduler(cfg: Config, mutations: dict[str, Any]):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    epochs, t = cfg.train.epochs, cfg.tune
    if t.scheduler == "asha":
        # max_t one past the last epoch: at max_t ASHA stops the trial as soon as it reports, which
        # would kill it before its workers package the model (test evaluation, MLflow model).
        return ASHAScheduler(time_attr="epoch", max_t=epochs + 1, grace_period=min(t.grace_period, epochs),
                             reduction_factor=t.reduction_factor)
    if t.scheduler == "pbt":
        # Time runs on PBT_TIME, which a trial leaves out of its final report: PBT would otherwise
        # perturb at the last epoch too, and (synchronous mode) restart a finished trial from a
        # stronger trial's checkpoint that Tune may not have registered yet, i.e. an older one.
        return PopulationBasedTraining(time_attr=PBT_TIME, perturbation_interval=t.perturbation_interval,
                                       hyperparam_mutations=mutations, quantile_fraction=t.quantile_fraction,
                                       synch=t.pbt_synch, require_attrs=False)
    return FIFOScheduler()


def _scheduler_params(cfg: Config) -> dict[str, Any]:
    t = cfg.tune
    if t.scheduler == "asha":
        return {"sweep.grace_period": t.grace_period, "sweep.reduction_factor": t.reduction_factor}
    if t.scheduler == "pbt":
        return {"sweep.perturbation_interval": t.perturbation_interval, "sweep.pbt_mutate": ",".join(t.pbt_mutate),
                "sweep.quantile_fraction": t.quantile_fraction, "sweep.pbt_synch": t.pbt_synch}
    return {}


def _epochs(result) -> int:
    """Epochs a trial trained (PBT trials that adopted another's checkpoint count only their own)."""
    frame = result.metrics_dataframe
    if frame is None or "epoch" not in frame:
        return 0
    rows = frame[frame["mid_epoch"] != 1] if "mid_epoch" in frame else frame
    return len(rows)


def _trial_dir(trials: Path, result) -> Path:
    """The trial's output folder (named by jobs.tune.trial_config after Tune's trial name)."""
    return next((d for d in trials.glob(f"*_{result.metrics.get('trial_id')}")), trials / "missing")


def _best_result(results, cfg: Config, trials: Path, mode: str = "max"):
    """The best trial by its last metric (largest, or with ``mode="min"`` smallest), among those that
    trained every epoch and packaged their model."""
    finished = [r for r in results if r.metrics and r.metrics.get("epoch", 0) >= cfg.train.epochs
                and r.metrics.get(cfg.tune.metric) is not None]
    packaged = [r for r in finished if (_trial_dir(trials, r) / SUMMARY_FILE).exists()]
    if not (packaged or finished):
        raise RuntimeError(f"no trial finished all {cfg.train.epochs} epochs; see the errors above")
    return (max if mode == "max" else min)(packaged or finished, key=lambda r: r.metrics[cfg.tune.metric])


def _state_api_probe() -> str | None:
    try:
        from ray.util.state import list_actors

        list_actors(limit=1, timeout=10)
        return None
    except Exception as exc:  # noqa: BLE001 - whatever fails here fails Ray Train's cleaner too
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def _warn_without_state_api(log) -> None:
    """Tune stops a trial by killing its process; Ray Train's placement-group cleaner then frees
    the trial's workers, once the state API (served by the dashboard) says the trial's controller
    is dead. Probe that API from a Ray worker, where the cleaner runs."""
    import ray

    probe = ray.remote(num_cpus=0)(_state_api_probe).remote()
    ready, _ = ray.wait([probe], timeout=20)
    error = ray.get(ready[0]) if ready else "no answer in 20 s"
    if error:
        log(f"warning: Ray workers cannot reach Ray's state API ({error}). Trials stopped early will keep "
            f"their workers' resources and later trials may wait for them. Start Ray with its dashboard "
            f"(`ray start --head` does) or set RAY_API_SERVER_ADDRESS in the job's runtime_env.")


def _as_grid(space) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, dist in space.dists.items():
        if dist.kind not in ("choice", "grid"):
            raise SpaceError(f"tune.search=grid needs list distributions (choice, grid); {key} is {dist.kind} "
                             f"in the space {space.name}")
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
    args, cfg, done = job_config(build_parser(), argv)
    if done is not None:
        return done

    def body() -> int:
        from tune_spaces import load_space

        # a bad space or metric (exit 2) and missing data (exit 1) fail before Ray starts
        space = load_space(cfg.tune.space, cfg)
        check_tune_metric(cfg)
        if cfg.tune.search == "grid":
            _as_grid(space)
        if cfg.tune.scheduler == "pbt":
            space.mutations(cfg.tune.pbt_mutate)
        check_sweep_data(cfg)
        init_ray(args.address)
        summary = run_sweep(cfg, check_data=False)
        print(json.dumps(summary, indent=1, default=str))
        return 0 if summary["errors"] == 0 else 1  # a trial that errored fails the sweep

    return run_main(body, what="sweep", tracking_uri=cfg.tracking.tracking_uri)


if __name__ == "__main__":
    from jobs.tune import main as _main  # run the importable module: Ray pickles __main__ by value

    sys.exit(_main())
