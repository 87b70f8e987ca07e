"""The original one-file SD 2.x layout both ways: a pipeline's weights in that key layout (what export.py writes),
and a one-file SD 2.x checkpoint loaded as a StableDiffusionPipeline, offline.

diffusers ships only the original -> diffusers direction (loaders/single_file_utils.py); the inverse maps here
are ours, and tests check them by loading our files back with `from_single_file` (exact equality).
On the way in, diffusers' `from_single_file` does the key conversion; we hand it a local config folder so it never
goes to the hub: the architecture our exports record in their header, else the SD 2.1 base configs in
assets/sd21-base."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from dreambooth import checksums
from dreambooth.config.machine import hub_offline
from dreambooth.errors import UserError, first_line
from dreambooth.models.base_model import DEFAULT_MODEL, former_ids
from dreambooth.models.builtin import asset_path, load_tokenizer
from dreambooth.models.load import PICKLE_SUFFIXES, refuse_pickle

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."
CONFIGS_KEY = "dreambooth.diffusers_configs"  # lets load_single_file rebuild non-standard (e.g. tiny) models
SD2_TEXT_KEY = TEXT + "token_embedding.weight"  # OpenCLIP: SD 2.x
SD1_TEXT_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"  # CLIP-L: SD 1.x
HUB_BASE = DEFAULT_MODEL  # SD 2.1 base on the hub, which carries the SD 2.x tokenizer


# ------------------------------------------------------------------------------------- diffusers -> original
def _rename(key: str, pairs: list[tuple[str, str]], inner: dict[str, list[tuple[str, str]]]) -> str:
    """Swap the longest matching prefix, then rename the part after it with that prefix's kind of sub-names."""
    for old, new, kind in pairs:  # longest first
        if key.startswith(old):
            rest = key[len(old):]
            for a, b in inner.get(kind, []):
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            return new + rest
    raise ValueError(f"no original-layout name for weight '{key}'")


_UNET_RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
                ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection.")]
_VAE_RESNET = [("conv_shortcut.", "nin_shortcut.")]
_VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def unet_to_original(state: dict, config) -> dict:
    """UNet2DConditionModel weights -> `model.diffusion_model.*` (SD 1.x/2.x openaimodel layout)."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = [("time_embedding.linear_1.", "time_embed.0.", ""), ("time_embedding.linear_2.", "time_embed.2.", ""),
             ("conv_in.", "input_blocks.0.0.", ""), ("conv_norm_out.", "out.0.", ""), ("conv_out.", "out.2.", ""),
             ("mid_block.resnets.0.", "middle_block.0.", "res"), ("mid_block.attentions.0.", "middle_block.1.", ""),
             ("mid_block.resnets.1.", "middle_block.2.", "res")]
    for i in range(n):
        for j in range(per):  # input_blocks: [resnet, attention] per layer, then the downsampler
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{1 + i * (per + 1) + j}.0.", "res"),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{1 + i * (per + 1) + j}.1.", "")]
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per + 1)}.0.op.", ""))
        for j in range(per + 1):  # output_blocks: one more layer per block; the upsampler sits after attention
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * (per + 1) + j}.0.", "res"),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * (per + 1) + j}.1.", "")]
        slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
        pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (per + 1) + per}.{slot}.", ""))
    pairs.sort(key=lambda p: -len(p[0]))
    return {UNET + _rename(k, pairs, {"res": _UNET_RESNET}): v for k, v in state.items()}


def vae_to_original(state: dict, config) -> dict:
    """AutoencoderKL weights -> `first_stage_model.*`; attention projections become 1x1 convolutions."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = [(p, p, "") for p in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.",
                                  "quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_norm_out.", f"{part}.norm_out.", ""),
                  (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", "res"),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", "res"),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", "attn")]
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", "res") for j in range(per)]
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", ""))
        up = n - 1 - i  # the original decoder counts its blocks from the lowest resolution up
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", "res") for j in range(per + 1)]
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample.", ""))
    pairs.sort(key=lambda p: -len(p[0]))
    out = {}
    for k, v in state.items():
        new = _rename(k, pairs, {"res": _VAE_RESNET, "attn": _VAE_ATTN})
        if ".mid.attn_1." in new and new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            v = v.reshape(*v.shape, 1, 1)
        out[VAE + new] = v
    return out


_TEXT_LAYER = [("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
               ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]


def text_encoder_to_original(state: dict) -> dict:
    """CLIPTextModel (SD 2.x's OpenCLIP ViT-H text tower) -> `cond_stage_model.model.*`, q/k/v fused as in OpenCLIP."""
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {TEXT + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           TEXT + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           TEXT + "ln_final.weight": state.pop("final_layer_norm.weight"),
           TEXT + "ln_final.bias": state.pop("final_layer_norm.bias")}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{TEXT}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([state.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
        for a, b in _TEXT_LAYER:
            for kind in ("weight", "bias"):
                out[dst + b + kind] = state.pop(src + a + kind)
    if state:
        raise ValueError(f"no original-layout name for text encoder weights {sorted(state)[:3]}")
    hidden = out[TEXT + "ln_final.weight"].shape[0]
    # SD 2.x conditions on hidden states, never on the projection; OpenCLIP loaders still expect the tensor, and
    # diffusers reads its first dimension as the width when it splits in_proj back into q/k/v.
    out[TEXT + "text_projection"] = torch.eye(hidden, dtype=out[TEXT + "ln_final.weight"].dtype)
    return out


def pipeline_to_original(pipe) -> dict:
    """One state dict of the whole pipeline in the original SD 2.x layout."""
    out = unet_to_original(pipe.unet.state_dict(), pipe.unet.config)
    out.update(vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    out.update(text_encoder_to_original(pipe.text_encoder.state_dict()))
    return out


# ------------------------------------------------------------------------------------- original -> diffusers
def _header_and_keys(path: Path) -> tuple[dict[str, str], dict[str, tuple]]:
    """The safetensors header and {key: shape} without reading any tensor data."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise UserError(f"model file {path} is not a readable .safetensors file ({first_line(e)}): "
                        "re-download or re-export it") from None


def _check_sd2(path: Path, shapes: dict[str, tuple]) -> None:
    if any(k.startswith("conditioner.") for k in shapes):
        raise UserError(f"model file {path} is an SDXL checkpoint: this tool fine-tunes SD 2.x; use an SD 2.x file")
    if SD1_TEXT_KEY in shapes:
        raise UserError(f"model file {path} is an SD 1.x checkpoint (CLIP-L text encoder): this tool fine-tunes "
                        "SD 2.x; use an SD 2.x file such as v2-1_512-ema-pruned.safetensors")
    if SD2_TEXT_KEY not in shapes or not any(k.startswith(UNET) for k in shapes):
        raise UserError(f"model file {path} is not a full SD 2.x checkpoint (no UNet or OpenCLIP text encoder "
                        "weights): pass a checkpoint with UNet, VAE and text encoder")


def _write_config_folder(folder: Path, configs: dict | None, v_prediction: bool) -> None:
    """A diffusers pipeline folder without weights: model_index.json and each part's config."""
    shutil.copytree(asset_path("sd21-base"), folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.md"))
    names = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
             "scheduler": "scheduler/scheduler_config.json"}
    for part, rel in names.items():
        if configs and part in configs:
            (folder / rel).write_text(json.dumps(configs[part]))
    if v_prediction:  # a 768-v model: the YAML beside it says so, the weights cannot
        sched = json.loads((folder / names["scheduler"]).read_text())
        (folder / names["scheduler"]).write_text(json.dumps({**sched, "prediction_type": "v_prediction"}))
        unet = json.loads((folder / names["unet"]).read_text())
        (folder / names["unet"]).write_text(json.dumps({**unet, "sample_size": 96, "upcast_attention": True}))


def _yaml_says_v(path: Path) -> bool:
    """True when the UI-style YAML beside the checkpoint (FILE.yaml) declares v-parameterization."""
    import yaml
    side = path.with_suffix(".yaml")
    if not side.is_file():
        return False
    try:
        params = (yaml.safe_load(side.read_text()) or {}).get("model", {}).get("params", {})
    except yaml.YAMLError:
        return False
    return isinstance(params, dict) and params.get("parameterization") == "v"


def _tokenizer(path: Path, vocab_rows: int):
    """The tokenizer that fits the checkpoint's vocabulary: the shipped tiny one, or SD 2.1's from the HF cache."""
    from transformers import CLIPTokenizer

    tiny = load_tokenizer()
    if vocab_rows == len(tiny):
        return tiny
    # One file holds no tokenizer; SD 2.x all share OpenCLIP's, which the hub model carries. A cache filled before
    # the SD 2.x take-down holds it under the old id.
    for repo, cached_only in ((HUB_BASE, hub_offline()), *((old, True) for old in former_ids(HUB_BASE))):
        try:
            tokenizer = CLIPTokenizer.from_pretrained(repo, subfolder="tokenizer", local_files_only=cached_only)
        except (OSError, ValueError):
            continue
        if len(tokenizer) == vocab_rows:  # transformers 5 answers missing files with an empty tokenizer
            return tokenizer
    raise UserError(f"model file {path} needs the SD 2.x tokenizer, which is not in the Hugging Face cache: "
                    f"run once online, or `hf download {HUB_BASE} --include 'tokenizer/*'`")


def load_single_file(path: str | Path, allow_pickle: bool = False, dtype: torch.dtype = torch.float32):
    """A StableDiffusionPipeline from one SD 2.x checkpoint file; no network is used for the configs."""
    from diffusers import StableDiffusionPipeline

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"model file {path} does not exist: check the path")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path, allow_pickle)
        header, shapes = {}, None  # no cheap look inside a pickle; from_single_file reads it (weights only)
    elif path.suffix.lower() == ".safetensors":
        checksums.refuse_damaged(path, "model file")  # cut short, unparsable, or (our exports) a changed byte
        header, shapes = _header_and_keys(path)
        _check_sd2(path, shapes)
    else:
        raise UserError(f"model file {path} is neither .safetensors nor an allowed pickle file: pass an SD 2.x "
                        ".safetensors checkpoint")
    configs = json.loads(header[CONFIGS_KEY]) if CONFIGS_KEY in header else None
    vocab = shapes[SD2_TEXT_KEY][0] if shapes else 49408
    tokenizer = _tokenizer(path, vocab)
    with tempfile.TemporaryDirectory() as tmp:
        _write_config_folder(Path(tmp), configs, v_prediction=configs is None and _yaml_says_v(path))
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=tmp, local_files_only=True, tokenizer=tokenizer, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False, dtype=dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            first = first_line(e)
            raise UserError(f"cannot load model file {path} as an SD 2.x checkpoint: {first}") from None
    return pipe
