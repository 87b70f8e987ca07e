"""Exports for the usual UIs: one-file checkpoints in the original SD 2.x key layout (with the v2 inference YAML
beside them), kohya-layout LoRA files (kohya.py), and the training metadata both carry in their safetensors header.

The key maps from diffusers to the original layout are in models/single_file.py."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import yaml

from dreambooth import __version__
from dreambooth.config.parse import config_to_dict
from dreambooth.config.plan import RunPlan
from dreambooth.config.schema import NON_TRAINING_KEYS, is_adapter, load_config, subjects_of
from dreambooth.data.subjects import prompts_as_trained
from dreambooth.errors import UserError
from dreambooth.export.kohya import KOHYA_FILE, save_kohya
from dreambooth.files import save_safetensors_atomic, write_text_atomic
from dreambooth.models.load import base_pipeline
from dreambooth.models.adapters import ADAPTER_FILE, adapter_file_kind
from dreambooth.models.lora import (LORA_FILE, adapter_file_name, lora_run_config, merged_pipeline, resolve_lora_file,
                                   save_lora)
from dreambooth.models.pipeline import load_pipeline
from dreambooth.models.single_file import CONFIGS_KEY, load_single_file, pipeline_to_original

SINGLE_FILE = "model.safetensors"


# ------------------------------------------------------------------------------------- YAML and metadata
def inference_yaml(pipe) -> dict:
    """The ldm `v2-inference` config that describes this pipeline (what A1111 reads beside a checkpoint)."""
    u, v, s = pipe.unet.config, pipe.vae.config, pipe.scheduler.config
    heads = list(u["attention_head_dim"]) if isinstance(u["attention_head_dim"], (list, tuple)) \
        else [u["attention_head_dim"]] * len(u["block_out_channels"])
    base = u["block_out_channels"][0]
    unet_params = {
        "use_checkpoint": True, "use_fp16": True, "image_size": 32, "in_channels": u["in_channels"],
        "out_channels": u["out_channels"], "model_channels": base,
        "attention_resolutions": [2 ** i for i, t in enumerate(u["down_block_types"]) if "CrossAttn" in t][::-1],
        "num_res_blocks": u["layers_per_block"], "channel_mult": [c // base for c in u["block_out_channels"]],
        # diffusers' SD 2 config lists heads per block (its "attention_head_dim"); ldm wants channels per head.
        "num_head_channels": base // heads[0], "use_linear_in_transformer": bool(u["use_linear_projection"]),
        "transformer_depth": u["transformer_layers_per_block"], "context_dim": u["cross_attention_dim"],
        "legacy": False}
    vae_params = {"embed_dim": v["latent_channels"], "monitor": "val/rec_loss", "lossconfig": {"target": "torch.nn.Identity"},
                  "ddconfig": {"double_z": True, "z_channels": v["latent_channels"], "resolution": v["sample_size"],
                               "in_channels": v["in_channels"], "out_ch": v["out_channels"], "ch": v["block_out_channels"][0],
                               "ch_mult": [c // v["block_out_channels"][0] for c in v["block_out_channels"]],
                               "num_res_blocks": v["layers_per_block"], "attn_resolutions": [], "dropout": 0.0}}
    params = {"linear_start": s["beta_start"], "linear_end": s["beta_end"], "num_timesteps_cond": 1,
              "log_every_t": 200, "timesteps": s["num_train_timesteps"], "first_stage_key": "jpg",
              "cond_stage_key": "txt", "image_size": u["sample_size"], "channels": u["in_channels"],
              "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
              "scale_factor": v["scaling_factor"], "use_ema": False,
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
              "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": vae_params},
              "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                    "params": {"freeze": True, "layer": "penultimate"}}}
    if s.get("prediction_type") == "v_prediction":
        params = {"parameterization": "v", **params}
    return {"model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params}}


def _architecture(pipe) -> str:
    v = pipe.scheduler.config.get("prediction_type") == "v_prediction"
    return "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"


def training_metadata(run_dir: str | Path | None, cfg=None, summary: dict | None = None,
                      prompts: list[str] | None = None) -> dict[str, str]:
    """Header entries (all strings) naming the base model, prompts, steps and training settings of a run (`prompts`:
    the run's instance prompts, else read from its subjects' folders)."""
    run_dir = Path(run_dir) if run_dir else None
    meta = {"dreambooth.version": __version__, "modelspec.sai_model_spec": "1.0.0",
            "modelspec.date": datetime.date.today().isoformat()}
    if run_dir is not None:
        meta["modelspec.title"] = run_dir.resolve().name
    if summary is None and run_dir is not None and (run_dir / "train_summary.json").is_file():
        summary = json.loads((run_dir / "train_summary.json").read_text())
    if cfg is None and run_dir is not None and (run_dir / "config.yaml").is_file():
        try:
            cfg = load_config(run_dir / "config.yaml")
        except UserError:
            cfg = None  # an old or hand-edited config: export the weights without its settings
    if cfg is not None:
        # config.yaml keeps auto where the machine chose; the header says what the run used.
        resolved = (summary or {}).get("resolved", {})
        if prompts is None:
            prompts = [p for s in subjects_of(cfg) if (p := prompts_as_trained(s.dir, s.instance_prompt, None)[0])]
        settings = {k: v for k, v in config_to_dict(cfg).items()
                    if k not in NON_TRAINING_KEYS | {"model", "revision", "variant", "data", "subjects"}}
        settings.update({k: v for k, v in resolved.items() if k in settings})
        meta.update({"dreambooth.base_model": cfg.model, "dreambooth.instance_prompt": " | ".join(prompts),
                     "dreambooth.training": json.dumps(settings)})
    if summary and summary.get("steps") is not None:
        meta["dreambooth.steps"] = str(summary["steps"])
    return meta


# ------------------------------------------------------------------------------------- writing files
def save_single_file(pipe, out: str | Path, half: bool = False, metadata: dict[str, str] | None = None) -> Path:
    """Write `pipe` as one original-layout .safetensors checkpoint plus the matching inference YAML beside it."""
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise UserError(f"--out {out} must end in .safetensors (the only format written)")
    configs = {name: dict(getattr(pipe, name).config) for name in ("unet", "vae", "scheduler")}
    configs["text_encoder"] = pipe.text_encoder.config.to_dict()
    meta = {**(metadata or {}), "modelspec.architecture": _architecture(pipe),
            CONFIGS_KEY: json.dumps(configs, default=list)}
    save_safetensors_atomic(pipeline_to_original(pipe), out, meta, half)
    write_text_atomic(out.with_suffix(".yaml"), yaml.safe_dump(inference_yaml(pipe), sort_keys=False))
    return out


# ------------------------------------------------------------------------------------- runs and the CLI

def export_run(out: Path, plan: RunPlan, summary: dict | None, prompts: list[str], trained_pipeline, unet,
               text_encoder):
    """Write a finished run's exports into output_dir; returns the pipeline to save in diffusers layout, or None.
    `trained_pipeline()` builds a full fine-tune's pipeline; `unet`, `text_encoder` (unwrapped) hold a LoRA's layers."""
    cfg, formats = plan.effective_config(), plan.export_formats  # the header tells the settings the run used
    meta = training_metadata(out, cfg, summary, prompts)
    adapter = out / adapter_file_name(cfg.finetune)
    if is_adapter(cfg):
        save_lora(adapter, unet, text_encoder, cfg, {**meta, "modelspec.architecture": "stable-diffusion-v2-512/lora"})
        if "kohya" in formats:  # LoRA only (config validation)
            save_kohya(adapter, out / KOHYA_FILE)
    if "diffusers" not in formats and "single-file" not in formats:
        return None
    # An adapter run's full model: a fresh fp32 base (the trained copy sat in half precision) with the file merged.
    pipe = merged_pipeline(base_pipeline(cfg), adapter) if is_adapter(cfg) else trained_pipeline()
    if "single-file" in formats:
        save_single_file(pipe, out / SINGLE_FILE, metadata=meta)
    return pipe if "diffusers" in formats else None


def _load_for_export(model: Path, allow_pickle: bool):
    """(pipeline, run config or None): a trained folder, a LoRA run folder merged into the base its config.yaml
    names (that config returned, so the header needs no second read), or a single file."""
    if model.is_dir() and (model / "model_index.json").is_file():
        return load_pipeline(str(model), device="cpu", allow_pickle=allow_pickle), None  # fp32 on the CPU
    config = lora_run_config(model, "export from the run's output folder, or merge with "
                                    "`dreambooth generate BASE --lora FILE`")
    if config is not None:
        cfg = load_config(config)
        return merged_pipeline(base_pipeline(cfg), resolve_lora_file(model)), cfg
    if model.is_file():
        return load_single_file(model, allow_pickle=allow_pickle), None
    raise UserError(f"{model} is not a trained output folder (model_index.json or {LORA_FILE}) or a checkpoint "
                    "file: pass the output_dir of a training run")


def _is_input(out: Path, source: Path) -> bool:
    """True when writing `out` would overwrite what the export reads (the file, a run's LoRA, a pipeline part)."""
    if not out.exists():
        return False
    out, source = out.resolve(), source.resolve()
    if source.is_file():
        return out == source
    return out in (source / LORA_FILE, source / ADAPTER_FILE) or (source in out.parents and out.parent != source)


def export_model(model: str | Path, fmt: str, out: str | Path | None = None, half: bool = False,
                 allow_pickle: bool = False) -> Path:
    """`dreambooth export`: write MODEL as one single-file checkpoint (+ YAML) or its LoRA in kohya layout."""
    model = Path(model).expanduser()
    if not model.exists():
        raise UserError(f"{model} does not exist: pass a training run's output folder")
    run_dir = model if model.is_dir() else None
    if fmt == "kohya":
        source = resolve_lora_file(model)
        kind = adapter_file_kind(source)
        if kind is not None:
            raise UserError(f"{source} is a {kind} adapter: the kohya layout is written for LoRA only (finetune: lora)")
        out = Path(out) if out else source.parent / KOHYA_FILE
    elif fmt == "single-file":
        source, out = model, Path(out) if out else (model if model.is_dir() else model.parent) / SINGLE_FILE
    else:
        raise UserError(f"unknown export format '{fmt}': choose single-file or kohya")
    if out.suffix.lower() != ".safetensors":
        raise UserError(f"--out {out} must end in .safetensors (the only format written)")
    if _is_input(out, source):
        raise UserError(f"--out {out} is a file being exported from: choose another name")
    if fmt == "kohya":
        return save_kohya(source, out, half)
    pipe, cfg = _load_for_export(model, allow_pickle)
    return save_single_file(pipe, out, half, training_metadata(run_dir, cfg))
