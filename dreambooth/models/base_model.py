"""SD 2.1 base by its hub ids: one line for the SD 2.x ids Stability AI took down, and a check that a hub copy
presented as SD 2.1 base has SD 2.1 base's published configs, made before any of its weights load."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from dreambooth.config.machine import hub_offline
from dreambooth.config.schema import Config
from dreambooth.errors import UserError, first_line
from dreambooth.models.builtin import asset_path

DEFAULT_MODEL: str = Config.model  # the schema default is the one place the id is written
PUBLISHED = asset_path("sd21-base")

# Stability AI's SD 2.x repositories, taken down from the Hugging Face Hub in November 2025, by repository name
# (the organisation apart, so no code path can hand the Hub a dead id by accident): each has a community copy of
# the same name, and the original single file of the release (which `model:` loads too).
TAKEN_DOWN_FROM, COPIED_TO = "stabilityai", "sd2-community"
RELEASES = {"stable-diffusion-2-1-base": "v2-1_512-ema-pruned.safetensors",
            "stable-diffusion-2-1": "v2-1_768-ema-pruned.safetensors",
            "stable-diffusion-2-base": "512-base-ema.safetensors",
            "stable-diffusion-2": "768-v-ema.safetensors"}
REMOVED = {f"{TAKEN_DOWN_FROM}/{name}": (f"{COPIED_TO}/{name}", single_file) for name, single_file in RELEASES.items()}
# Hub ids that must hold SD 2.1 base: the default and the id it was published under.
SD21_BASE_IDS = {DEFAULT_MODEL} | {old for old, (copy, _) in REMOVED.items() if copy == DEFAULT_MODEL}

# The weighted components, whose classes model_index.json must name as SD 2.1 base's does; then, per component,
# its config file and the fields that fix its architecture and use (the scheduler's class is free, its
# prediction_type is not).
CLASSES = ("unet", "vae", "text_encoder")
CHECKED = {
    "unet": ("unet/config.json", ("in_channels", "block_out_channels", "cross_attention_dim",
                                  "attention_head_dim", "sample_size")),
    "vae": ("vae/config.json", ("latent_channels", "block_out_channels", "scaling_factor")),
    "text_encoder": ("text_encoder/config.json", ("hidden_size", "num_hidden_layers")),
    "scheduler": ("scheduler/scheduler_config.json", ("prediction_type",)),
}


def former_ids(model: str) -> list[str]:
    """The taken-down ids whose community copy is MODEL."""
    return [old for old, (copy, _) in REMOVED.items() if copy == model]


def removed_message(model: str) -> str | None:
    """The one line for a taken-down id, or None for any other model."""
    entry = REMOVED.get(model.strip().lower())
    if entry is None:
        return None
    copy, single_file = entry
    return (f"model '{model}' cannot be loaded: Stability AI took this repository down from the Hugging Face Hub "
            f"in November 2025; use its community copy {copy}, a local diffusers folder, or the original single "
            f"file (e.g. /path/to/{single_file}) as model: instead (docs/base-model.md)")


def _hub_failure(error: BaseException) -> bool:
    """Whether ERROR (or what it was raised from) says the repository or file could not be had: not found,
    gated, disabled, or not in the cache while offline."""
    from huggingface_hub import errors as hub
    kinds = (hub.RepositoryNotFoundError, hub.RevisionNotFoundError, hub.EntryNotFoundError,
             hub.DisabledRepoError, hub.OfflineModeIsEnabled)
    # diffusers and transformers wrap the hub's error in an OSError of their own, with these words
    words = ("not a valid model identifier", "does not appear to have a file named", "couldn't connect",
             "not cached locally", "not fully cached", "gated repo", "repository not found")
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, kinds) or any(w in str(error).lower() for w in words):
            return True
        error = error.__cause__ or error.__context__
    return False


def explain(model: str, error: BaseException) -> UserError | None:
    """The taken-down message in place of ERROR when MODEL is a taken-down id that failed to load; else None."""
    message = removed_message(model)
    return UserError(message) if message and _hub_failure(error) else None


def _fetch(model: str, rel: str, revision: str | None) -> dict:
    """One config file of hub id MODEL, downloaded alone (or from the cache: HF_HUB_OFFLINE is honoured)."""
    import huggingface_hub

    folder, _, name = rel.rpartition("/")
    try:
        path = huggingface_hub.hf_hub_download(model, name, subfolder=folder or None, revision=revision,
                                               local_files_only=hub_offline())
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        found = explain(model, e)
        if found:
            raise found from None
        hint = ("HF_HUB_OFFLINE is set, so it must already be in the Hugging Face cache" if hub_offline()
                else "check the hub id and revision, or pass a local diffusers folder")
        raise UserError(f"cannot load {rel} of model '{model}': {first_line(e)} ({hint})") from None
    if not isinstance(data, dict):
        raise UserError(f"{rel} of model '{model}' is not a JSON object: set model: to a complete copy")
    return data


def _published(rel: str) -> dict:
    return json.loads((PUBLISHED / rel).read_text())


def _value(config: dict, field: str, class_name: str):
    """CONFIG's FIELD, else the default of the diffusers class it configures (a config may leave defaults out)."""
    if field in config:
        value = config[field]
    else:
        import diffusers
        cls = getattr(diffusers, class_name, None)
        param = inspect.signature(cls.__init__).parameters.get(field) if cls else None
        value = None if param is None or param.default is inspect.Parameter.empty else param.default
    return list(value) if isinstance(value, tuple) else value  # JSON lists and Python defaults alike


def _mismatch(model: str, revision: str | None, what: str, found, expected) -> UserError:
    name = model + (f"@{revision}" if revision else "")
    return UserError(f"model '{name}' is not SD 2.1 base: its {what} is {found!r} where SD 2.1 base's published "
                     f"config has {expected!r}; set model: to a faithful copy of SD 2.1 base (or pin revision: to "
                     "a commit that is one) or to a local diffusers folder; a model of another architecture loads "
                     "unchecked under its own id")


# (hub id, revision) pairs that passed check_sd21_base in this process: a run loads its base model up to four
# times (class sampling, training, the frozen parts at save, a LoRA's base), and each check asks the hub for 5 files.
PASSED_IDS: set[tuple[str, str | None]] = set()


def check_sd21_base(model: str, revision: str | None = None) -> None:
    """Refuse a hub id that names SD 2.1 base but whose configs are not SD 2.1 base's; other models pass."""
    if model.strip().lower() not in SD21_BASE_IDS or (model, revision) in PASSED_IDS:
        return
    index, expected_index = _fetch(model, "model_index.json", revision), _published("model_index.json")
    for part in CLASSES:
        found, expected = (index.get(part) or [None, None])[-1], expected_index[part][-1]
        if found != expected:
            raise _mismatch(model, revision, f"model_index.json {part} class", found, expected)
    for part, (rel, fields) in CHECKED.items():
        config, published = _fetch(model, rel, revision), _published(rel)
        class_name = published.get("_class_name", "")
        for field in fields:
            found, expected = _value(config, field, class_name), _value(published, field, class_name)
            if found != expected:
                raise _mismatch(model, revision, f"{part} {field}", found, expected)
    PASSED_IDS.add((model, revision))
