"""The benchmark runs the real Trainer over the matrix and writes JSON of a fixed shape (no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cuda

from dreambooth.bench.run import SCHEMA, BenchOptions, run_bench
from dreambooth.bench.table import COMPILED, format_table, merge_runs, ratios
from dreambooth.cli import main
from dreambooth.errors import UserError
from dreambooth.models.load import build_builtin_sd21, model_kind
from dreambooth.models.builtin import _sd21_config


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def test_bench_writes_the_json_schema(tmp_path):
    out = tmp_path / "bench.json"
    rows = ["baseline", "default", "6gb", "lora", "nonsense"]
    result = run_bench(BenchOptions(model="builtin:tiny", resolution=32, steps=1, warmup=1, repeats=1, rows=rows,
                                    out=str(out), workdir=str(tmp_path / "work")))
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert data["schema"] == SCHEMA and data["device_type"] == "cpu" and data["scaled_down"] is True
    assert data["complete"] is True and data["repeats"] == 1
    for key in ("device", "model", "model_note", "scaled_note", "flops_note", "versions", "statistic"):
        assert isinstance(data[key], (str, dict)) and data[key]
    assert _number(data["bf16_matmul_peak_tflops"]) and data["bf16_matmul_peak_tflops"] > 0
    assert set(data["model_flops_per_step"]) == {"no_prior", "prior"}
    assert data["model_flops_per_step"]["prior"] > data["model_flops_per_step"]["no_prior"] > 0

    by = {(r["name"], r["prior"]): r for r in data["rows"]}
    assert len(data["rows"]) == 2 * len(rows)
    assert by[("nonsense", False)]["status"] == "skipped" and "nonsense" in by[("nonsense", False)]["reason"]
    assert by[("lora", True)]["status"] in ("ok", "skipped")
    for name in ("baseline", "default", "6gb"):
        for prior in (False, True):
            row = by[(name, prior)]
            assert row["status"] == "ok", row["reason"]
            for key in ("s_per_step", "images_per_s", "setup_s", "achieved_tflops", "mfu", "model_flops_per_step"):
                assert _number(row[key]) and row[key] >= 0, key
            assert row["images_per_step"] == (2 if prior else 1)
            assert len(row["step_times_s"]) == 1
            assert row["peak_memory"]["cpu_peak_rss_bytes"] > 0
    assert not by[("baseline", True)]["settings"]["latents_cached"]
    assert not by[("baseline", True)]["settings"]["prompts_cached"]
    assert by[("default", True)]["settings"]["latents_cached"]
    six = by[("6gb", True)]["settings"]
    assert six["memory"]["fused_backward"] and six["prior_mode"] == "concat"
    assert six["mixed_precision"] == "bf16"
    assert set(data["default_vs_baseline"]) == {"no_prior", "prior"}

    sampling = data["sampling"]
    assert sampling["pndm50_batch1"]["steps"] == 50 and sampling["pndm50_batch1"]["batch"] == 1
    assert sampling["ours"]["images_per_s"] > 0 and _number(sampling["speedup"])
    table = format_table(result)
    assert "| baseline | on |" in table and "MFU" in table and "skipped" in table


def test_passes_merge_into_one_row():
    def run(times, peak):
        return {"name": "default", "prior": False, "status": "ok", "reason": None, "step_times_s": times,
                "s_per_step": 0, "images_per_step": 1, "setup_s": 1.0, "peak_memory": {"cpu_peak_rss_bytes": peak}}
    row = merge_runs([run([1.0, 9.0], 5), run([2.0, 3.0], 7)])
    assert row["s_per_step"] == 2.5 and row["images_per_s"] == 0.4 and row["passes"] == 2
    assert row["peak_memory"]["cpu_peak_rss_bytes"] == 7 and len(row["step_times_s"]) == 4
    failed = {**run([1.0], 1), "status": "oom", "reason": "out of memory"}
    assert merge_runs([run([1.0], 1), failed])["status"] == "oom"


def test_bench_command_prints_a_table(tmp_path, capsys):
    out = tmp_path / "b.json"
    code = main(["bench", "--model", "builtin:tiny", "--resolution", "32", "--steps", "1", "--warmup", "0",
                 "--repeats", "1",
                 "--rows", "default", "--prior", "off", "--no-sampling", "--out", str(out),
                 "--table", str(tmp_path / "b.md")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| default | off |" in printed and (tmp_path / "b.md").read_text().strip() in printed
    assert "sampling" not in json.loads(out.read_text())


def test_builtin_sd21_names():
    assert model_kind("builtin:sd21") == model_kind("builtin:sd21/4") == "builtin"
    with pytest.raises(UserError, match="builtin:sd21/N"):
        model_kind("builtin:sd21/x")
    unet = build_builtin_sd21("builtin:sd21/16").unet
    real = _sd21_config("unet")
    assert list(unet.config.down_block_types) == list(real["down_block_types"])
    assert unet.config.layers_per_block == real["layers_per_block"]
    assert list(unet.config.block_out_channels) == [64, 64, 64, 64]  # widths / 16, at least one 64-wide head


@cuda
@pytest.mark.gpu
def test_bench_on_cuda_measures_device_memory(tmp_path):
    result = run_bench(BenchOptions(model="builtin:sd21/4", resolution=256, steps=2, warmup=1,
                                    rows=["default", "6gb"], prior="on", sampling=False,
                                    out=str(tmp_path / "gpu.json")))
    rows = {r["name"]: r for r in result["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), [r["reason"] for r in rows.values()]
    assert result["device_type"] == "cuda" and torch.cuda.get_device_name() == result["device"]
    peaks = {k: r["peak_memory"]["cuda_max_allocated_bytes"] for k, r in rows.items()}
    assert peaks["6gb"] < peaks["default"]


def test_rows_take_config_overrides(tmp_path):
    from dreambooth.bench.run import row_config
    o = BenchOptions(model="builtin:tiny", resolution=32, steps=1, warmup=1).resolved()
    cfg = row_config("default+compile+compile_mode=reduce-overhead", True, o, tmp_path, tmp_path, tmp_path / "o")
    assert cfg.compile is True and cfg.compile_mode == "reduce-overhead" and cfg.memory_profile == "default"
    ema = row_config("default+ema+ema_on_cpu", True, o, tmp_path, tmp_path, tmp_path / "o")
    assert ema.ema is True and ema.ema_on_cpu is True and ema.memory_profile == "default"
    baseline = row_config("baseline", True, o, tmp_path, tmp_path, tmp_path / "o")
    assert baseline.cache_latents is False and baseline.compile is False  # never compiled, on any machine
    with pytest.raises(UserError, match="compile_mod"):
        row_config("default+compile_mod=x", True, o, tmp_path, tmp_path, tmp_path / "o")


def test_gpu_matrix_adds_the_compiled_default_and_its_ratio(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert BenchOptions().resolved().rows == ["baseline", "default", COMPILED, "8gb", "6gb", "24gb", "lora",
                                              "default+ema", "default+ema+ema_on_cpu", "8gb+ema"]
    assert BenchOptions(rows=["default"]).resolved().rows == ["default"]  # rows named are run as named
    rows = [{"name": n, "prior": True, "status": "ok", "s_per_step": t}
            for n, t in (("baseline", 0.3), ("default", 0.25), (COMPILED, 0.1))]
    assert ratios(rows) == {"prior": pytest.approx(1.2)} and ratios(rows, COMPILED) == {"prior": pytest.approx(3.0)}


def test_compiled_rows_say_where_the_compile_time_went(monkeypatch):
    import torch._dynamo

    from dreambooth.training import compiling
    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "aot_eager")  # dynamo + AOTAutograd, no code generation
    torch._dynamo.reset()
    result = run_bench(BenchOptions(model="builtin:tiny", resolution=32, steps=1, warmup=2, repeats=1,
                                    rows=["default", COMPILED], prior="on", sampling=False))
    torch._dynamo.reset()
    rows = {r["name"]: r for r in result["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), [r["reason"] for r in rows.values()]
    stats = rows[COMPILED]["compile_stats"]
    assert stats["dynamo_and_forward_s"] > 0 and stats["aot_joint_trace_s"] > 0
    assert "compile_stats" not in rows["default"] and len(rows[COMPILED]["warmup_step_times_s"]) == 2
    assert "compile of default+compile (prior on): dynamo and forward" in format_table(result)


def test_profiled_rows_say_where_the_step_time_goes():
    result = run_bench(BenchOptions(model="builtin:tiny", resolution=32, steps=1, warmup=1, rows=["default"],
                                    prior="on", sampling=False, profile=["default"]))
    p = result["rows"][0]["profile"]
    assert p["steps"] == 2 and p["wall_ms_per_step"] > 0 and p["cpu_ops_per_step"] > 100
    assert p["top_ops"] and all(o["op"] and o["calls"] > 0 for o in p["top_ops"])
    assert p["gpu_busy"] is None  # no GPU here: host time only
    assert "Profiled steps" in format_table(result) and "aten calls/step" in format_table(result)
