"""LoRA: only adapter weights train, the saved file reproduces the trained model, kohya layout round trip, resume."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_bits_equal, cuda, max_diff

from dreambooth.cli import main
from dreambooth.config import config_from_dict
from dreambooth.errors import UserError
from dreambooth.config.plan import learning_rate
from dreambooth.export.kohya import peft_to_kohya, save_kohya
from dreambooth.models.lora import LORA_FILE, add_lora_layers, apply_lora, read_lora, save_lora
from dreambooth.models.builtin import build_sd21_components, build_tiny_pipeline
from dreambooth.training.trainer import Trainer, run_training

LORA = {"finetune": "lora", "lora.text_encoder": True}


# The inverse of kohya.peft_to_kohya, as a test oracle: the package only writes kohya files (diffusers reads them).
# Multi-word names in diffusers' UNet and CLIP module paths; kohya joins every path part with "_", so going back
# needs to know which underscores belong to a name.
_WORDS = sorted(["down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
                 "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "self_attn",
                 "q_proj", "k_proj", "v_proj", "out_proj", "text_model", "layer_norm1", "layer_norm2",
                 "time_embedding", "linear_1", "linear_2", "add_k_proj", "add_v_proj"],
                key=lambda w: -w.count("_"))


def _kohya_to_path(name: str) -> str:
    parts, i, out = name.split("_"), 0, []
    while i < len(parts):
        for w in _WORDS + [parts[i]]:
            n = w.count("_") + 1
            if "_".join(parts[i:i + n]) == w:
                out.append(w)
                i += n
                break
    return ".".join(out)


def kohya_to_peft(state: dict) -> tuple[dict, dict[str, float]]:
    """The inverse of `peft_to_kohya`: diffusers LoRA keys and the alpha of each part."""
    out, alphas = {}, {}
    for key, value in state.items():
        m = re.fullmatch(r"lora_(unet|te)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
        if not m:
            raise ValueError(f"'{key}' is not a kohya LoRA weight name")
        kind, name, what = m.groups()
        part = "unet" if kind == "unet" else "text_encoder"
        path = _kohya_to_path(name)
        if part == "text_encoder":
            path = path.removeprefix("text_model.")  # transformers 5 CLIPTextModel has no text_model level
        if what == "alpha":
            alphas[part] = float(value)
        else:
            out[f"{part}.{path}.lora_{'A' if what == 'lora_down.weight' else 'B'}.weight"] = value
    return out, alphas



def image(pipe, seed: int = 0) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.eval(), pipe.text_encoder.eval()
    return pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def snapshot(*modules) -> dict:
    return {f"{i}.{n}": p.detach().clone() for i, m in enumerate(modules) for n, p in m.named_parameters()}


def random_lora_pipeline(alpha: float = 8.0):
    """A tiny pipeline with LoRA layers whose B matrices are random (a fresh LoRA is the identity)."""
    cfg = config_from_dict({"model": "builtin:tiny", "data": {"dir": "x"}, "finetune": "lora",
                            "lora": {"text_encoder": True, "alpha": alpha}})
    pipe = build_tiny_pipeline()
    add_lora_layers(pipe, cfg, "cpu", torch.float32, text_encoder=True)
    with torch.no_grad():
        for name, p in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return pipe, cfg


def test_lora_training_changes_only_lora_weights(make_cfg):
    cfg = make_cfg(gradient_checkpointing=True, **LORA)  # checkpointed blocks must still pass LoRA gradients
    trainer = Trainer(cfg).setup()
    c = trainer.components
    assert trainer.step.params and all(".lora_" in n for m in (c.unet, c.text_encoder)
                                  for n, p in m.named_parameters() if p.requires_grad)
    before = snapshot(c.unet, c.text_encoder)
    trainer.train()
    after = snapshot(c.unet, c.text_encoder)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert {k for k in before if ".lora_B." in k} <= changed  # every adapter, UNet and text encoder, learned
    assert any(k.startswith("1.") for k in changed)


def test_lora_learning_rate_default_only_when_unset():
    base = {"model": "builtin:tiny", "data": {"dir": "x"}}
    assert learning_rate(config_from_dict({**base, "finetune": "lora"})) == 1e-4
    assert learning_rate(config_from_dict({**base, "finetune": "lora", "learning_rate": 3e-5})) == 3e-5
    assert learning_rate(config_from_dict(base)) == 2e-6  # JumpStart's for full fine-tuning


def test_lora_file_reproduces_trained_pipeline(make_cfg, tmp_path):
    cfg = make_cfg(**LORA)
    trainer = Trainer(cfg).setup()
    trainer.save(trainer.train())
    out = Path(cfg.output_dir)
    lora_file = out / LORA_FILE
    assert lora_file.is_file() and not (out / "model_index.json").exists()  # default: no merged full copy
    trained = image(trainer.pipeline())

    fresh = build_tiny_pipeline()
    base = image(fresh)
    apply_lora(fresh, lora_file)
    assert np.abs(trained - base).max() > 1e-4  # the LoRA does change the images
    assert np.abs(image(fresh) - trained).max() <= 1e-6

    with safe_open(str(lora_file), "pt") as f:
        header = f.metadata()
    assert header["dreambooth.base_model"] == "builtin:tiny" and header["dreambooth.steps"] == "4"
    assert header["dreambooth.instance_prompt"]
    # The CLI takes the run folder itself: its base model plus its LoRA.
    assert main(["generate", str(out), "--prompt", "a photo of sks dog", "--width", "32", "--height", "32",
                 "--num-inference-steps", "2", "--seed", "0", "--out-dir", str(tmp_path / "png"), "--quiet"]) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 1
    assert main(["export", str(out), "--format", "single-file", "--out", str(lora_file)]) == 2
    assert main(["export", str(out), "--format", "kohya", "--out", str(lora_file)]) == 2
    assert load_file(lora_file).keys() == read_lora(lora_file)[0].keys()  # still the LoRA


def test_kohya_layout_round_trip(tmp_path):
    pipe, cfg = random_lora_pipeline(alpha=8.0)
    ours = save_lora(tmp_path / LORA_FILE, pipe.unet, pipe.text_encoder, cfg)
    kohya = load_file(save_kohya(ours, tmp_path / "kohya.safetensors"))
    linears = {**{f"lora_unet_{n.replace('.', '_')}": m for n, m in pipe.unet.named_modules()
                  if hasattr(m, "base_layer")},
               **{f"lora_te_text_model_{n.replace('.', '_')}": m for n, m in pipe.text_encoder.named_modules()
                  if hasattr(m, "base_layer")}}
    names = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in kohya}
    assert names == set(linears)
    for name, module in linears.items():
        out_f, in_f = module.base_layer.weight.shape
        assert kohya[f"{name}.lora_down.weight"].shape == (4, in_f)
        assert kohya[f"{name}.lora_up.weight"].shape == (out_f, 4)
        assert kohya[f"{name}.alpha"].item() == 8.0
    assert all(re.fullmatch(r"lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in kohya)

    tensors, _, alphas = read_lora(ours)
    back, back_alphas = kohya_to_peft(kohya)
    assert_bits_equal(back, tensors)
    assert back_alphas == alphas == {"unet": 8.0, "text_encoder": 8.0}
    assert peft_to_kohya(back, back_alphas).keys() == kohya.keys()

    # diffusers' own kohya reader (the A1111 convention) gives the same model as our diffusers-layout file.
    want = image(pipe)
    via_kohya = build_tiny_pipeline()
    apply_lora(via_kohya, tmp_path / "kohya.safetensors")
    assert np.abs(image(via_kohya) - want).max() <= 1e-6
    off = build_tiny_pipeline()
    apply_lora(off, ours, scale=0.0)  # --lora-scale 0: the base model's images
    assert np.abs(image(off) - image(build_tiny_pipeline())).max() == 0.0


def test_kohya_names_cover_full_size_sd21():
    models = build_sd21_components(device="meta", parts=("unet", "text_encoder"))
    for model in models.values():
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        assert names and all(_kohya_to_path(n.replace(".", "_")) == n for n in names)


def test_lora_run_resumes_exactly(make_cfg, tmp_path, monkeypatch):
    from dreambooth.training import signals
    exact = {**LORA, "max_steps": 5, "random_flip": True, "lr_scheduler": "cosine"}
    run_training(make_cfg(output_dir=str(tmp_path / "straight"), **exact))

    stopped = make_cfg(output_dir=str(tmp_path / "stopped"), checkpoint_steps=2, **exact)
    monkeypatch.setattr(Trainer, "_stop_requested", lambda self, stop: self.state.step == 3)
    with pytest.raises(signals.Interrupted):
        run_training(stopped)
    monkeypatch.undo()
    run_training(make_cfg(output_dir=str(tmp_path / "stopped"), checkpoint_steps=2, resume="latest", **exact))
    a, b = (load_file(tmp_path / d / LORA_FILE) for d in ("straight", "stopped"))
    assert max_diff(a, b) <= 1e-6


def test_lora_mistakes_are_one_line_errors(make_cfg, tmp_path):
    with pytest.raises(UserError, match="lora.target_modules"):
        Trainer(make_cfg(finetune="lora", **{"lora.target_modules": ["no_such_layer"]})).setup()
    with pytest.raises(UserError, match="finetune: lora"):
        make_cfg(export_formats=["diffusers", "kohya"])
    pipe = build_tiny_pipeline()
    with pytest.raises(UserError, match="does not exist"):
        apply_lora(pipe, tmp_path / "missing.safetensors")
    (tmp_path / "lora.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="not .safetensors"):
        apply_lora(pipe, tmp_path / "lora.bin")
    save_file({"unet.nothing.here.lora_A.weight": torch.zeros(4, 8)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError):
        apply_lora(pipe, tmp_path / "other.safetensors")


def test_lora_run_folder_without_its_base_model_is_one_error_per_command(tmp_path):
    from dreambooth.export.formats import export_model
    from dreambooth.models.lora import split_lora_run
    run = tmp_path / "run"
    run.mkdir()
    save_file({"x": torch.zeros(1)}, str(run / LORA_FILE))  # a readable file: only its base model is missing
    with pytest.raises(UserError, match="no config.yaml naming its base model: dreambooth generate BASE_MODEL"):
        split_lora_run(str(run), None)
    with pytest.raises(UserError, match="no config.yaml naming its base model: export from the run's output"):
        export_model(run, "single-file")
    assert split_lora_run(str(run), "other.safetensors") == (str(run), "other.safetensors", {})  # --lora wins
    (run / "config.yaml").write_text("revision: abc\n")
    with pytest.raises(UserError, match="naming its base model"):
        split_lora_run(str(run), None)
    (run / "config.yaml").write_text("model: someone/sd\nrevision: abc\n")
    assert split_lora_run(str(run), None) == ("someone/sd", str(run / LORA_FILE), {"revision": "abc"})
    (run / "model_index.json").write_text("{}")  # a merged full pipeline: loaded as it is
    assert split_lora_run(str(run), None) == (str(run), None, {})


@pytest.mark.gpu
@cuda
def test_lora_fp16_on_cuda_keeps_base_half_and_adapters_fp32(make_cfg):
    cfg = make_cfg(mixed_precision="fp16", optimizer="adamw", **LORA)
    trainer = Trainer(cfg).setup()
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    assert {p.dtype for p in trainer.step.params} == {torch.float32}
    assert unet.conv_in.weight.dtype == torch.float16  # the frozen base stays in compute precision
    before = snapshot(unet)
    trainer.save(trainer.train())
    changed = {k for k, v in snapshot(unet).items() if not torch.equal(before[k].cpu(), v.cpu())}
    assert changed and all(".lora_" in k for k in changed)
    assert (Path(cfg.output_dir) / LORA_FILE).stat().st_size < 1_000_000


def test_rank4_lora_of_full_size_sd21_is_a_few_mb():
    from peft import inject_adapter_in_model

    from dreambooth.models.lora import lora_config
    unet = build_sd21_components(device="meta", parts=("unet",))["unet"]
    inject_adapter_in_model(lora_config(4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"]), unet)
    n = sum(p.numel() for name, p in unet.named_parameters() if ".lora_" in name)
    assert n == 829_952  # 3.3 MB in fp32, the dtype the LoRA file is written in


def test_lora_without_peft_is_one_clear_error(make_cfg, monkeypatch):
    import importlib.util

    from dreambooth.errors import UserError
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(UserError, match="pip install peft"):
        Trainer(make_cfg(finetune="lora"))


def test_resolved_lora_rate_is_what_config_yaml_records(make_cfg, tmp_path):
    import yaml

    from dreambooth.config import config_from_dict, config_to_dict, load_config
    data = config_to_dict(make_cfg(finetune="lora", max_steps=1))
    del data["learning_rate"]  # left unset: LoRA's default applies
    trainer = Trainer(config_from_dict(data)).setup()
    assert trainer.step.optimizer.param_groups[0]["lr"] == 1e-4
    saved = Path(data["output_dir"]) / "config.yaml"
    assert yaml.safe_load(saved.read_text())["learning_rate"] == 1e-4
    assert load_config(saved).learning_rate == 1e-4  # rerunning the saved config trains at the same rate
