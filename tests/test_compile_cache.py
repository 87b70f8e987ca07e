"""compile_cache: compiled UNet code kept in a folder between runs, what each compile cost recorded there, and
`compile: auto` planning with those records. The cache test compiles with inductor for real (regional, tiny UNet)."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest
import torch

from dreambooth.config import Machine, resolve
from dreambooth.config.compile_plan import PAYBACK_STEPS, RECORDS, cache_folder, cache_root
from dreambooth.files import read_json, write_json_atomic
from dreambooth.training import compiling
from dreambooth.training.compiling import CompileCache, compile_unet
from dreambooth.training.trainer import run_training

H200 = Machine(cuda=True, gpu_gib=139.0, triton=True, bitsandbytes=True, device_name="NVIDIA H200 sm90",
               torch_version="2.13.0")


def _plan(cfg, steps, machine=H200, **overrides):
    return resolve(dataclasses.replace(cfg, max_steps=steps, **overrides), machine, epoch_items=4)


def test_auto_compiles_short_runs_once_this_machine_keeps_the_compile(make_cfg, tmp_path):
    """With no record a 400-step run stays eager (700 steps repay a compile from scratch); once a compile is kept
    in the cache folder, a tenth of its time is assumed; once a compile from the cache was timed, that time rules."""
    cfg = make_cfg(compile_cache=str(tmp_path / "cache"))
    assert not _plan(cfg, 400).compile and f"under the {PAYBACK_STEPS}" in _plan(cfg, 400).choices["compile"].why
    compiled = _plan(cfg, 400, compile=True)  # where this compile's record lives
    folder, entry = compiled.compile_cache, compiled.compile_entry
    assert folder.startswith(str(tmp_path / "cache")) and "full" in entry and "reduce-overhead" in entry
    assert _plan(cfg, PAYBACK_STEPS).compile_cache == folder  # auto and explicit compile share the folder

    write_json_atomic(os.path.join(folder, RECORDS), {entry: {"cold_s": 130.0}})
    plan = _plan(cfg, 400)  # 13 s assumed: repaid after 77 steps
    assert plan.compile and "a tenth of its first 130 s" in plan.choices["compile"].why
    assert not _plan(cfg, 50).compile and "under the 77" in _plan(cfg, 50).choices["compile"].why

    write_json_atomic(os.path.join(folder, RECORDS), {entry: {"cold_s": 130.0, "warm_s": 40.0}})
    assert _plan(cfg, 400).compile and not _plan(cfg, 200).compile  # 40 s / 0.17 s per step = 236 steps
    assert "took 40 s" in _plan(cfg, 400).choices["compile"].why
    # The record is per machine, torch and batch shape: another card, torch or resolution starts from scratch.
    for machine in (dataclasses.replace(H200, device_name="NVIDIA H100 sm90"),
                    dataclasses.replace(H200, torch_version="2.14.0")):
        assert _plan(cfg, 400, machine).compile_cache is None and not _plan(cfg, 400, machine).compile
    assert not _plan(cfg, 400, resolution=64).compile
    assert _plan(make_cfg(compile_cache=None), 400, compile=True).compile_cache is None  # nothing kept


def test_cache_root_defaults_under_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("DREAMBOOTH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root("auto") == tmp_path / "xdg" / "dreambooth" / "compile"
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "db"))
    assert cache_root("auto") == tmp_path / "db" / "compile"
    assert cache_root(str(tmp_path / "mine")) == tmp_path / "mine" and cache_root(None) is None


def test_folder_key_names_model_precision_torch_and_device(make_cfg, tmp_path):
    cfg = make_cfg(compile_cache=str(tmp_path))
    folder = cache_folder(cfg, "fp16", H200)
    assert folder.parent == tmp_path and folder.name.startswith("builtin-tiny-nvidia-h200-sm90-")
    assert cache_folder(cfg, "fp16", H200) == folder
    assert len({folder, cache_folder(cfg, "bf16", H200), cache_folder(make_cfg(compile_cache=str(tmp_path),
                model="builtin:sd21/4"), "fp16", H200), cache_folder(cfg, "fp16", Machine())}) == 4


def _losses(out) -> list[float]:
    return [h["loss"] for h in read_json(out / "loss_history.json")]


def test_compile_cache_keeps_compiled_code_for_the_next_run(make_cfg, tmp_path, monkeypatch):
    """Two 20-step runs with inductor (regional, CPU) beside an eager one: the first compiles, records its cost and
    keeps its artifacts; the second compiles from the kept folder (disk-cache hits, no misses) and records that time.
    Both follow eager's losses within float tolerance, and the cached code computes exactly what the fresh one did.
    TORCHINDUCTOR_CACHE_DIR is left as it was."""
    import torch._dynamo
    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "inductor")
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    run_training(make_cfg(output_dir=str(tmp_path / "eager"), max_steps=20))
    base = {"compile": True, "compile_scope": "regional", "max_steps": 20, "compile_cache": str(tmp_path / "cache")}
    summaries, artifacts = [], []
    for run in ("first", "second"):
        torch._dynamo.reset()  # a new process knows no compiled code
        summaries.append(run_training(make_cfg(output_dir=str(tmp_path / run), **base)))
        assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before
        artifacts.append(sorted((tmp_path / "cache").glob("*/artifacts/*.bin")))
    torch._dynamo.reset()
    first, second = (s["compile"] for s in summaries)
    assert not first["from_cache"] and first.get("fxgraph_cache_miss", 0) > 0
    assert second["from_cache"] and second["fxgraph_cache_hit"] > 0 and not second.get("fxgraph_cache_miss")
    (folder,) = (tmp_path / "cache").iterdir()
    (record,) = read_json(folder / RECORDS).values()
    assert record["cold_s"] == first["compile_s"] and record["warm_s"] == second["compile_s"]
    assert artifacts[0] and artifacts[1] == artifacts[0]  # the run from the cache added nothing to carry
    assert any((folder / "inductor").iterdir())
    eager = _losses(tmp_path / "eager")
    assert len(eager) == 20 and _losses(tmp_path / "first") == pytest.approx(eager, rel=1e-3)
    assert _losses(tmp_path / "second") == _losses(tmp_path / "first")


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


def test_artifacts_alone_fill_a_new_machines_cache(tmp_path, monkeypatch):
    """A cache folder copied without its inductor folder (artifacts only, as to another machine) still hits."""
    import torch._dynamo
    from torch.compiler._cache import CacheArtifactManager
    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "inductor")
    x = torch.randn(2, 8)
    torch._dynamo.reset()
    CacheArtifactManager.clear()  # only this test's compile in the saved artifacts
    cache = CompileCache(str(tmp_path / "here"), "mlp").open()
    try:
        model = _Mlp()
        compile_unet(model)
        model(x).sum().backward()
        cache.save_artifacts()
    finally:
        cache.close()
    (tmp_path / "there").mkdir()
    shutil.copytree(tmp_path / "here" / "artifacts", tmp_path / "there" / "artifacts")
    torch._dynamo.reset()
    cache = CompileCache(str(tmp_path / "there"), "mlp").open()
    try:
        model = _Mlp()
        compile_unet(model)
        before = compiling.compile_snapshot()
        model(x).sum().backward()
        stats = compiling.compile_stats(before)
    finally:
        cache.close()
        torch._dynamo.reset()
    assert stats.get("fxgraph_cache_hit", 0) > 0 and not stats.get("fxgraph_cache_miss")


def test_a_compile_cache_that_cannot_be_written_is_refused_in_one_line(make_cfg, tmp_path, caplog, monkeypatch):
    from dreambooth.errors import UserError
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=r"compile_cache: .*a-file/cache is not a folder this user can write.*null"):
        _plan(make_cfg(compile_cache=str(blocker / "cache")), 10, compile=True)
    assert not _plan(make_cfg(compile_cache=str(blocker / "cache")), 10).compile  # not compiling: not checked
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(blocker))  # auto's folder unwritable: compiled, not kept, said so
    plan = _plan(make_cfg(), 10, compile=True)
    assert plan.compile and plan.compile_cache is None and "cannot write" in caplog.text


def test_graphs_inductor_will_not_cache_are_named_and_not_counted_as_warm(tmp_path, monkeypatch, caplog):
    """A graph inductor bypasses (it judged it uncacheable) is compiled by every run: the run says so, and its
    time is recorded as a compile from scratch."""
    import torch._dynamo
    from torch._inductor.codecache import BypassFxGraphCache, FxGraphCache

    def refuse(*args, **kwargs):
        raise BypassFxGraphCache("a test says no")
    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "inductor")
    monkeypatch.setattr(FxGraphCache, "_check_can_cache", staticmethod(refuse))
    torch._dynamo.reset()
    cache = CompileCache(str(tmp_path / "cache"), "mlp").open()
    try:
        model, x = _Mlp(), torch.randn(2, 8)
        compile_unet(model)
        model(x).sum().backward()
        for seconds in [3.0, 1.0, 1.0] + [0.5] * compiling.NEXT:
            cache.step_done(seconds)
    finally:
        cache.close()
        torch._dynamo.reset()
    assert cache.result["compile_s"] == 3.5 and not cache.result["from_cache"]
    assert cache.result["fxgraph_cache_bypass"] > 0 and "did not cache" in caplog.text
    assert read_json(tmp_path / "cache" / RECORDS)["mlp"]["cold_s"] == 3.5


def test_an_eager_run_reports_no_compile_though_an_earlier_one_compiled_in_this_process():
    """bench --job runs its variants in one process: an eager run after a compiled one has nothing to time."""
    from torch._dynamo.utils import counters
    cache = CompileCache(None, "")  # what a Trainer holds until it compiles
    counters["inductor"]["fxgraph_cache_miss"] += 3  # an earlier run's compile
    try:
        for _ in range(compiling.FIRST + compiling.NEXT):
            cache.step_done(1.0)
    finally:
        counters["inductor"]["fxgraph_cache_miss"] -= 3
    assert cache.result is None and not cache.step_seconds
