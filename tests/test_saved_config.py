"""output_dir/config.yaml as a rerunnable record: user values as set, machine-resolved keys as auto (with what
this run chose in a comment), so a rerun here repeats the run and a rerun on another card re-resolves."""

from pathlib import Path

import pytest
import yaml

from dreambooth.config import Machine, config_from_dict, load_config, resolve, save_config
from dreambooth.config.plan import export_formats
from dreambooth.models.builtin import TINY_RESOLUTION
from dreambooth.training.resume import training_settings
from dreambooth.training.trainer import Trainer


def run_data(subject_dir, out: Path, **extra) -> dict:
    """A tiny run that leaves the memory-profile keys unset."""
    return {"model": "builtin:tiny", "output_dir": str(out), "data": {"dir": str(subject_dir)},
            "resolution": TINY_RESOLUTION, "max_steps": 1, "learning_rate": 1e-3, "validation": {"enabled": False},
            "quiet": True, **extra}


def on_card(gib: float | None) -> Machine:
    """This CPU machine, as if it had a GPU of `gib` GiB for the memory profile's choice (None: no GPU)."""
    return Machine(gpu_gib=gib)


def resolved(cfg, gib: float | None):
    """The plan of `cfg` on a card with `gib` GiB (one epoch item)."""
    return resolve(cfg, on_card(gib), epoch_items=4)


@pytest.mark.parametrize("run_gib, other_gib", [(79.6, 15.7), (5.8, 79.6)])
def test_saved_config_reruns_same_here_and_re_resolves_elsewhere(subject_dir, tmp_path, monkeypatch, run_gib,
                                                                 other_gib):
    data = run_data(subject_dir, tmp_path / "out")
    trainer = Trainer(config_from_dict(data), on_card(run_gib)).setup()  # a CPU run planned as on that card
    saved = tmp_path / "out" / "config.yaml"
    written = yaml.safe_load(saved.read_text())
    assert (written["gradient_checkpointing"], written["prior_mode"], written["memory_profile"]) == ("auto",) * 3
    assert written["learning_rate"] == 1e-3 and written["max_steps"] == 1  # the user's values, as set

    same = resolved(load_config(saved), run_gib)
    assert training_settings(same) == training_settings(trainer.plan)
    assert same.memory == trainer.plan.memory

    other = resolved(load_config(saved), other_gib)
    fresh = resolved(config_from_dict(data), other_gib)
    assert training_settings(other) == training_settings(fresh) and other.memory == fresh.memory
    assert other.gradient_checkpointing != trainer.plan.gradient_checkpointing


def test_comments_say_what_this_run_resolved(subject_dir, tmp_path):
    Trainer(config_from_dict(run_data(subject_dir, tmp_path / "out")), on_card(79.6)).setup()
    lines = (tmp_path / "out" / "config.yaml").read_text().splitlines()
    assert "gradient_checkpointing: auto  # this run: false (memory_profile 24gb on a 79.6 GiB GPU)" in lines
    assert "memory_profile: auto  # this run: 24gb (auto on a 79.6 GiB GPU)" in lines
    assert "optimizer: auto  # this run: adamw" in lines  # CPU: plain AdamW
    assert "mixed_precision: auto  # this run: no" in lines
    assert "cache_latents: auto  # this run: true (VAE frozen)" in lines


def test_user_set_values_are_written_as_set(make_cfg, tmp_path):
    plan = resolved(make_cfg(memory_profile="6gb", prior_mode="concat", mixed_precision="auto"), None)
    assert (plan.gradient_checkpointing, plan.prior_mode, plan.precision) == (False, "concat", "bf16")
    save_config(plan, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    for line in ("gradient_checkpointing: false", "prior_mode: concat", "memory_profile: 6gb",
                 "mixed_precision: auto  # this run: bf16 (memory_profile 6gb on no GPU)"):
        assert line in text.splitlines()
    again = resolved(load_config(tmp_path / "config.yaml"), None)
    assert training_settings(again) == training_settings(plan)


def test_explicit_profile_leaves_its_keys_to_a_rerun_profile(subject_dir, tmp_path):
    plan = resolved(config_from_dict(run_data(subject_dir, tmp_path / "out", memory_profile="24gb")), None)
    assert plan.gradient_checkpointing is False and plan.config.gradient_checkpointing is True  # config untouched
    save_config(plan, tmp_path / "config.yaml")
    rerun = resolved(load_config(tmp_path / "config.yaml", ["memory_profile=default"]), None)
    assert rerun.gradient_checkpointing is True  # not pinned to the 24gb profile's false


def test_lora_default_exports_survive_a_rerun(subject_dir, tmp_path):
    cfg = config_from_dict(run_data(subject_dir, tmp_path / "out", finetune="lora"))
    save_config(resolved(cfg, None), tmp_path / "config.yaml")
    assert export_formats(load_config(tmp_path / "config.yaml")) == export_formats(cfg) == ["lora"]


def test_resume_from_the_saved_config(subject_dir, tmp_path):
    trainer = Trainer(config_from_dict(run_data(subject_dir, tmp_path / "out", max_steps=2, checkpoint_steps=1)),
                      on_card(79.6))
    trainer.setup().train()
    resumed = Trainer(load_config(tmp_path / "out" / "config.yaml", ["resume=latest"]), on_card(79.6))
    assert resumed.resume_from is not None and resumed.plan.gradient_checkpointing is False


def test_lora_export_reads_config_yaml_once(make_cfg, monkeypatch):
    from safetensors import safe_open

    from dreambooth.export import formats
    cfg = make_cfg(finetune="lora", max_steps=1)
    trainer = Trainer(cfg).setup()
    trainer.save(trainer.train())
    reads, load = [], formats.load_config
    monkeypatch.setattr(formats, "load_config", lambda path, *a: reads.append(Path(path).name) or load(path, *a))
    written = formats.export_model(cfg.output_dir, "single-file")
    assert reads == ["config.yaml"]  # the base model and the file's header come from one read
    with safe_open(str(written), "pt") as f:
        assert f.metadata()["dreambooth.base_model"] == "builtin:tiny"
