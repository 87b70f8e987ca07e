"""compile: true captures the UNet with torch.compile in place. On CPU traced with dynamo's eager backend (the same
graph capture, without minutes of code generation); on a GPU, inductor with CUDA graphs. Speed is measured by the
benchmark, not here."""

from __future__ import annotations

import pytest
import torch
from conftest import cuda

from dreambooth import models
from dreambooth.train import Trainer


def _steps(cfg, n=2):
    trainer = Trainer(cfg).setup()
    batches = trainer.batches()
    losses = [trainer.train_step(batches)["loss"] for _ in range(n)]
    return trainer, losses


def test_compiled_unet_trains_like_eager_and_validates_without_recompiling(make_cfg, tmp_path, monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters
    monkeypatch.setattr(models, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    fast = {"validation.enabled": True, "validation.num_inference_steps": 2, "validation.prompts": ["a toy"]}
    _, eager_losses = _steps(make_cfg(output_dir=str(tmp_path / "eager"), gradient_checkpointing=True, **fast))
    graphs = counters["stats"]["unique_graphs"]
    trainer, losses = _steps(make_cfg(output_dir=str(tmp_path / "compiled"), gradient_checkpointing=True,
                                      compile=True, **fast))
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
                                       compile_mode="reduce-overhead", **base), n=5)  # steps 3-5 replay graphs
    try:
        assert counters["stats"]["unique_graphs"] > 0 and counters["inductor"]["cudagraph_skips"] == 0
        assert len(replays) >= 3, "the compiled UNet never replayed a CUDA graph"
        assert graphed[0] == pytest.approx(eager[0], rel=1e-2)  # same weights, batch and noise: kernels differ
        assert graphed == pytest.approx(eager, rel=0.1)
        assert all(torch.isfinite(p).all() for p in trainer.params)
    finally:
        trainer.runlog.close(None)
        torch._dynamo.reset()  # free the graphs' memory pool for the tests after this one
