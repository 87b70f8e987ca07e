"""compile: true captures the UNet with torch.compile in place. On CPU traced with dynamo's eager backend (the same
graph capture, without minutes of code generation); on a GPU, inductor with CUDA graphs. Speed is measured by the
benchmark, not here."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import cuda

from dreambooth.config import Machine, resolve
from dreambooth.config.compile_plan import PAYBACK_STEPS
from dreambooth.config.plan import Choice
from dreambooth.training import compiling
from dreambooth.training.compiling import compile_unet
from dreambooth.training.trainer import Trainer


VALIDATION = {"validation.enabled": True, "validation.num_inference_steps": 2, "validation.prompts": ["a toy"]}


def _steps(cfg, n=2):
    trainer = Trainer(cfg).setup()
    batches = trainer.batches()
    losses = [trainer.step.run(batches, trainer.state)["loss"] for _ in range(n)]
    return trainer, losses


def _plan(cfg, steps=PAYBACK_STEPS, **machine):
    """The plan on a 16 GiB CUDA GPU with Triton and bitsandbytes (unless overridden), for a run of `steps` steps."""
    cfg = dataclasses.replace(cfg, max_steps=steps)
    kind = {"cuda": True, "gpu_gib": 16.0, "processes": 1, "triton": True, "bitsandbytes": True, **machine}
    return resolve(cfg, Machine(**kind), epoch_items=4)


def _resolve(cfg, steps=PAYBACK_STEPS, **machine):
    """compile and compile_mode as `compile: auto` settles them, and why."""
    plan = _plan(cfg, steps, **machine)
    return plan.compile, plan.compile_mode, plan.choices["compile"].why if "compile" in plan.choices else ""


def test_auto_compiles_long_single_gpu_runs_with_cuda_graphs(make_cfg):
    cfg = make_cfg()
    on, mode, why = _resolve(cfg)
    assert (on, mode) == (True, "reduce-overhead") and f"{PAYBACK_STEPS} steps on one CUDA GPU" in why
    assert _plan(cfg).choices["compile"].given == "auto"  # config.yaml keeps auto: another machine decides afresh
    assert cfg.compile == "auto"  # the config itself is never changed
    assert _resolve(make_cfg(memory_profile="24gb"))[:2] == (True, "reduce-overhead")


@pytest.mark.parametrize("overrides, machine, reason", [
    ({}, {"steps": PAYBACK_STEPS - 1}, f"under the {PAYBACK_STEPS}"),
    ({}, {"cuda": False}, "no CUDA GPU"),
    ({}, {"processes": 2}, "several processes"),
    ({}, {"triton": False}, "Triton"),
    ({"memory_profile": "8gb"}, {}, "memory_profile 8gb"),
    ({"memory_profile": "6gb"}, {}, "memory_profile 6gb"),
    ({"finetune": "lora"}, {}, "full UNet"),
    ({"train_text_encoder": True}, {}, "frozen text encoder"),
    ({"gradient_accumulation_steps": 2}, {}, "several backward passes"),
    ({"with_prior_preservation": True, "prior_mode": "sequential"}, {},
     "several backward passes"),
])
def test_auto_stays_eager_where_compiling_does_not_pay_or_cannot_graph(make_cfg, overrides, machine, reason):
    on, mode, why = _resolve(make_cfg(**overrides), **machine)
    assert (on, mode) == (False, "default") and reason in why


def test_explicit_compile_wins_over_auto(make_cfg):
    assert _resolve(make_cfg(compile=True), steps=10)[:2] == (True, "reduce-overhead")  # short runs too
    assert _resolve(make_cfg(compile=False))[:2] == (False, "default")
    # Several backward passes: auto picks the mode without CUDA graphs instead of refusing the run.
    assert _resolve(make_cfg(compile=True, gradient_accumulation_steps=2))[:2] == (True, "default")
    assert _resolve(make_cfg(compile=True, compile_mode="default"))[:2] == (True, "default")
    assert _resolve(make_cfg(compile=True), cuda=False)[:2] == (True, "default")


def test_cpu_run_records_why_it_did_not_compile(make_cfg):
    trainer = Trainer(make_cfg()).setup()
    try:
        assert trainer.plan.compile is False and trainer.plan.compile_mode == "default"
        assert trainer.plan.choices["compile"] == Choice("auto", False, "no CUDA GPU")
        written = (trainer.out / "config.yaml").read_text()
        assert "compile: auto  # this run: false (no CUDA GPU)" in written  # a GPU rerun decides afresh
        assert getattr(trainer.components.unet, "_compiled_call_impl", None) is None
    finally:
        trainer.runlog.close(None)
        trainer.close()


class _Doubler(torch.nn.Module):
    def forward(self, x):  # defined here: dynamo does not trace torch.nn's own modules as a top frame
        return x * 2


def test_auto_falls_back_to_eager_when_compiling_fails(monkeypatch):
    """compile: auto must not end a run where inductor cannot build (no compiler, say); explicit compile does."""
    import torch._dynamo

    def broken_backend(graph, inputs):
        raise RuntimeError("no C compiler")
    monkeypatch.setattr(compiling, "COMPILE_BACKEND", broken_backend)
    monkeypatch.setattr(torch._dynamo.config, "suppress_errors", False)
    x = torch.randn(2, 3)
    for fall_back in (True, False):
        torch._dynamo.reset()
        layer = _Doubler()
        compile_unet(layer, fall_back=fall_back)
        if fall_back:
            assert torch.equal(layer(x), x * 2)
        else:
            with pytest.raises(Exception, match="no C compiler"):
                layer(x)
    torch._dynamo.reset()


def test_compiled_unet_trains_like_eager_and_validates_without_recompiling(make_cfg, tmp_path, monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters
    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    _, eager_losses = _steps(make_cfg(output_dir=str(tmp_path / "eager"), gradient_checkpointing=True,
                                      max_steps=20, **VALIDATION), n=20)
    graphs = counters["stats"]["unique_graphs"]
    trainer, losses = _steps(make_cfg(output_dir=str(tmp_path / "compiled"), gradient_checkpointing=True,
                                      compile=True, max_steps=20, **VALIDATION), n=20)
    captured = counters["stats"]["unique_graphs"]
    assert captured > graphs  # the UNet really ran through dynamo
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    assert not any("_orig_mod" in k for k in unet.state_dict())  # checkpoints and export see the usual names
    images = trainer.validator.run(2)  # other shapes, no gradients: run eagerly, not compiled a second time
    assert images["a toy"][0].size == (trainer.cfg.resolution, trainer.cfg.resolution)
    assert counters["stats"]["unique_graphs"] == captured
    assert unet._compiled_call_impl is not None  # still compiled for the steps after validation
    trainer.runlog.close(None)
    trainer.close()  # the compile cache gives inductor its folder back


@pytest.mark.gpu
@cuda
def test_cuda_graphs_train_like_eager_on_cuda(make_cfg, tmp_path, monkeypatch):
    """compile_mode: reduce-overhead with inductor on a GPU (bf16, 8-bit AdamW where installed, checkpointing):
    CUDA graphs really replay, the first loss is eager's up to rounding, later ones follow eager's run (Adam turns
    rounding in near-zero gradients into whole-size updates, so only loosely), and the weights stay finite."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    if not torch.cuda.is_bf16_supported():
        pytest.skip("needs bf16 (fp16's grad scaler may skip a different first step in each run)")
    replays = []
    real_replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or real_replay(graph))
    torch._dynamo.reset()
    counters.clear()
    base = {"gradient_checkpointing": True, "max_steps": 5, "learning_rate": 1e-4, "mixed_precision": "bf16"}
    _, eager = _steps(make_cfg(output_dir=str(tmp_path / "eager"), **base), n=5)
    assert not replays
    trainer, graphed = _steps(make_cfg(output_dir=str(tmp_path / "graphs"), compile=True,
                                       compile_mode="reduce-overhead", **base, **VALIDATION), n=5)  # 3-5 replay
    try:
        assert counters["stats"]["unique_graphs"] > 0 and counters["inductor"]["cudagraph_skips"] == 0
        assert len(replays) >= 3, "the compiled UNet never replayed a CUDA graph"
        assert graphed[0] == pytest.approx(eager[0], rel=1e-2)  # same weights, batch and noise: kernels differ
        assert graphed == pytest.approx(eager, rel=0.1)
        assert all(torch.isfinite(p).all() for p in trainer.step.params)
        # Validation images run the UNet eagerly between replays; training then replays the same graphs again.
        images = trainer.validator.run(5)
        assert images["a toy"][0].size == (trainer.cfg.resolution, trainer.cfg.resolution)
        replayed = len(replays)
        assert math.isfinite(trainer.step.run(trainer.batches(), trainer.state)["loss"]) and len(replays) > replayed
    finally:
        trainer.runlog.close(None)
        trainer.close()  # the compile cache gives inductor its folder back
        torch._dynamo.reset()  # free the graphs' memory pool for the tests after this one


def test_regional_compile_trains_like_eager_and_validates_between_steps(make_cfg, tmp_path, monkeypatch):
    """compile_scope: regional compiles each repeated transformer block (the rest stays eager): the same 20 losses
    as eager, validation between compiled steps runs eagerly, and the blocks stay compiled after it."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    _, eager_losses = _steps(make_cfg(output_dir=str(tmp_path / "eager"), gradient_checkpointing=True,
                                      max_steps=20), n=20)
    graphs = counters["stats"]["unique_graphs"]
    trainer = Trainer(make_cfg(output_dir=str(tmp_path / "regional"), gradient_checkpointing=True, compile=True,
                               compile_scope="regional", max_steps=20, **VALIDATION)).setup()
    try:
        assert trainer.plan.compile_scope == "regional"
        unet = trainer.accelerator.unwrap_model(trainer.unet)
        blocks = compiling.repeated_blocks(unet)
        assert blocks and all(b._compiled_call_impl is not None for b in blocks)
        assert getattr(unet, "_compiled_call_impl", None) is None  # the UNet itself stays eager
        batches = trainer.batches()
        losses = [trainer.step.run(batches, trainer.state)["loss"] for _ in range(2)]
        assert counters["stats"]["unique_graphs"] > graphs  # the blocks really ran through dynamo
        images = trainer.validator.run(2)
        assert images["a toy"][0].size == (trainer.cfg.resolution, trainer.cfg.resolution)
        assert all(b._compiled_call_impl is not None for b in blocks)  # compiled again after validation
        losses += [trainer.step.run(batches, trainer.state)["loss"] for _ in range(18)]
        assert losses == pytest.approx(eager_losses, rel=1e-5)  # 20 steps, as the eager run's
        assert not any("_orig_mod" in k for k in unet.state_dict())
    finally:
        trainer.runlog.close(None)
        trainer.close()  # the compile cache gives inductor its folder back
        torch._dynamo.reset()


def test_compile_scope_auto_is_full(make_cfg):
    plan = _plan(make_cfg())
    assert plan.compile and plan.compile_scope == "full" and plan.choices["compile_scope"].value == "full"
    assert _plan(make_cfg(compile_scope="regional")).compile_scope == "regional"


@pytest.mark.parametrize("scope", ["full", "regional"])
def test_compiled_run_resumes_like_an_eager_run(scope, make_cfg, tmp_path, monkeypatch):
    """Stopped after step 3 and resumed with compile on (the eager backend: same capture, no codegen), the final
    UNet equals an eager run's that was never stopped."""
    import torch._dynamo
    from conftest import final_unet, max_diff

    from dreambooth.training import signals
    from dreambooth.training.trainer import run_training
    from test_checkpoint import EXACT, interrupt_at
    from torch._dynamo.utils import counters
    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    run_training(make_cfg(output_dir=str(tmp_path / "straight"), **EXACT))
    graphs = counters["stats"]["unique_graphs"]
    compiled = {"compile": True, "compile_scope": scope, "checkpoint_steps": 2, **EXACT}
    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        with pytest.raises(signals.Interrupted):
            run_training(make_cfg(output_dir=str(tmp_path / "stopped"), **compiled))
    summary = run_training(make_cfg(output_dir=str(tmp_path / "stopped"), resume="latest", **compiled))
    torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] > graphs  # the UNet (or its blocks) really ran through dynamo
    assert summary["steps"] == EXACT["max_steps"]
    assert max_diff(final_unet(tmp_path / "straight"), final_unet(tmp_path / "stopped")) <= 1e-5
