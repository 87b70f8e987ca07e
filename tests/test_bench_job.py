"""bench --job times the whole job phase by phase (no timing assertions: the phases, shares and shape of the JSON)."""

from __future__ import annotations

import json

import pytest

from dreambooth.bench.job import PHASES, JobOptions, format_job_table
from dreambooth.cli import main
from dreambooth.errors import UserError


def test_job_bench_times_every_phase_of_the_job(tmp_path, capsys):
    out = tmp_path / "job.json"
    code = main(["bench", "--job", "--model", "builtin:tiny", "--resolution", "32", "--steps", "2",
                 "--class-images", "1", "--out", str(out), "--table", str(tmp_path / "job.md")])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["complete"] and data["prior"] and data["num_class_images"] == 1 and data["steps"] == 2
    (row,) = data["rows"]
    assert row["status"] == "ok", row["reason"]
    assert list(row["phases"]) == list(PHASES)  # validation ran: the CPU job validates once, at its last step
    assert all(p["s"] > 0 for p in row["phases"].values())
    assert sum(p["share"] for p in row["phases"].values()) == pytest.approx(1, abs=1e-3)
    assert row["total_s"] == pytest.approx(sum(p["s"] for p in row["phases"].values()), abs=0.004)  # 7 roundings
    assert row["peak_memory"]["cpu_peak_rss_bytes"] > 0 and row["compile"]["on"] is False
    assert row["phases"]["class_images"]["peak_memory"]["cpu_peak_rss_bytes"] > 0
    printed = capsys.readouterr().out
    assert "| class_images |" in printed and "| **total** |" in printed
    assert (tmp_path / "job.md").read_text().strip() in printed


def test_job_bench_refuses_unknown_variants():
    with pytest.raises(UserError, match="eager, full, regional"):
        JobOptions(variants=["eager", "fast"]).resolved()


def test_job_table_reports_failed_variants_and_the_proxy():
    result = {"device": "cpu", "device_type": "cpu", "model": "m", "resolution": 32, "steps": 2,
              "num_class_images": 1, "validation": False,
              "rows": [{"name": "full", "status": "error", "reason": "RuntimeError: no compiler"}],
              "compile_proxy": {"status": "ok", "model": "m", "resolution": 32, "backend": "inductor",
                                "seconds": {"full_cold": 100.0}, "ratios": {"regional_over_full_cold": 0.2}}}
    table = format_job_table(result)
    assert "error: RuntimeError: no compiler" in table and "regional over full cold 0.200" in table


def test_compile_proxy_times_each_compile_in_a_new_process(monkeypatch):
    """The backend reaches the proxy's own processes; each kind's compile seconds and the ratios come back."""
    from dreambooth.bench.compile_proxy import compile_proxy
    from dreambooth.training import compiling
    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "eager")  # graph capture without code generation
    p = compile_proxy("builtin:tiny", 32, scopes=("regional",))
    assert p["status"] == "ok", p.get("reason")
    assert p["backend"] == "eager" and set(p["runs"]) == {"regional_cold", "regional_warm"}  # eager: no artifacts
    assert all(r["compile_s"] > 0 and r["eager_call_s"] > 0 for r in p["runs"].values())
    assert p["ratios"]["regional_warm_over_cold"] > 0
