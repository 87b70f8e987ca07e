"""DoRA, LoHa and LoKr through peft: each trains only its adapter weights, saves, reloads to the trained model,
generates and merges; kohya export is refused for them in one line."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dreambooth.cli import main
from dreambooth.errors import UserError
from dreambooth.models.adapters import ADAPTER_FILE, CONFIG_FILE, adapter_file_kind, is_adapter_param
from dreambooth.models.builtin import build_tiny_pipeline
from dreambooth.models.lora import LORA_FILE, apply_lora
from dreambooth.training.trainer import Trainer

MARKERS = {"dora": ("lora_A", "lora_B", "lora_magnitude_vector"), "loha": ("hada_w1_a", "hada_w2_b"),
           "lokr": ("lokr_w1", "lokr_w2")}


def image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.eval(), pipe.text_encoder.eval()
    return pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def params(*modules) -> dict:
    return {f"{i}.{n}": p.detach().clone() for i, m in enumerate(modules) for n, p in m.named_parameters()}


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_adapter_trains_saves_reloads_and_generates(kind, make_cfg, tmp_path):
    cfg = make_cfg(finetune=kind, max_steps=3, learning_rate=1e-2, **{"lora.text_encoder": True})
    trainer = Trainer(cfg).setup()
    c = trainer.components
    trained = {n for m in (c.unet, c.text_encoder) for n, p in m.named_parameters() if p.requires_grad}
    assert trained and all(is_adapter_param(n) for n in trained)
    assert all(any(marker in n for n in trained) for marker in MARKERS[kind])  # the type's own layers
    assert trainer.step.optimizer.param_groups[0]["lr"] == 1e-2
    before = params(c.unet, c.text_encoder)
    trainer.save(trainer.train())
    after = params(c.unet, c.text_encoder)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_adapter_param(k) for k in changed)
    assert any(k.startswith("1.") for k in changed)  # the text encoder's adapters learnt too

    out = Path(cfg.output_dir)
    assert (out / ADAPTER_FILE).is_file() and (out / CONFIG_FILE).is_file() and not (out / LORA_FILE).exists()
    assert adapter_file_kind(out / ADAPTER_FILE) == kind
    with safe_open(str(out / ADAPTER_FILE), "pt") as f:
        assert f.metadata()["dreambooth.base_model"] == "builtin:tiny"
    want = image(trainer.pipeline())
    fresh = build_tiny_pipeline()
    base = image(fresh)
    apply_lora(fresh, out)  # the run folder, as `generate --lora` takes it
    assert np.abs(want - base).max() > 1e-4 and np.abs(image(fresh) - want).max() <= 1e-6
    assert main(["generate", str(out), "--prompt", "a photo of sks dog", "--width", "32", "--height", "32",
                 "--num-inference-steps", "1", "--seed", "0", "--out-dir", str(tmp_path / "png"), "--quiet"]) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 1


def test_adapter_merges_into_a_single_file_and_refuses_kohya(make_cfg, tmp_path, capsys):
    cfg = make_cfg(finetune="loha", max_steps=2, learning_rate=1e-2)
    trainer = Trainer(cfg).setup()
    trainer.save(trainer.train())
    want = image(trainer.pipeline())
    out = Path(cfg.output_dir)
    single = tmp_path / "merged.safetensors"
    assert main(["export", str(out), "--format", "single-file", "--out", str(single)]) == 0
    assert main(["generate", str(single), "--prompt", "a photo of sks dog", "--width", "32", "--height", "32",
                 "--num-inference-steps", "1", "--seed", "0", "--out-dir", str(tmp_path / "png"), "--quiet"]) == 0
    from dreambooth.models.single_file import load_single_file
    assert np.abs(image(load_single_file(single)) - want).max() <= 1e-5  # merged: plain layers, same model
    assert main(["export", str(out), "--format", "kohya"]) == 2
    assert "loha adapter: the kohya layout is written for LoRA only" in capsys.readouterr().err
    for kind in ("dora", "loha", "lokr"):
        with pytest.raises(UserError, match=f"kohya is written for finetune: lora only .*{kind}"):
            make_cfg(finetune=kind, export_formats=["lora", "kohya"])
