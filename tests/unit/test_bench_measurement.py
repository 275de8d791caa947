"""What the benchmarks measure and publish: load points sized to the queue and judged for a steady
state, like-for-like serving ratios, medians, skipped runs, and results files written only whole."""

from __future__ import annotations

import asyncio
import json
import statistics
from pathlib import Path

import pytest

from bench.run import BENCHES, INVALID, main, render, summarize
from tests.http_stub import load_against

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


FIXTURES = Path(__file__).parent / "bench_fixtures"  # results as recorded (2026-12-05/06), kept still:
# bench/results/ changes with every rerun, and these tests check figures of these very runs


def recorded(name: str, **changes) -> dict:
    result = json.loads((FIXTURES / f"{name}.json").read_text())
    result["seconds"] = 60.0
    return {**result, **changes}


# --------------------------------------------------------------------------- the load generator


def test_a_point_is_invalid_without_answers_in_its_window_or_with_a_p50_as_long_as_it():
    from bench.loadgen import invalid_reason, row_invalid, window_length

    assert invalid_reason(None, 0, 4.0) == "no request answered inside the window"
    assert "p50 latency 4.8 s >= the 4.0 s window" == invalid_reason(4760.9, 7, 4.0)
    assert invalid_reason(3999.0, 7, 4.0) is None
    assert "warm-up" in invalid_reason(100.0, 7, 4.0, warmup_rounds_done=False)
    # rows that carry their verdict keep it; older rows are judged on the window they were measured with
    assert row_invalid({"valid": False, "invalid_reason": "x"}) == "x"
    assert row_invalid({"valid": True, "p50_ms": None, "ok": 0}) is None
    assert row_invalid({"p50_ms": 4760.9, "ok": 7}, window_s=4.0).startswith("p50 latency")
    assert row_invalid({"p50_ms": 1000.0, "ok": 7, "window_s": 8.0}, window_s=4.0) is None
    assert window_length(4.0, 0.5, 3) == 4.0 and window_length(4.0, 19.2, 3) == pytest.approx(57.6)


def test_the_warm_up_lasts_two_queue_rounds_and_the_window_three():
    """4 clients against 0.25 s answers: a round is 0.25 s. A 0.2 s window and no warm-up asked for
    become a 0.5 s warm-up (every client answered twice) and a 0.75 s window."""
    row, _ = load_against(0.25, seconds=0.2, warmup_s=0.0, warmup_rounds=2, window_rounds=3)
    assert row["valid"] and "invalid_reason" not in row
    assert row["round_s"] == pytest.approx(0.25, abs=0.05)
    assert 0.45 <= row["warmup_s"] < 0.65
    assert row["window_s"] == pytest.approx(3 * row["round_s"], rel=1e-6)
    assert row["images_per_s"] == pytest.approx(4 / 0.25, rel=0.1)


def test_the_window_starts_after_max_warmup_and_the_point_is_then_invalid():
    row, took = load_against(0.4, seconds=1.0, warmup_s=0.0, warmup_rounds=50, window_rounds=0, max_warmup_s=0.5)
    assert row["ok"] and row["p50_ms"] < 1000
    assert not row["valid"] and "warm-up" in row["invalid_reason"]
    assert row["warmup_s"] == pytest.approx(0.5, abs=0.1) and took < 2.5


def test_the_saturation_pick_leaves_invalid_points_out():
    """serve_heavy (1 run, before the fix): PyTorch fp32 at 48 clients x 8 images "ran" 39.6 img/s
    with a 4.8 s p50 in a 4 s window; the pick is the 16-client point (26.7 img/s)."""
    from bench.serve_throughput import best

    rows = recorded("serve_heavy")["served"]["haproxy:backend=torch"]
    assert max(r["images_per_s"] for r in rows if r["images_per_request"] == 8) == pytest.approx(39.6, abs=0.05)
    pick = best(rows, 8, window_s=4.0)
    assert pick["concurrency"] == 16 and pick["images_per_s"] == pytest.approx(26.7, abs=0.05)
    assert best([{**rows[-1], "valid": False}], 8) is None


def test_invalid_points_are_shown_as_invalid_and_counted_in_no_median():
    figures = summarize(BENCHES["serve_heavy"], [recorded("serve_heavy")])["figures"]
    for point in ("haproxy c=48 x8", "haproxy:backend=torch c=48 x8"):
        f = figures[f"{point}: img/s"]
        assert f["median"] is None and f["invalid"] == 1 and f["values"] == []
        assert f"{point}: p50 ms" not in figures
    text = render({"serve_heavy": summarize(BENCHES["serve_heavy"], [recorded("serve_heavy")])})
    assert "| haproxy c=48 x8: img/s | invalid | n/a | 0 (+1 invalid) |" in text


# --------------------------------------------------------------------------- like for like


def test_serving_ratios_name_both_sides_when_they_run_differently():
    """The recorded serve_heavy ran the naive server and the in-process runs in PyTorch fp32 for
    every mode: the bf16 mode's ratio says so, the PyTorch fp32 mode's is like for like."""
    figures = summarize(BENCHES["serve_heavy"], [recorded("serve_heavy")])["figures"]
    labels = "\n".join(figures)
    assert ("haproxy:backend=torch,precision=bf16: served / naive (served PyTorch bf16 / naive PyTorch fp32), "
            "img/s at saturation (x)") in figures
    assert "haproxy:backend=torch: served / naive (both PyTorch fp32), img/s at saturation (x)" in figures
    assert "haproxy: served / naive (served serve.backend=auto fp32 / naive PyTorch fp32)" in labels
    assert ("haproxy:backend=torch,precision=bf16: 8 images per request / in-process end to end "
            "(served PyTorch bf16 / in-process PyTorch fp32), img/s (x)") in figures
    assert not [label for label in figures if label.endswith(": served / naive, img/s at saturation (x)")]


def test_each_mode_is_compared_with_a_naive_server_and_in_process_run_of_its_own_kind():
    from bench.serve_throughput import TORCH_FP32, mode_settings, naive_kind, served_kind

    def kind(spec: str, export: bool = False, serve_set: list[str] | None = None) -> str:
        return served_kind(mode_settings(spec, serve_set or []), export)

    assert kind("haproxy") == TORCH_FP32 and kind("proxy:batcher=timeout") == TORCH_FP32
    assert kind("haproxy", export=True) == "auto fp32"
    assert kind("haproxy:backend=torch,precision=bf16") == "torch bf16" == kind("haproxy:precision=bf16")
    assert kind("haproxy:backend=onnx") == "onnx fp32"
    assert kind("haproxy", serve_set=["precision=bf16"]) == "torch bf16"
    assert naive_kind("torch bf16", None) == "torch bf16" and naive_kind("onnx fp32", None) == "onnx fp32"
    assert naive_kind("auto fp32", "onnx") == "onnx fp32" and naive_kind("auto fp32", "torch") == TORCH_FP32
    assert naive_kind("tensorrt fp32", None) == TORCH_FP32  # not runnable naively: the ratio names both


def test_like_for_like_results_give_like_for_like_labels():
    from bench.run import _serve

    r = recorded("serve_heavy")
    mode = "haproxy:backend=torch,precision=bf16"
    bf16_local = {**r["in_process"], "kind": "torch bf16", "end_to_end_images_per_s": 34.0}
    bf16_naive = [{**row, "images_per_s": row["images_per_s"] * 2} for row in r["naive"]]
    r = {**r, "served": {mode: r["served"][mode]}, "naive": [], "naive_by_kind": {"torch bf16": bf16_naive},
         "in_process_by_kind": {"torch fp32": r["in_process"], "torch bf16": bf16_local},
         "ratios": {"by_mode": {mode: {"served_kind": "torch bf16", "naive_kind": "torch bf16"}}}}
    figures = _serve(r)
    ratio = figures[f"{mode}: served / naive (both PyTorch bf16), img/s at saturation (x)"]
    assert ratio == pytest.approx(44.9 / (2 * 20.4), rel=0.01)
    assert figures[f"{mode}: 8 images per request / in-process end to end (both PyTorch bf16), img/s (x)"] == \
        pytest.approx(62.5 / 34.0, rel=0.01)  # the 48-client point: p50 3.5 s inside the 4 s window
    assert figures["in-process end to end, PyTorch bf16, img/s"] == 34.0
    assert "naive PyTorch bf16 c=4 x1: img/s" in figures


def test_batched_over_one_image_compares_end_to_end_with_end_to_end():
    r = recorded("serve_heavy")
    figures = summarize(BENCHES["serve_heavy"], [r])["figures"]
    ratio = figures["in-process end to end, batched / one image at a time, img/s (x)"]["median"]
    local = r["in_process"]
    assert ratio == pytest.approx(local["end_to_end_images_per_s"] / local["one_image_end_to_end_images_per_s"])


# --------------------------------------------------------------------------- medians, skipped runs, order


def test_decode_median_of_two_photos_is_their_mean():
    r = json.loads((RESULTS / "harness.json").read_text())["decode"]["raw"][0]  # the published run: 2 photos
    figures = BENCHES["decode"].figures(r)
    png = [x["after_over_before"] for x in r["cost"] if " PNG" in x["images"] and "digits" not in x["images"]]
    assert len(png) == 2 and figures["safe / old decode time, photo PNG (x)"] == pytest.approx(statistics.median(png))
    assert figures["safe / old decode time, photo PNG (x)"] < max(png)


def test_a_skipped_run_is_carried_as_skipped_not_as_an_empty_table():
    run = {"skipped": "Torch-TensorRT is not installed", "machine": recorded("decode")["machine"], "seconds": 3.0}
    summary = summarize(BENCHES["tensorrt"], [run])
    assert summary["skipped"] == "Torch-TensorRT is not installed" and "figures" not in summary
    text = render({"tensorrt": summary})
    assert "Not measured: Torch-TensorRT is not installed (run on " in text
    assert "| figure |" not in text.split("## tensorrt")[1]


def test_summaries_keep_figures_only_later_runs_have():
    first, second = recorded("ingest"), recorded("ingest")
    del first["ray_data"]  # an older result without the per-side figures
    figures = summarize(BENCHES["ingest"], [first, second])["figures"]
    assert figures["Ray Data steady img/s"]["values"] == [second["ray_data"]["images_per_s"]]


def test_stale_figures_and_notes_are_marked_in_the_markdown():
    summary = summarize(BENCHES["ingest"], [recorded("ingest")])
    summary["stale"] = {"Ray Data steady img/s": "measured before X, rerun pending"}
    summary["notes"] = ["recomputed from the same run's raw numbers"]
    text = render({"ingest": summary})
    assert "| Ray Data steady img/s (stale: measured before X, rerun pending) |" in text
    assert "Note: recomputed from the same run's raw numbers" in text


def test_repeats_alternate_the_order():
    from bench.serve_throughput import repeat_order
    from bench.tune_asha import first_sweep

    assert [repeat_order("auto", {"IMGCLS_BENCH_REPEAT": str(k)}) for k in range(4)] == [False, True, False, True]
    assert repeat_order("auto", {}) is False and repeat_order("reverse", {}) is True
    assert [first_sweep("auto", {"IMGCLS_BENCH_REPEAT": str(k)}) for k in range(3)] == ["asha", "fifo", "asha"]
    assert first_sweep("fifo", {}) == "fifo" and first_sweep("auto", {}) == "asha"


def test_rate_comparisons_take_medians_of_at_least_5():
    from bench import gpu_train, tensorrt, trial_startup  # noqa: F401  (their parsers' defaults below)

    assert "5" == BENCHES["trial_startup"].args[BENCHES["trial_startup"].args.index("--rounds") + 1]
    for name in ("serve_throughput", "serve_heavy", "serve_heavy_2cores", "serve_options"):
        assert BENCHES[name].repeats >= 5, name
    assert BENCHES["tune_asha"].repeats >= 2  # one run with each sweep first


@pytest.mark.parametrize("module", ["gpu_train", "tensorrt"])
def test_gpu_rate_comparisons_default_to_5_alternated_repeats(module, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(f"bench.{module}").main(["--help"])
    assert "--repeats" in capsys.readouterr().out
    source = (Path(__file__).resolve().parents[2] / "bench" / f"{module}.py").read_text()
    assert 'parser.add_argument("--repeats", type=int, default=5)' in source


def test_quantize_pins_the_published_model():
    from bench.quantize import MODEL_OVERRIDES
    from imgcls_core.config import load_config

    cfg = load_config("configs/digits.yaml", [*MODEL_OVERRIDES, "model.width=0.25"])
    assert (cfg.model.name, cfg.model.width, cfg.model.small_input, cfg.data.image_size) == ("resnet18", 0.25, True, 32)


# --------------------------------------------------------------------------- results files


def _fake_runs(monkeypatch, fail_on: int | None = None):
    import bench.run

    calls = []

    def fake_run_one(bench, quick, log=print, keep=None, repeat=0):
        calls.append(repeat)
        if repeat == fail_on:
            raise RuntimeError(f"bench.{bench.name} exited 1")
        return {**recorded("decode"), "repeat": repeat}

    monkeypatch.setattr(bench.run, "run_one", fake_run_one)
    return calls


def _run(tmp_path, *extra) -> tuple[int, Path]:
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    rc = main(["--only", "decode", "--markdown", str(tmp_path / "B.md"), "--state", str(tmp_path / "h.json"),
               "--results", str(results), *extra])
    return rc, results / "decode.json"


def test_the_results_file_is_written_once_every_repeat_succeeded(tmp_path, monkeypatch):
    calls = _fake_runs(monkeypatch)
    rc, kept = _run(tmp_path, "--repeats", "3")
    assert rc == 0 and calls == [0, 1, 2]
    assert json.loads(kept.read_text())["repeat"] == 2 and "seconds" not in json.loads(kept.read_text())
    assert not [p for p in kept.parent.iterdir() if p.name != "decode.json"]  # no temporary file left


def test_a_failing_repeat_or_a_quick_run_leaves_the_results_file_alone(tmp_path, monkeypatch):
    _fake_runs(monkeypatch, fail_on=1)
    rc, kept = _run(tmp_path, "--repeats", "3")
    assert rc == 1 and not kept.exists()
    _fake_runs(monkeypatch)
    rc, kept = _run(tmp_path, "--quick")
    assert rc == 0 and not kept.exists()
    assert json.loads((tmp_path / "h.json").read_text())["decode"]["quick"] is True


def test_a_partial_save_goes_beside_the_result_and_the_final_one_removes_it(tmp_path, monkeypatch):
    from bench.common import save

    out = tmp_path / "train_vs_local.json"
    out.write_text('{"complete": true}')
    monkeypatch.setenv("IMGCLS_BENCH_OUT", str(out))
    save("train_vs_local", {"rounds_done": 1}, partial=True)
    assert json.loads(out.read_text()) == {"complete": True}
    assert json.loads((tmp_path / "train_vs_local.partial.json").read_text())["partial"] is True
    save("train_vs_local", {"rounds_done": 5})
    assert json.loads(out.read_text())["rounds_done"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_vs_local.json"]


def test_invalid_values_are_not_numbers_in_any_median():
    figures = summarize(BENCHES["decode"], [recorded("decode")])["figures"]
    assert all(INVALID not in f["values"] for f in figures.values())


def test_a_point_measured_by_the_load_generator_process_uses_the_window_it_reports(tmp_path):
    """bench.serve_throughput.measure_point runs bench.loadgen in its own process with the rounds,
    reads the window's edges from its output, and divides the server's CPU time by the images of
    the window the load generator actually used (here 3 rounds of 0.2 s, longer than --seconds)."""
    from aiohttp import web

    from bench.serve_throughput import measure_point
    from tests.http_stub import stub_server

    async def handler(request):
        await request.read()
        await asyncio.sleep(0.2)
        return web.Response(text="ok")

    (tmp_path / "0.png").write_bytes(b"x")
    with stub_server(handler) as url:
        row = measure_point(url, tmp_path, 4, 1, 0.1, [], warmup_s=0.0)
    assert row["valid"] and row["warmup_s"] >= 0.35 and row["window_s"] == pytest.approx(3 * row["round_s"])
    assert row["images_per_s"] == pytest.approx(4 / 0.2, rel=0.15)
    assert row["server_cpu_s"] == 0 and row["server_cpu_ms_per_image"] == 0  # no server process was named
