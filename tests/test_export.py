"""Single-file export in the original SD 2.x layout: exact round trip, YAML, metadata, half precision, CLI, and
training from a single file."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth.cli import main
from dreambooth.data.dataset import resolve_prompts
from dreambooth.errors import UserError
from dreambooth.export.formats import save_single_file
from dreambooth.models.single_file import load_single_file, text_encoder_to_original, unet_to_original, vae_to_original
from dreambooth.models.builtin import build_sd21_components, build_tiny_pipeline
from dreambooth.training.trainer import Trainer, run_training

PARTS = ("unet", "vae", "text_encoder")


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def plain(config) -> dict:
    return {k: v for k, v in json.loads(json.dumps(dict(config), default=list)).items() if not k.startswith("_")}


def test_single_file_round_trip_is_exact(tmp_path, tiny_model_dir):
    pipe = build_tiny_pipeline(seed=0)
    path = save_single_file(pipe, tmp_path / "tiny.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."))
               for k in keys)
    # Our loader (architecture from the header) and diffusers' own call with the model's config folder.
    ours = load_single_file(path)
    theirs = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_model_dir), local_files_only=True,
                                                      tokenizer=pipe.tokenizer, safety_checker=None,
                                                      feature_extractor=None)
    for loaded in (ours, theirs):
        for part in PARTS:
            assert max_diff(getattr(pipe, part), getattr(loaded, part)) == 0.0, part
    assert dict(ours.scheduler.config) == dict(pipe.scheduler.config)
    assert plain(ours.unet.config) == plain(pipe.unet.config)


def test_yaml_beside_the_file_describes_the_model(tmp_path, tiny_model_dir):
    pipe = build_tiny_pipeline(seed=0)
    path = save_single_file(pipe, tmp_path / "tiny.safetensors")
    params = yaml.safe_load(path.with_suffix(".yaml").read_text())["model"]["params"]
    assert params["cond_stage_config"]["params"]["layer"] == "penultimate" and "parameterization" not in params
    # diffusers builds UNet and VAE from the YAML alone; only norm groups, fixed at 32 in the original code,
    # cannot be written there (the tiny model uses 8), so only the weights and the layout are compared.
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_model_dir),
                                                      original_config=str(path.with_suffix(".yaml")),
                                                      local_files_only=True, tokenizer=pipe.tokenizer,
                                                      safety_checker=None, feature_extractor=None)
    for part, keys in (("unet", ("block_out_channels", "layers_per_block", "attention_head_dim", "down_block_types",
                                 "up_block_types", "cross_attention_dim", "use_linear_projection")),
                       ("vae", ("block_out_channels", "layers_per_block", "latent_channels", "scaling_factor"))):
        want, got = getattr(pipe, part).config, getattr(loaded, part).config
        assert all(list(want[k]) == list(got[k]) if isinstance(want[k], (list, tuple)) else want[k] == got[k]
                   for k in keys), part
        assert max_diff(getattr(pipe, part), getattr(loaded, part)) == 0.0


def test_full_size_sd21_layout_matches_diffusers_reader():
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint, infer_diffusers_model_type)
    m = build_sd21_components(device="meta")  # shapes only: the real SD 2.1 base architecture
    unet = unet_to_original(m["unet"].state_dict(), m["unet"].config)
    vae = vae_to_original(m["vae"].state_dict(), m["vae"].config)
    text = text_encoder_to_original(m["text_encoder"].state_dict())
    assert infer_diffusers_model_type({**unet, **vae, **text}) == "v2"
    assert len(unet) == 686 and unet["model.diffusion_model.output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert vae["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert text["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"].shape == (3072, 1024)
    for part, back in (("unet", convert_ldm_unet_checkpoint(unet, m["unet"].config)),
                       ("vae", convert_ldm_vae_checkpoint(vae, m["vae"].config)),
                       ("text_encoder", {k.removeprefix("text_model."): v for k, v in
                                         convert_open_clip_checkpoint(m["text_encoder"], text).items()})):
        want = m[part].state_dict()
        assert back.keys() == want.keys() and all(back[k].shape == want[k].shape for k in want), part


def test_training_exports_and_cli_half(make_cfg, tmp_path):
    cfg = make_cfg(max_steps=2, export_formats=["diffusers", "single-file"])
    run_training(cfg)
    out = Path(cfg.output_dir)
    assert (out / "model_index.json").is_file() and (out / "model.yaml").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["dreambooth.base_model"] == "builtin:tiny" and meta["dreambooth.steps"] == "2"
    assert meta["dreambooth.instance_prompt"] == resolve_prompts(cfg.data.dir)[0]
    assert json.loads(meta["dreambooth.training"])["learning_rate"] == 1e-3
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512"
    trained = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert max_diff(trained.unet, load_single_file(out / "model.safetensors").unet) == 0.0

    half = tmp_path / "half.safetensors"
    assert main(["export", str(out), "--format", "single-file", "--out", str(half), "--half"]) == 0
    assert {v.dtype for v in load_file(half).values()} == {torch.float16}
    with safe_open(str(half), "pt") as f:  # read back from config.yaml (which keeps auto): the values trained with
        later = json.loads(f.metadata()["dreambooth.training"])
    assert later == json.loads(meta["dreambooth.training"]) and later["prior_mode"] == "concat"
    assert (later["optimizer"], later["mixed_precision"]) == ("adamw", "no")  # what ran on this CPU, not auto
    assert max_diff(trained.unet, load_single_file(half).unet) < 1e-3
    with safe_open(str(half), "pt") as f:
        assert f.metadata()["dreambooth.steps"] == "2"
    unet_file = out / "unet" / "diffusion_pytorch_model.safetensors"
    assert main(["export", str(out), "--format", "single-file", "--out", str(unet_file)]) == 2  # never its input
    assert max_diff(trained.unet, StableDiffusionPipeline.from_pretrained(out, safety_checker=None).unet) == 0.0


def test_lora_run_exports_merged_single_file_and_kohya(make_cfg):
    cfg = make_cfg(max_steps=2, finetune="lora", export_formats=["lora", "kohya", "single-file"])
    trainer = Trainer(cfg).setup()
    trainer.save(trainer.train())
    out = Path(cfg.output_dir)
    assert {p.name for p in out.glob("*.safetensors")} == {"pytorch_lora_weights.safetensors",
                                                          "lora-kohya.safetensors", "model.safetensors"}
    assert not (out / "model_index.json").exists()
    merged, trained = load_single_file(out / "model.safetensors"), trainer.pipeline()
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = merged.unet(x, 10, ctx).sample
        b = trained.unet.eval()(x, 10, ctx).sample
    assert (a - b).abs().max().item() < 1e-5  # the LoRA folded into the weights


def test_single_file_input_trains(make_cfg, tmp_path):
    source = save_single_file(build_tiny_pipeline(seed=0), tmp_path / "base.safetensors")
    cfg = make_cfg(model=str(source), max_steps=2)
    run_training(cfg)
    out = StableDiffusionPipeline.from_pretrained(cfg.output_dir, safety_checker=None)
    base = load_single_file(source)
    assert max_diff(out.vae, base.vae) == 0.0 and max_diff(out.unet, base.unet) > 0.0


def test_single_file_mistakes_are_one_line_errors(tmp_path, capsys):
    sd1 = tmp_path / "sd15.safetensors"
    save_file({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(2, 2),
               "model.diffusion_model.out.0.weight": torch.zeros(2)}, sd1)
    with pytest.raises(UserError, match="SD 1.x"):
        load_single_file(sd1)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="is damaged"):
        load_single_file(junk)
    with pytest.raises(UserError, match="pickle"):
        (tmp_path / "model.ckpt").write_bytes(b"x")
        load_single_file(tmp_path / "model.ckpt")
    assert main(["export", str(tmp_path / "nothing"), "--format", "single-file"]) == 2
    assert main(["export", str(tmp_path), "--format", "kohya"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 2 and "Traceback" not in err
    with pytest.raises(UserError, match=".safetensors"):
        save_single_file(build_tiny_pipeline(), tmp_path / "model.ckpt")


def test_a_failed_write_leaves_neither_the_file_nor_a_partial_one(tmp_path, monkeypatch):
    """export's single files and LoRA files go through files.save_safetensors_atomic: a write that fails part-way
    (disk full) leaves the folder as it was, an earlier export included."""
    import safetensors.torch

    from dreambooth.files import save_safetensors_atomic

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_safetensors_atomic({"w": torch.zeros(2)}, tmp_path / "model.safetensors", {})
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "model.safetensors").write_bytes(b"the earlier export")
    with pytest.raises(OSError, match="No space"):
        save_single_file(build_tiny_pipeline(), tmp_path / "model.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == b"the earlier export"
