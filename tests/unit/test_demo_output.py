"""cluster/local/demo.py: what the demo leaves out of its output (every line stays in the stage log)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("demo", REPO / "cluster" / "local" / "demo.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)

PREFIX = "\x1b[36m(RayTrainWorker pid=2880)\x1b[0m "


def shown(lines: list[str]) -> list[str]:
    f = demo.LineFilter()
    return [line for line in lines if not f.hides(line)]


def test_routine_ray_and_mlflow_lines_are_left_out():
    routine = [
        "2026-12-04 19:37:21,212\tINFO job_manager.py:581 -- Runtime env is setting up.\n",
        PREFIX + "Reporting training result 3: TrainingReport(checkpoint=None, metrics={})\n",
        PREFIX + "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/x)\n",
        PREFIX + "/x/data_validation.py:187: UserWarning: \x1b[33mAdd type hints to the `predict` method to\n",
        PREFIX + "  color_warning(\n",
        "\x1b[36m(pid=gcs_server)\x1b[0m [2026 E 1 1] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor "
        "ca51, return status: Invalid: KillActor RPC failed for actor ca51: RpcError: Socket closed rpc_code: 14\n",
    ]
    assert shown(routine) == []


def test_results_and_errors_are_shown():
    keep = [
        PREFIX + "[imgcls] epoch 1/20  train/loss 1.6450  val/acc1 0.6816\n",
        "decision:   PROMOTED: no champion yet; champion is v1\n",
        # an error line is shown even where a routine pattern would match it
        "2026-12-04 08:56:13,941\tINFO job_manager.py:67 -- Job 'raysubmit_x' failed\n",
        "job raysubmit_x succeeded in 51 s\n",
        PREFIX + "Traceback (most recent call last):\n",
        PREFIX + "RuntimeError: the training data yielded no batches\n",
    ]
    assert shown(keep) == keep


def test_the_ignored_system_exit_of_a_stopped_trial_is_left_out_as_a_whole():
    p = "\x1b[36m(run_trial pid=3432)\x1b[0m "
    block = [p + "Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7f81>\n",
             p + "Traceback (most recent call last):\n",
             p + '  File "/usr/lib/python3.11/_weakrefset.py", line 39, in _remove\n',
             p + "SystemExit: 1\n"]
    after = [p + "Traceback (most recent call last):\n", p + "ValueError: a real one\n"]
    assert shown(block + after) == after
