"""The benchmark harness: figures from real result files, medians, BENCHMARKS.md, one real run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from bench.run import BENCHES, main, render, run_one, summarize
from tests.http_stub import load_against

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def recorded(name: str, **changes) -> dict:
    result = json.loads((RESULTS / f"{name}.json").read_text())
    result["seconds"] = 60.0
    return {**result, **changes}


def test_every_benchmark_is_a_module_with_a_main():
    import importlib

    for bench in BENCHES.values():
        assert callable(importlib.import_module(f"bench.{bench.module or bench.name}").main), bench.name


@pytest.mark.parametrize("name", ["train_vs_local", "ingest", "quantize", "distill", "serve_throughput", "gpu_train",
                                  "serve_heavy", "serve_heavy_2cores", "serve_options"])
def test_figures_come_from_the_recorded_results(name):
    figures = summarize(BENCHES[name], [recorded(name)])["figures"]
    # a point with no steady state in its window has no median, only its invalid run
    assert figures and all(f["median"] is not None or f.get("invalid") for f in figures.values()), figures


def test_medians_over_runs_and_the_markdown_table():
    low = recorded("ingest", ratio_ray_data_over_dataloader=0.30)
    mid = recorded("ingest", ratio_ray_data_over_dataloader=0.34)
    high = recorded("ingest", ratio_ray_data_over_dataloader=0.50)
    summary = summarize(BENCHES["ingest"], [high, low, mid])
    figure = summary["figures"]["images/s, Ray Data / DataLoader (x)"]
    assert figure["median"] == pytest.approx(0.34) and figure["min"] == 0.30 and figure["max"] == 0.50
    text = render({"ingest": summary, "gpu_train": {"skipped": "needs a CUDA device"}})
    assert "| images/s, Ray Data / DataLoader (x) | 0.340 | 0.300..0.500 | 3 |" in text
    assert "`python -m bench.ingest --epochs 6`" in text
    assert "Not measured: needs a CUDA device." in text
    assert "## tune_asha" in text and "Not measured: not run yet." in text
    assert text.count("torch 2.") == 2  # one machine line, and one "measured on" line for the one result


def test_gpu_benchmark_runs_on_the_cpu_through_the_harness(tmp_path):
    """bench.gpu_train's code path (plain loop + a real Ray Train worker) at toy size on the CPU."""
    tiny = replace(BENCHES["gpu_train"], args=("--device", "cpu", "--model", "resnet18", "--width", "0.25",
                                               "--image-size", "32", "--batch-size", "8", "--steps", "2",
                                               "--warmup", "1", "--repeats", "1"))
    result = run_one(tiny, quick=False, log=lambda _m: None, keep=tmp_path)
    assert json.loads((tmp_path / "gpu_train.json").read_text())["plain_images_per_s"] == result["plain_images_per_s"]
    assert result["gpu"] is None and result["nvidia_reference"] is None
    assert result["plain_images_per_s"] > 0 and result["ray_train_images_per_s"] > 0
    assert "device=cpu amp=off" in result["runtime"]
    figures = summarize(tiny, [result])["figures"]
    assert figures["Ray Train (1 worker) / plain loop, img/s (x)"]["median"] > 0


def test_without_a_gpu_the_gpu_benchmarks_are_listed_as_not_measured(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    markdown, state = tmp_path / "BENCHMARKS.md", tmp_path / "harness.json"
    assert main(["--only", "gpu_train", "serve_gpu", "--markdown", str(markdown), "--state", str(state)]) == 0
    text = markdown.read_text()
    assert text.count("Not measured: needs a CUDA device") == 2
    assert json.loads(state.read_text())["gpu_train"]["skipped"].startswith("needs a CUDA device")


def test_reference_figure_for_the_gpu_class():
    from bench.gpu_train import reference_for

    assert reference_for("NVIDIA A100-SXM4-80GB") == ("A100", 2470.0)
    # another class's figure (NVIDIA publishes none for H100/H200) gives no ratio
    assert reference_for("NVIDIA H200") is None and reference_for("NVIDIA H100 80GB HBM3") is None
    assert reference_for(None) is None and reference_for("Some Other GPU") is None
    h200 = summarize(BENCHES["gpu_train"], [recorded("gpu_train")])["figures"]
    assert not [label for label in h200 if "NVIDIA" in label], h200


def test_render_only_rewrites_the_markdown_from_the_state(tmp_path):
    state = tmp_path / "harness.json"
    state.write_text(json.dumps({"ingest": summarize(BENCHES["ingest"], [recorded("ingest")])}))
    markdown = tmp_path / "BENCHMARKS.md"
    assert main(["--render-only", "--state", str(state), "--markdown", str(markdown)]) == 0
    assert "| images/s, Ray Data / DataLoader (x) |" in markdown.read_text()


def test_load_counts_the_window_s_share_of_rounds_that_straddle_its_edges():
    """4 clients in step against 0.3 s answers: a 1 s window holds 3.3 rounds. Counting the requests
    answered inside it would give 3 rounds (12 req/s, -9%); each request's share of the window gives
    the true 4 / 0.3 s."""
    row, took = load_against(0.3, seconds=1.0, warmup_s=0.0, warmup_rounds=0, window_rounds=0)
    latency_s = row["p50_ms"] / 1000
    assert row["ok"] == 12 and row["unfinished"] == 0 and not row["errors"]
    assert row["images_per_s"] == pytest.approx(4 / latency_s, rel=0.03)
    assert took < 1.0 + 2 * latency_s  # waited for the round in flight when the window closed, no more


def test_load_credits_requests_slower_than_the_window_with_their_share():
    """Answers take 1.5 s and the window 0.5 s: none is answered inside it (no latency to report),
    but a third of each request's time is, so the rate is 4 / 1.5 s, not 0 and not clients / seconds."""
    row, took = load_against(1.5, seconds=0.5, warmup_s=0.0, warmup_rounds=0, window_rounds=0)
    assert row["ok"] == 0 and row["p50_ms"] is None and row["unfinished"] == 0
    assert row["valid"] is False and "no request answered" in row["invalid_reason"]
    assert row["images_per_s"] == pytest.approx(4 / 1.5, rel=0.05)
    assert 1.4 < took < 2.5


def test_load_gives_up_on_requests_unanswered_after_the_drain_and_counts_nothing_for_them():
    row, took = load_against(1.5, seconds=0.5, warmup_s=0.0, drain_s=0.2, warmup_rounds=0, window_rounds=0)
    assert row["unfinished"] == 4 and row["images_per_s"] == 0 and row["ok"] == 0
    assert took < 1.2  # the clients still waiting were cancelled instead of holding the sweep


def test_soak_counts_503_with_retry_after_as_shed_and_every_other_failure_as_an_error():
    """The open-loop client against a server that answers 200, the overload 503 (with Retry-After)
    and a bare 503 in turn: only the first kind of 503 is load shedding."""
    from aiohttp import web

    from bench.reliability import NO_RETRY_AFTER, open_loop, summarize_soak
    from tests.http_stub import stub_server

    answers = iter([200, 503, 503] * 100)

    async def handler(request):
        await request.read()
        status = next(answers)
        if status == 200:
            return web.Response(text="ok")
        shedding = request.app["shed_next"] = not request.app.get("shed_next", False)
        return web.Response(status=503, headers={"Retry-After": "1"} if shedding else {})

    with stub_server(handler) as url:
        records = open_loop(url, [b"x"], rate=30.0, seconds=1.0)
    s = summarize_soak(records, 1.0, 0.5)
    assert s["sent"] == 30 and s["answered"] == 10, s
    assert s["shed"] == 10 and s["shed_fraction"] == pytest.approx(1 / 3), s
    assert s["errors"] == {NO_RETRY_AFTER: 10} and s["error_fraction"] == pytest.approx(1 / 3), s


def test_soak_window_median_tells_a_stall_of_one_window_from_a_queue_that_builds_up():
    """Nine 1 s windows of 20 ms answers: one slow burst in the last third raises its pooled p99
    but not the median of its window p99s; a queue that grows over the last third raises both."""
    from bench.reliability import summarize_soak

    steady = [(k / 50, 0.02, "200") for k in range(450)]  # 50 answers per second for 9 s
    stall = [(at, 0.6 if 7.0 <= at < 8.0 else lat, s) for at, lat, s in steady]
    s = summarize_soak(stall, 9.0, 1.0)
    assert s["p99_last_third_ms"] > 500 and s["p99_drift"] > 3
    assert s["p99_last_third_window_median_ms"] == pytest.approx(20)
    queue = [(at, lat + max(0.0, at - 6.0) * 0.3, s) for at, lat, s in steady]
    q = summarize_soak(queue, 9.0, 1.0)
    assert q["p99_last_third_window_median_ms"] > 500 and q["p99_drift"] > 3
