"""EMA of the trained weights: the update against its closed form and diffusers' EMAModel, raw weights untouched,
exact resume, export and validation of the average, and where the low-memory profiles keep it."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import assert_bits_equal, final_unet
from safetensors.torch import load_file

from dreambooth.config.machine import Machine
from dreambooth.config.plan import resolve
from dreambooth.training import signals
from dreambooth.training.checkpoint import EMA_FILE
from dreambooth.training.ema import EMA
from dreambooth.training.trainer import Trainer, run_training


def toy(steps: int, decay: float, warmup: bool):
    """Two scalar weights stepped by SGD on a quadratic; the EMA updated after every step. Returns the EMA and
    the weights after each step (index 0: the start)."""
    a, b = torch.nn.Parameter(torch.tensor(1.0)), torch.nn.Parameter(torch.tensor(-2.0))
    opt = torch.optim.SGD([a, b], lr=0.1)
    ema = EMA([("a", a), ("b", b)], decay, warmup)
    history = [(a.item(), b.item())]
    for k in range(steps):
        opt.zero_grad()
        ((a - 3) ** 2 + (b * (k + 1)) ** 2).backward()
        opt.step()
        raw = [a.detach().clone(), b.detach().clone()]
        ema.update()
        assert_bits_equal([a.detach(), b.detach()], raw)  # the average never moves the weights
        history.append((a.item(), b.item()))
    return ema, history


def test_ema_equals_its_closed_form():
    d, n = 0.8, 6
    ema, w = toy(n, d, warmup=False)
    for i in range(2):  # s_N = d^N w_0 + (1 - d) sum_k d^(N-k) w_k
        want = d ** n * w[0][i] + (1 - d) * sum(d ** (n - k) * w[k][i] for k in range(1, n + 1))
        assert ema.shadow[i].item() == pytest.approx(want, rel=1e-6)
    assert ema.updates == n


def test_ema_warmup_is_diffusers_ema_model():
    from diffusers.training_utils import EMAModel
    ema, _ = toy(0, 0.9, warmup=True)
    assert [ema.decay_at(n) for n in range(4)] == [0.0, 2 / 11, 3 / 12, 4 / 13]
    assert ema.decay_at(1000) == 0.9
    # Step by step against diffusers' own EMAModel (its default warm-up schedule) on the same weights.
    a, b = torch.nn.Parameter(torch.tensor(1.0)), torch.nn.Parameter(torch.tensor(-2.0))
    ours, theirs = EMA([("a", a), ("b", b)], 0.9), EMAModel([a, b], decay=0.9)
    for k in range(12):
        with torch.no_grad():
            a.add_(0.3 * (k % 3) - 0.2), b.mul_(0.9)
        ours.update()
        theirs.step([a, b])
        torch.testing.assert_close(torch.stack(ours.shadow), torch.stack(theirs.shadow_params), rtol=1e-6, atol=0)


def test_swapped_shows_the_average_then_restores_the_raw_weights():
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16))
    ema = EMA([("w", w)], 0.5, warmup=False, device="cpu")
    with torch.no_grad():
        w.add_(1.0)
    raw = w.detach().clone()
    ema.update()
    with ema.swapped():
        assert torch.equal(w.detach(), ema.shadow[0].to(torch.bfloat16))
    assert_bits_equal(w.detach(), raw)
    ema.copy_to()  # export: the fp32 average, not rounded to bf16
    assert w.dtype == torch.float32 and torch.equal(w.detach(), ema.shadow[0])


EXACT = {"center_crop": False, "random_flip": True, "lr_scheduler": "cosine", "max_steps": 5, "ema": True,
         "ema_decay": 0.7}


def test_resumed_ema_run_equals_uninterrupted(make_cfg, tmp_path, monkeypatch):
    straight = run_training(make_cfg(output_dir=str(tmp_path / "straight"), **EXACT))
    assert straight["weights"] == "ema" and straight["ema_updates"] == 5

    original = Trainer.after_step

    def stop_at_3(self, logs):
        original(self, logs)
        if self.state.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(Trainer, "after_step", stop_at_3)
    with pytest.raises(signals.Interrupted) as stop:
        run_training(make_cfg(output_dir=str(tmp_path / "stopped"), **EXACT))
    monkeypatch.undo()
    saved = load_file(stop.value.path / EMA_FILE)
    assert saved and all(k.startswith("unet.") for k in saved)
    assert json.loads((stop.value.path / "state.json").read_text())["ema"]["updates"] == 3
    run_training(make_cfg(output_dir=str(tmp_path / "stopped"), resume="latest", **EXACT))
    assert_bits_equal(final_unet(tmp_path / "straight"), final_unet(tmp_path / "stopped"))


def test_export_is_the_average_and_validation_shows_both(make_cfg, tmp_path):
    cfg = make_cfg(max_steps=2, ema=True, ema_decay=0.5, ema_warmup=False,
                   validation={"enabled": True, "steps": [2], "prompts": ["a photo of sks dog"],
                               "num_inference_steps": 1})
    trainer = Trainer(cfg).setup()
    raw_before = {n: p.detach().clone() for n, p in trainer.checkpoints.named}
    summary = trainer.train()  # validates at step 2, swapping the average in and out
    raw = {n: p.detach().clone() for n, p in trainer.checkpoints.named}
    assert any(not torch.equal(raw[n], raw_before[n]) for n in raw)
    index = json.loads((Path(cfg.output_dir) / "validation" / "index.json").read_text())
    assert index["prompts"] == ["[raw] a photo of sks dog", "[ema] a photo of sks dog"]
    assert index["weights"] == ["raw", "ema"] and len(index["done"]["2"]["images"]) == 2
    average = dict(zip(trainer.ema.names, trainer.ema.shadow))
    assert any(not torch.equal(average[n], raw[n]) for n in raw)  # decay 0.5: the average lags the weights
    trainer.save(summary)
    exported = final_unet(cfg.output_dir)
    assert_bits_equal({n: exported[n.removeprefix("unet.")] for n in average}, average)


def test_ema_reads_the_exact_master_weights_of_the_kahan_bf16_profile(make_cfg, tmp_path):
    # decay 0 without warm-up: the average is the last step's weights, so the export equals a run without EMA bit
    # for bit only if it read the fp32 master values (Kahan compensation included), not the rounded bf16 ones.
    extra = dict(memory_profile="8gb", max_steps=2, learning_rate=1e-3)  # 8gb: Kahan-compensated bf16
    run_training(make_cfg(output_dir=str(tmp_path / "plain"), **extra))
    run_training(make_cfg(output_dir=str(tmp_path / "ema"), ema=True, ema_decay=0.0, ema_warmup=False, **extra))
    assert_bits_equal(final_unet(tmp_path / "plain"), final_unet(tmp_path / "ema"))


def test_low_memory_profiles_keep_the_average_in_host_memory(make_cfg):
    def plan(gib, **kw):
        return resolve(make_cfg(ema=True, **kw), Machine(cuda=True, gpu_gib=gib), epoch_items=4)
    assert plan(7.8).ema_on_cpu and plan(5.8).ema_on_cpu  # 8gb, 6gb
    assert not plan(40).ema_on_cpu and plan(40, ema_on_cpu=True).ema_on_cpu
    assert not plan(7.8, finetune="lora").ema_on_cpu  # adapters are a few MB, in fp32 either way
    assert "ema_on_cpu" in plan(7.8).resolved()
    assert not resolve(make_cfg(), Machine(cuda=True, gpu_gib=7.8), epoch_items=4).ema_on_cpu  # ema off


def test_adapter_file_holds_the_average(make_cfg):
    from dreambooth.models.lora import LORA_FILE
    cfg = make_cfg(finetune="lora", max_steps=2, ema=True, ema_decay=0.5, ema_warmup=False)
    trainer = Trainer(cfg).setup()
    trainer.save(trainer.train())
    saved = load_file(Path(cfg.output_dir) / LORA_FILE)
    average = dict(zip(trainer.ema.names, trainer.ema.shadow))
    assert len(saved) == len(average)
    for name, value in average.items():  # unet.<path>.lora_A.default.weight -> unet.<path>.lora_A.weight
        assert torch.equal(saved[name.replace(".default.", ".")], value)
