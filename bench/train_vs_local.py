"""Ray Train vs the core's local loop on the same 2 cores: alternated rounds, medians, CPU per image.

    python -m bench.train_vs_local [--config configs/digits.yaml] [--rounds 5] [--epochs 5]
        [--layouts 1x2 2x1] [--set KEY=VALUE ...]

One local Ray instance (``--cpus`` CPUs, no dashboard) stays up for the whole
benchmark, so both sides run beside the same idle Ray processes. For each
layout, ``--rounds`` rounds alternate the two sides (local first in even
rounds, Ray first in odd ones):

- ``1x2``: Ray Train, 1 worker with ``ray.cpus_per_worker=2`` (the worker sets
  2 torch threads) vs the local loop (imgcls_core.runner) with 2 torch threads;
- ``2x1``: Ray Train, 2 DDP workers (gloo) with 1 CPU and 1 torch thread each
  vs the local loop with 2 threads: what a user without Ray does on the same
  cores. Each worker takes ``data.batch_size / 2`` images per step, so the
  global batch and the optimizer steps are the local loop's
  (``--ddp-batch per-worker`` keeps data.batch_size per worker instead).

Both sides train the config's model (``--config``, default configs/digits.yaml;
``--epochs`` and ``--set`` override it) on the digits with the same DataLoader
ingest (``ray.ingest=dataloader``: same decode, augmentation and
data.num_workers per training process), tracking off, a checkpoint per epoch.

Measured per run (timestamps from hooks in the training process itself):
- epoch: the full cycle between two epoch reports (train pass + validation +
  checkpoint + report), and the train pass alone (``train/epoch_s``); the first
  epoch is warm-up and left out: steady state is epochs 2..N;
- images/s at steady state: training images per epoch / median epoch cycle;
- start-up: from the call (``train_and_evaluate`` / ``run_training``) to the
  first training step, split on the Ray side into driver planning, worker
  group start and the worker's own set-up; the whole wall time too;
- CPU-ms per training image over the steady-state window: the CPU time of
  every process of this benchmark (this process and all its descendants: the
  Ray head's processes, the Ray workers and their DataLoader workers, read
  from /proc), split into training processes and Ray's system processes.

``--lockstep`` runs the two sides of a round at once, taking turns one epoch
each (the turn passes at each epoch's report), so the epochs compared lie
seconds apart rather than a run apart: on a shared 2-core VM whose speed drifts
by 20-40% between runs, that is what makes a 5% difference visible. CPU per
image then comes from the training processes' own clocks; the second side is
launched once the first is at its first epoch (the first waits for it there), so
the start-ups do not overlap, and start-up is measured to the first epoch.

Prints a table per layout and the median epoch ratio ray/local (1.0 = no
overhead; the target is <= 1.05); saves everything with bench.common.save.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import median, save

MARKS = "bench_marks.rank{rank}.jsonl"
LAYOUTS = {"1x2": (1, 2), "2x1": (2, 1)}  # Ray Train workers x CPUs (= torch threads) per worker


# --------------------------------------------------------------------------- hooks in the training process


def _mark(out: str, rank: int, event: dict) -> None:
    with open(Path(out) / MARKS.format(rank=rank), "a") as fh:
        fh.write(json.dumps(event) + "\n")


def instrument() -> None:
    """Hooks in this process (the local loop's, or a Ray Train worker's): the first training step,
    and every epoch report (its start and end, the checkpoint write inside it, the train pass)."""
    import torch

    from imgcls_core.engine.loop import Engine
    from imgcls_core.engine.session import TrainingSession

    if getattr(Engine, "_bench_instrumented", False):
        return
    Engine._bench_instrumented = True
    step, reporter, train_epoch = Engine._train_step, TrainingSession._reporter, Engine.train_epoch

    def _train_epoch(self, batches, on_step=None):
        gate = Turnstile.of(self.cfg.train.output_dir)
        if gate is not None:
            if not getattr(self, "_bench_ready", False):
                self._bench_ready = True
                _mark(self.cfg.train.output_dir, self.rank, {"ev": "ready", "t": time.time()})
                gate.ready()
            gate.wait()
            _mark(self.cfg.train.output_dir, self.rank,
                  {"ev": "turn", "epoch": self.epoch + 1, "t": time.time(), "cpu": time.process_time()})
        return train_epoch(self, batches, on_step)

    def _train_step(self, images, labels):
        if not getattr(self, "_bench_first", False):
            self._bench_first = True
            _mark(self.cfg.train.output_dir, self.rank,
                  {"ev": "first_step", "t": time.time(), "pid": os.getpid(), "threads": torch.get_num_threads(),
                   "interop_threads": torch.get_num_interop_threads(), "omp": os.environ.get("OMP_NUM_THREADS"),
                   "batch": int(images.shape[0])})
        return step(self, images, labels)

    def _reporter(self, tracker):
        report = reporter(self, tracker)

        def timed(metrics, write):
            spent = {"write_s": 0.0}

            def timed_write(folder):
                t = time.perf_counter()
                write(folder)
                spent["write_s"] = time.perf_counter() - t

            t0 = time.time()
            report(metrics, timed_write if write is not None else None)
            t1 = time.time()
            epoch = int(metrics.get("epoch", 0))
            _mark(str(self.out), self.host.rank,
                  {"ev": "report", "epoch": epoch, "mid": bool(metrics.get("mid_epoch")),
                   "t0": t0, "t1": t1, "cpu": time.process_time(), "write_s": spent["write_s"],
                   "train_s": metrics.get("train/epoch_s"),
                   "images": round(metrics.get("train/images_per_s", 0.0) * metrics.get("train/epoch_s", 0.0))})
            gate = Turnstile.of(str(self.out))
            if gate is not None and self.host.rank == 0 and not metrics.get("mid_epoch"):
                gate.hand_over(last=epoch >= self.cfg.train.epochs)

        return timed

    Engine._train_step, Engine.train_epoch, TrainingSession._reporter = _train_step, _train_epoch, _reporter


class Turnstile:
    """Lockstep mode: the two sides train at once but take turns, one epoch (train pass, validation,
    checkpoint, report) each, so both see the machine as it is within a second of each other. A
    side's output_dir holds ``bench_turnstile.json`` naming the shared folder and the side; the
    folder's ``turn`` file names whose turn it is. The start-ups do not overlap: the second side is
    launched once the first is :meth:`ready` (at its first epoch), and no epoch starts before both
    are. A side that has trained its last epoch waits until the other has too, so its test
    evaluation and packaging overlap nothing measured."""

    FILE = "bench_turnstile.json"

    def __init__(self, folder: str, side: str, other: str):
        self.folder, self.side, self.other = Path(folder), side, other

    @classmethod
    def of(cls, output_dir: str) -> Turnstile | None:
        path = Path(output_dir) / cls.FILE
        return cls(**json.loads(path.read_text())) if path.exists() else None

    @staticmethod
    def setup(folder: Path, first: str, sides: dict[str, Path]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "turn").write_text(first)
        for side, out in sides.items():
            other = next(s for s in sides if s != side)
            out.mkdir(parents=True, exist_ok=True)
            (out / Turnstile.FILE).write_text(json.dumps({"folder": str(folder), "side": side, "other": other}))

    def _mine(self) -> bool:
        if (self.folder / f"done_{self.other}").exists():
            return True
        return (self.folder / "turn").read_text() == self.side and (self.folder / f"ready_{self.other}").exists()

    def ready(self) -> None:
        """This side has started up (it is at its first epoch)."""
        (self.folder / f"ready_{self.side}").touch()

    @staticmethod
    def wait_ready(folder: Path, side: str) -> None:
        """Until ``side`` has started up, or ended."""
        while not ((folder / f"ready_{side}").exists() or (folder / f"done_{side}").exists()):
            time.sleep(0.01)

    def wait(self) -> None:
        while not self._mine():
            time.sleep(0.002)

    def hand_over(self, last: bool) -> None:
        if last:
            (self.folder / f"done_{self.side}").touch()
        tmp = self.folder / f"turn.{self.side}"
        tmp.write_text(self.other)
        tmp.replace(self.folder / "turn")
        if last:
            while not (self.folder / f"done_{self.other}").exists():
                time.sleep(0.01)


def instrumented_loop(loop_config: dict) -> None:
    """jobs.train_worker.train_loop_per_worker with the hooks above (Ray pickles it by value)."""
    import ray.train

    from jobs.train_worker import train_loop_per_worker

    instrument()
    _mark(loop_config["config"]["train"]["output_dir"], ray.train.get_context().get_world_rank(),
          {"ev": "loop_start", "t": time.time(), "pid": os.getpid()})
    train_loop_per_worker(loop_config)


# --------------------------------------------------------------------------- CPU time from /proc

_TICK = os.sysconf("SC_CLK_TCK")
_RAY_SYSTEM = ("raylet", "gcs_server", "/ray/", "ray_client", "dashboard")


def _proc_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (ppid, CPU seconds of the process and its reaped children, command line) of every
    readable process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        # utime + stime + cutime + cstime: a child's CPU moves into its parent's once it is reaped
        table[int(entry)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / _TICK, cmd or stat)
    return table


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (every process, /proc/stat), to tell how much of
    a window went to work outside this benchmark."""
    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK  # all but idle and iowait (guest is in user)


def cpu_snapshot(root: int) -> dict[int, tuple[str, float]]:
    """pid -> (group, CPU seconds) for ``root`` and its descendants (and -1 -> the machine's busy
    seconds, :func:`machine_busy_s`). Groups: ``driver`` (root and
    its non-Ray children, e.g. the local loop's DataLoader workers), ``workers`` (Ray worker
    processes, idle ones included, and their children), ``ray_system`` (raylet, GCS, agents)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [(root, "driver")]
    while todo:
        pid, group = todo.pop()
        if pid not in table:
            continue
        cmd = table[pid][2]
        if pid != root and group != "workers":
            if cmd.startswith("ray::"):
                group = "workers"
            elif group == "driver" and any(s in cmd for s in _RAY_SYSTEM):
                group = "ray_system"
        out[pid] = (group, table[pid][1])
        todo += [(child, group) for child in children.get(pid, [])]
    out[-1] = ("machine", machine_busy_s())
    return out


def cpu_between(a: dict, b: dict) -> dict[str, float]:
    """CPU seconds per group spent between two snapshots. Each process counts its reaped children,
    so a process that exits in between (e.g. a DataLoader worker of a non-persistent loader) leaves
    its whole CPU time in its parent's figure: its own figure at ``a`` is taken back out. Exact
    for the whole tree while every exited process was reaped inside it; ``exited`` and ``started``
    count the processes that came and went."""
    spent = {"driver": 0.0, "workers": 0.0, "ray_system": 0.0, "machine": 0.0}
    for pid, (group, cpu) in b.items():
        spent[group] += cpu - a[pid][1] if pid in a else cpu
    for pid, (group, cpu) in a.items():
        if pid not in b:
            spent[group] -= cpu
    spent["exited"] = float(sum(1 for pid in a if pid not in b))
    spent["started"] = float(sum(1 for pid in b if pid not in a))
    if spent["machine"]:  # the machine's busy time less this benchmark's: other work on the cores
        spent["other_work"] = spent.pop("machine") - spent["driver"] - spent["workers"] - spent["ray_system"]
    else:
        spent.pop("machine")
    return spent


class Monitor(threading.Thread):
    """Snapshots this process tree's CPU time at the moment rank 0 reports each epoch (polling its
    marks file every 20 ms)."""

    def __init__(self, marks: Path):
        super().__init__(daemon=True)
        self.marks, self.root = marks, os.getpid()
        self.start_snapshot = cpu_snapshot(self.root)
        self.at_report: list[tuple[dict, dict]] = []  # (event, snapshot)
        self.stopping = threading.Event()

    def run(self) -> None:
        seen = 0
        while not self.stopping.wait(0.02):
            if not self.marks.exists():
                continue
            lines = self.marks.read_text().splitlines()
            for line in lines[seen:]:
                if not line.endswith("}"):
                    break  # a line being written: read it next time
                event = json.loads(line)
                seen += 1
                if event["ev"] == "report" and not event["mid"]:
                    self.at_report.append((event, cpu_snapshot(self.root)))

    def stop(self) -> dict:
        self.stopping.set()
        self.join()
        return cpu_snapshot(self.root)


# --------------------------------------------------------------------------- one run of one side


def _read_marks(out: Path, rank: int) -> list[dict]:
    path = out / MARKS.format(rank=rank)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


_LOCAL_CHILD = """import sys, torch
from bench.train_vs_local import instrument
from imgcls_core.config import load_config
from imgcls_core.runner import train_and_evaluate
instrument()
torch.set_num_threads(int(sys.argv[2]))
train_and_evaluate(load_config(sys.argv[1]), log=lambda m: None)
"""


def run_side(side: str, cfg, world: int, local_process: str = "subprocess") -> dict:
    """One training run (``local``: in a child process without Ray, or with ``local_process=inprocess``
    in this process, which is Ray's driver; ``ray``: on the running Ray instance) and its figures.
    The start-up of a ``subprocess`` local run includes the child's Python and torch imports."""
    import torch

    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    monitor = Monitor(out / MARKS.format(rank=0))
    build = {}
    monitor.start()
    t_call = time.time()
    if side == "local" and local_process == "subprocess":  # the plain loop in a process of its own
        import subprocess

        (out / "bench_config.yaml").write_text(cfg.to_yaml())
        subprocess.run([sys.executable, "-c", _LOCAL_CHILD, str(out / "bench_config.yaml"),
                        str(int(cfg.ray.cpus_per_worker * world))], cwd=Path(__file__).resolve().parents[1],
                       check=True)
    elif side == "local":
        from imgcls_core.runner import train_and_evaluate

        instrument()
        torch.set_num_threads(int(cfg.ray.cpus_per_worker * world))  # the local loop gets every CPU
        train_and_evaluate(cfg, log=lambda m: None)
    else:
        import jobs.train
        from jobs.train import run_training

        real_build = jobs.train.build_trainer

        def build_trainer(*a, **k):
            build["t"] = time.time()
            return real_build(*a, **k)

        jobs.train.build_trainer, jobs.train.train_loop_per_worker = build_trainer, instrumented_loop
        try:
            run_training(cfg, log=lambda m: None)
        finally:
            jobs.train.build_trainer = real_build
            jobs.train.train_loop_per_worker = sys.modules["jobs.train_worker"].train_loop_per_worker
    t_end = time.time()
    end_snapshot = monitor.stop()

    marks = _read_marks(out, 0)
    first = next(m for m in marks if m["ev"] == "first_step")
    reports = [m for m in marks if m["ev"] == "report" and not m["mid"]]
    snaps = [s for _, s in monitor.at_report]
    ends = [first["t"]] + [r["t1"] for r in reports]
    cycles = [b - a for a, b in zip(ends, ends[1:])]
    steady = slice(1, None)
    turns = {m["epoch"]: m for m in marks if m["ev"] == "turn"}
    ready = next((m["t"] for m in marks if m["ev"] == "ready"), None)  # lockstep: at the first epoch
    if turns:  # lockstep: an epoch runs from its turn to its report; the waits between are the other side's
        cycles = [r["t1"] - turns[r["epoch"]]["t"] for r in reports]
    images = median([r["images"] for r in reports[steady]])
    window_images = sum(r["images"] for r in reports[steady])
    cpu = cpu_between(snaps[0], snaps[-1]) if len(snaps) >= 2 else {}
    train_cpu = cpu.get("driver", 0.0) + cpu.get("workers", 0.0)
    all_cpu = train_cpu + cpu.get("ray_system", 0.0)
    startup_cpu = cpu_between(monitor.start_snapshot, snaps[0]) if snaps else {}
    row = {
        "side": side, "world": world if side == "ray" else 1, "threads": first["threads"],
        "interop_threads": first["interop_threads"], "omp_num_threads": first["omp"], "batch_per_step": first["batch"],
        "epoch_cycle_s": cycles, "train_pass_s": [r["train_s"] for r in reports],
        "report_s": [r["t1"] - r["t0"] for r in reports], "checkpoint_write_s": [r["write_s"] for r in reports],
        "images_per_epoch": images,
        "epoch_cycle_s_median": median(cycles[steady]), "train_pass_s_median": median([r["train_s"] for r in reports[steady]]),
        "report_s_median": median([r["t1"] - r["t0"] for r in reports[steady]]),
        "checkpoint_write_s_median": median([r["write_s"] for r in reports[steady]]),
        "startup_s": first["t"] - t_call, "wall_s": t_end - t_call,
        "after_last_epoch_s": t_end - ends[-1],
        "steady_cpu_s": cpu, "startup_cpu_s": startup_cpu,
        "cpu_ms_per_image": 1000 * train_cpu / window_images if window_images else float("nan"),
        "cpu_ms_per_image_incl_ray_system": 1000 * all_cpu / window_images if window_images else float("nan"),
        # cores busy with work outside this benchmark during the steady window (0 on a quiet machine)
        "other_work_cores": (cpu.get("other_work", 0.0) / (ends[-1] - ends[1])) if len(ends) > 2 else float("nan"),
        "loadavg_at_start": os.getloadavg()[0],
    }
    if turns:
        # The other side ran in between, so the snapshots of the whole tree mix both sides: CPU from
        # the training processes' own clocks over their turns (every rank). Start-up: from the call to
        # the first epoch (ready; the start-ups of the two sides do not overlap), not to the first step.
        own = 0.0
        for rank in range(world if side == "ray" else 1):
            rank_marks = _read_marks(out, rank)
            start = {m["epoch"]: m["cpu"] for m in rank_marks if m["ev"] == "turn"}
            own += sum(m["cpu"] - start[m["epoch"]] for m in rank_marks
                       if m["ev"] == "report" and not m["mid"] and m["epoch"] in start and m["epoch"] > 1)
        row.update({"cpu_ms_per_image": 1000 * own / window_images if window_images else float("nan"),
                    "cpu_ms_per_image_incl_ray_system": float("nan"), "other_work_cores": float("nan"),
                    "startup_s": ready - t_call,
                    "wall_s": float("nan"), "lockstep": True})
    row["images_per_s"] = images / row["epoch_cycle_s_median"]
    row["train_pass_images_per_s"] = images / row["train_pass_s_median"]
    if side == "ray":
        loop_start = min(m["t"] for m in marks if m["ev"] == "loop_start")
        started = ready if turns else first["t"]
        row["startup_split_s"] = {"driver_plan": build["t"] - t_call, "worker_group_start": loop_start - build["t"],
                                  "worker_setup": started - loop_start}
        if world > 1:  # the other ranks' report time: how long rank 0's checkpoint holds them
            others = [m for r in range(1, world) for m in _read_marks(out, r) if m["ev"] == "report" and not m["mid"]]
            row["other_ranks_report_s_median"] = median([m["t1"] - m["t0"] for m in others[steady]])
    return row


def run_lockstep(cfgs: dict, first: str, world: int, folder: Path) -> dict[str, dict]:
    """Both sides at once, taking turns epoch by epoch (:class:`Turnstile`), ``first`` first: the
    local loop in its child process (from a thread of this one), Ray Train from this process."""
    Turnstile.setup(folder, first, {side: Path(cfg.train.output_dir) for side, cfg in cfgs.items()})
    done: dict[str, dict] = {}
    errors: list[BaseException] = []

    def local() -> None:
        try:
            if first == "ray":
                Turnstile.wait_ready(folder, "ray")
            done["local"] = run_side("local", cfgs["local"], world)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the main thread
            errors.append(exc)
            (folder / "done_local").touch()  # never leave the Ray side waiting for its turn

    thread = threading.Thread(target=local)
    thread.start()
    try:
        if first == "local":
            Turnstile.wait_ready(folder, "local")
        done["ray"] = run_side("ray", cfgs["ray"], world)
    finally:
        (folder / "done_ray").touch()
        thread.join()
    if errors:
        raise errors[0]
    return done


# --------------------------------------------------------------------------- the benchmark


def side_config(args, tmp: Path, root: Path, side: str, layout: str, index: int):
    from imgcls_core.config import load_config

    workers, cpus = LAYOUTS[layout]
    cfg = load_config(args.config, [
        *args.set, f"data.root={root}", "data.format=digits", "tracking.enabled=false",
        f"train.output_dir={tmp / f'{layout}-{index:02d}-{side}'}", "train.log_every=1000",
        "train.checkpoint_every_epochs=1", "train.resume=false", "ray.ingest=dataloader",
        f"ray.storage_path={tmp / 'results'}", f"ray.name={layout}-{index:02d}",
        f"ray.num_workers={workers}", f"ray.cpus_per_worker={cpus}", "ray.use_gpu=false",
        *([f"train.epochs={args.epochs}"] if args.epochs else []),
    ])
    if side == "ray" and workers > 1 and args.ddp_batch == "global":
        cfg.data.batch_size = max(1, cfg.data.batch_size // workers)
    return cfg


def summarize(rows: list[dict]) -> dict:
    local = [r for r in rows if r["side"] == "local"]
    ray = [r for r in rows if r["side"] == "ray"]
    pairs = list(zip(local, ray))  # round by round

    def med(side, key):
        return median([r[key] for r in side])

    out = {"rounds": len(pairs)}
    for key in ("epoch_cycle_s_median", "train_pass_s_median", "images_per_s", "startup_s", "wall_s",
                "cpu_ms_per_image", "cpu_ms_per_image_incl_ray_system", "report_s_median",
                "checkpoint_write_s_median", "after_last_epoch_s", "other_work_cores"):
        out[key] = {"local": med(local, key), "ray": med(ray, key)}
    out["epoch_ratio_ray_over_local"] = median([r["epoch_cycle_s_median"] / l["epoch_cycle_s_median"]
                                                for l, r in pairs])
    out["epoch_ratio_ray_over_local_per_round"] = [r["epoch_cycle_s_median"] / l["epoch_cycle_s_median"]
                                                   for l, r in pairs]
    out["train_pass_ratio_ray_over_local"] = median([r["train_pass_s_median"] / l["train_pass_s_median"]
                                                     for l, r in pairs])
    out["cpu_per_image_ratio_ray_over_local"] = median([r["cpu_ms_per_image"] / l["cpu_ms_per_image"]
                                                        for l, r in pairs])
    out["wall_ratio_ray_over_local"] = median([r["wall_s"] / l["wall_s"] for l, r in pairs])
    if ray and "startup_split_s" in ray[0]:
        out["ray_startup_split_s"] = {k: median([r["startup_split_s"][k] for r in ray]) for k in ray[0]["startup_split_s"]}
    return out


def print_table(layout: str, rows: list[dict], s: dict) -> None:
    print(f"\n== {layout}: Ray Train {LAYOUTS[layout][0]} worker(s) x {LAYOUTS[layout][1]} thread(s) vs local loop "
          f"x {rows[0]['threads']} threads")
    print(f"{'round':>5} {'side':<5} {'thr':>3} {'epoch s':>8} {'train s':>8} {'report s':>8} {'img/s':>7} "
          f"{'start s':>7} {'wall s':>7} {'cpu ms/img':>10} {'+ray sys':>8} {'other cores':>11}")
    for i, r in enumerate(rows):
        print(f"{i // 2:>5} {r['side']:<5} {r['threads']:>3} {r['epoch_cycle_s_median']:>8.2f} "
              f"{r['train_pass_s_median']:>8.2f} {r['report_s_median']:>8.3f} {r['images_per_s']:>7.0f} "
              f"{r['startup_s']:>7.1f} {r['wall_s']:>7.1f} {r['cpu_ms_per_image']:>10.2f} "
              f"{r['cpu_ms_per_image_incl_ray_system']:>8.2f} {r['other_work_cores']:>11.2f}")
    print(f"median epoch (cycle) s: local {s['epoch_cycle_s_median']['local']:.2f}, "
          f"ray {s['epoch_cycle_s_median']['ray']:.2f}; ratio ray/local (median of rounds) "
          f"{s['epoch_ratio_ray_over_local']:.3f} (target <= 1.05); train pass only "
          f"{s['train_pass_ratio_ray_over_local']:.3f}")
    print(f"start-up s (to the first step; --lockstep: to the first epoch): local {s['startup_s']['local']:.1f}, ray {s['startup_s']['ray']:.1f} "
          f"{s.get('ray_startup_split_s', {})}; CPU ms/image local {s['cpu_ms_per_image']['local']:.2f}, "
          f"ray {s['cpu_ms_per_image']['ray']:.2f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/digits.yaml", help="model, data and epochs (YAML)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per run (the first is warm-up); 0: the config's")
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds per layout")
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=["1x2", "2x1"])
    parser.add_argument("--ddp-batch", choices=["global", "per-worker"], default="global",
                        help="2x1: split data.batch_size over the workers (global), or give each worker all of it")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--local-process", choices=["subprocess", "inprocess"], default="subprocess",
                        help="run the local loop in a child process without Ray (default), or in this "
                             "process, which is Ray's driver")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for both sides")
    parser.add_argument("--lockstep", action="store_true",
                        help="run both sides at once, one epoch each in turn: epoch ratios from epochs "
                             "seconds apart, immune to the drift of a shared machine's speed between runs "
                             "(CPU per image from the training processes' own clocks; no start-up figures)")
    args = parser.parse_args(argv)
    if args.epochs == 1:
        parser.error("--epochs must be at least 2 (the first epoch is warm-up)")

    import ray
    from ray import cloudpickle

    from imgcls_core.data import materialize_digits

    if __name__ != "__main__":  # bench/ is not installed in the workers: send the hooks by value
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    tmp = Path(tempfile.mkdtemp(prefix="imgcls-bench-train-"))
    root = materialize_digits(tmp / "digits")
    t = time.perf_counter()
    from jobs.common import init_local_ray

    init_local_ray(num_cpus=args.cpus, include_dashboard=False, configure_logging=False,
                   log_to_driver=False)
    ray_init_s = time.perf_counter() - t
    print(f"ray.init: {ray_init_s:.1f} s (once, for the whole benchmark)")

    result = {"config": {**vars(args), "config_file": str(args.config)}, "ray_init_s": ray_init_s, "layouts": {},
              "rounds_done": 0}
    rows: dict[str, list[dict]] = {layout: [] for layout in args.layouts}
    try:
        for index in range(args.rounds):  # the layouts interleave too: a cut-short run still has both
            for layout in args.layouts:
                order = ["local", "ray"] if index % 2 == 0 else ["ray", "local"]
                cfgs = {side: side_config(args, tmp, root, side, layout, index) for side in order}
                if args.lockstep:
                    done = run_lockstep(cfgs, order[0], LAYOUTS[layout][0], tmp / f"turnstile-{layout}-{index}")
                else:
                    done = {side: run_side(side, cfgs[side], LAYOUTS[layout][0], args.local_process) for side in order}
                for side in order:
                    r = done[side]
                    print(f"[{layout} round {index} {side}] epoch {r['epoch_cycle_s_median']:.2f}s "
                          f"(train {r['train_pass_s_median']:.2f}s) start-up {r['startup_s']:.1f}s "
                          f"wall {r['wall_s']:.1f}s cpu {r['cpu_ms_per_image']:.2f} ms/img; other work "
                          f"{r['other_work_cores']:.2f} cores", flush=True)
                rows[layout] += [done["local"], done["ray"]]
                result["layouts"][layout] = {"summary": summarize(rows[layout]), "runs": rows[layout]}
            result["rounds_done"] = index + 1
            if index + 1 < args.rounds:  # so far, beside the result file: a run cut short keeps its rounds
                save("train_vs_local", result, partial=True)  # and the last complete run's file stays
    finally:
        ray.shutdown()
    for layout in args.layouts:
        print_table(layout, rows[layout], result["layouts"][layout]["summary"])
    # The headline figures bench.run reads.
    for layout, data in result["layouts"].items():
        result[f"epoch_ratio_{layout}"] = data["summary"]["epoch_ratio_ray_over_local"]
    save("train_vs_local", result)
    return result


if __name__ == "__main__":
    main()
