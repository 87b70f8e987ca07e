"""The shipped tokenizer, the tiny random SD 2.1 pipeline, and full-size SD 2.1 shapes, all offline on CPU."""

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/transformers import huggingface_hub

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from conftest import assert_bits_equal  # noqa: E402
from dreambooth.models.builtin import (  # noqa: E402
    TINY_RESOLUTION,
    asset_path,
    build_sd21_components,
    build_tiny_pipeline,
    save_tiny_pipeline,
)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_tokenizer_pads_to_77_ids():
    tokenizer = CLIPTokenizer.from_pretrained(asset_path("tokenizer"))
    assert tokenizer.model_max_length == 77
    ids = tokenizer(
        "A photo of sks dog", padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert ids.shape == (1, 77)
    assert ids[0, 0] == tokenizer.bos_token_id
    assert (ids[0, 6:] == tokenizer.eos_token_id).all()  # 5 words (merged to whole tokens), then end/pad
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "a photo of sks dog"  # lower-cased
    long = tokenizer("word " * 100, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[-1] == tokenizer.eos_token_id


def test_tokenizer_files_are_reproducible(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_tokenizer.py"
    spec = importlib.util.spec_from_file_location("make_tiny_tokenizer", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write(tmp_path)
    shipped = asset_path("tokenizer")
    for path in tmp_path.iterdir():
        assert path.read_bytes() == (shipped / path.name).read_bytes(), path.name


def test_saved_tiny_pipeline_loads_and_generates(tmp_path):
    save_tiny_pipeline(tmp_path)
    files = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    assert sum(f.endswith(".safetensors") for f in files) == 3  # unet, vae, text_encoder

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 2 and pipe.safety_checker is None
    image = pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        output_type="pil",
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (TINY_RESOLUTION, TINY_RESOLUTION)
    # Defaults come from the UNet's sample_size: no height/width needed.
    assert pipe("x", num_inference_steps=1, output_type="np").images.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)


def test_tiny_pipeline_is_deterministic_per_seed():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_pipeline(seed=0).unet.state_dict()
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is left alone
    b = build_tiny_pipeline(seed=0).unet.state_dict()
    c = build_tiny_pipeline(seed=1).unet.state_dict()
    assert_bits_equal(a, b)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_sd21_components_full_size_parameter_counts():
    models = build_sd21_components(scale=1.0, device="meta")
    assert abs(n_params(models["unet"]) / 1e6 - 865.9) < 0.1
    assert abs(n_params(models["text_encoder"]) / 1e6 - 340.4) < 0.1
    assert abs(n_params(models["vae"]) / 1e6 - 83.7) < 0.1
    assert models["unet"].config.attention_head_dim == [5, 10, 20, 20]


def test_sd21_components_scaled_down_run_forward():
    models = build_sd21_components(scale=0.1, parts=("unet", "text_encoder"))
    unet, text_encoder = models["unet"], models["text_encoder"]
    assert n_params(unet) < 20e6
    hidden = text_encoder(torch.randint(0, 49408, (1, 77))).last_hidden_state
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), hidden).sample
    assert out.shape == (1, 4, 8, 8)


def test_sd21_components_rejects_bad_scale():
    with pytest.raises(ValueError):
        build_sd21_components(scale=2.0, device="meta")
