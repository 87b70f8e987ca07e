"""`dreambooth bench serve` on builtin:tiny, cut down to a few requests: its JSON and its table."""

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from dreambooth.bench.serve import ServeBenchOptions, format_serve_table, run_serve_bench  # noqa: E402
from dreambooth.cli import main  # noqa: E402


def test_bench_serve_writes_json_and_table(tmp_path):
    out = tmp_path / "bench-serve.json"
    r = run_serve_bench(ServeBenchOptions(size=16, steps=1, requests=4, concurrency=(1, 4), max_batch=4,
                                          out=str(out)))
    assert json.loads(out.read_text()) == r and r["schema"] == "dreambooth-bench-serve/1"
    assert list(r["concurrency"]) == ["1", "4"] and r["concurrency"]["4"]["requests"] == 4
    for s in (r["in_process"], r["server_concurrency_1"], *r["concurrency"].values()):
        assert 0 < s["p50_s"] <= s["p95_s"] and s["images_per_s"] > 0
    b = r["batching_concurrency_4"]
    assert b["max_batch_1"]["pipeline_calls"] == 4 and b["max_batch_4"]["pipeline_calls"] <= 4
    assert r["overhead_concurrency_1"] > -1 and "server overhead at 1 client" in format_serve_table(r)


def test_bench_serve_mistakes_are_one_line(capsys):
    assert main(["bench", "serve", "--concurrency", "1,x"]) == 2
    assert "--concurrency" in capsys.readouterr().err
