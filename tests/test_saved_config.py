"""output_dir/config.yaml as a rerunnable record: user values as set, machine-resolved keys as auto (with what
this run chose in a comment), so a rerun here repeats the run and a rerun on another card re-resolves."""

from pathlib import Path

import pytest
import yaml

from dreambooth.training import memory
from dreambooth.training.checkpoint import training_settings
from dreambooth.config.schema import config_from_dict, load_config, save_config
from dreambooth.export.formats import formats_of
from dreambooth.training.memory import apply_memory_profile
from dreambooth.models.builtin import TINY_RESOLUTION
from dreambooth.training.trainer import Trainer


def run_data(subject_dir, out: Path, **extra) -> dict:
    """A tiny run that leaves the memory-profile keys unset."""
    return {"model": "builtin:tiny", "output_dir": str(out), "data": {"dir": str(subject_dir)},
            "resolution": TINY_RESOLUTION, "max_steps": 1, "learning_rate": 1e-3, "validation": {"enabled": False},
            "quiet": True, **extra}


def resolved(cfg, gib: float | None):
    """`cfg` after the memory profile of a card with `gib` GiB, and the plan."""
    return cfg, apply_memory_profile(cfg, total_gib=gib, num_processes=1, bf16_ok=True)


@pytest.mark.parametrize("run_gib, other_gib", [(79.6, 15.7), (5.8, 79.6)])
def test_saved_config_reruns_same_here_and_re_resolves_elsewhere(subject_dir, tmp_path, monkeypatch, run_gib,
                                                                 other_gib):
    monkeypatch.setattr(memory, "gpu_memory_gib", lambda: run_gib)  # a CPU run that resolves as on that card
    data = run_data(subject_dir, tmp_path / "out")
    trainer = Trainer(config_from_dict(data)).setup()
    saved = tmp_path / "out" / "config.yaml"
    written = yaml.safe_load(saved.read_text())
    assert (written["gradient_checkpointing"], written["prior_mode"], written["memory_profile"]) == ("auto",) * 3
    assert written["learning_rate"] == 1e-3 and written["max_steps"] == 1  # the user's values, as set

    same, plan = resolved(load_config(saved), run_gib)
    assert training_settings(same) == training_settings(trainer.cfg)
    assert plan.describe() == trainer.memory.describe()

    other, plan = resolved(load_config(saved), other_gib)
    fresh, fresh_plan = resolved(config_from_dict(data), other_gib)
    assert training_settings(other) == training_settings(fresh) and plan.describe() == fresh_plan.describe()
    assert other.gradient_checkpointing != trainer.cfg.gradient_checkpointing


def test_comments_say_what_this_run_resolved(subject_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "gpu_memory_gib", lambda: 79.6)
    Trainer(config_from_dict(run_data(subject_dir, tmp_path / "out"))).setup()
    lines = (tmp_path / "out" / "config.yaml").read_text().splitlines()
    assert "gradient_checkpointing: auto  # this run: false (memory_profile 24gb on a 79.6 GiB GPU)" in lines
    assert "memory_profile: auto  # this run: 24gb (auto on a 79.6 GiB GPU)" in lines
    assert "optimizer: auto  # this run: adamw" in lines  # CPU: plain AdamW
    assert "mixed_precision: auto  # this run: no" in lines
    assert "cache_latents: auto  # this run: true (VAE frozen)" in lines


def test_user_set_values_are_written_as_set(make_cfg, tmp_path):
    cfg, _ = resolved(make_cfg(memory_profile="6gb", prior_mode="concat", mixed_precision="auto"), None)
    assert (cfg.gradient_checkpointing, cfg.prior_mode, cfg.mixed_precision) == (False, "concat", "bf16")
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    for line in ("gradient_checkpointing: false", "prior_mode: concat", "memory_profile: 6gb",
                 "mixed_precision: auto  # this run: bf16 (memory_profile 6gb on no GPU)"):
        assert line in text.splitlines()
    again, _ = resolved(load_config(tmp_path / "config.yaml"), None)
    assert training_settings(again) == training_settings(cfg)


def test_explicit_profile_leaves_its_keys_to_a_rerun_profile(subject_dir, tmp_path):
    cfg, _ = resolved(config_from_dict(run_data(subject_dir, tmp_path / "out", memory_profile="24gb")), None)
    assert cfg.gradient_checkpointing is False
    save_config(cfg, tmp_path / "config.yaml")
    rerun, _ = resolved(load_config(tmp_path / "config.yaml", ["memory_profile=default"]), None)
    assert rerun.gradient_checkpointing is True  # not pinned to the 24gb profile's false


def test_lora_default_exports_survive_a_rerun(subject_dir, tmp_path):
    cfg = config_from_dict(run_data(subject_dir, tmp_path / "out", finetune="lora"))
    save_config(cfg, tmp_path / "config.yaml")
    assert formats_of(load_config(tmp_path / "config.yaml")) == formats_of(cfg) == ["lora"]


def test_resume_from_the_saved_config(subject_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "gpu_memory_gib", lambda: 79.6)
    trainer = Trainer(config_from_dict(run_data(subject_dir, tmp_path / "out", max_steps=2, checkpoint_steps=1)))
    trainer.setup().train()
    resumed = Trainer(load_config(tmp_path / "out" / "config.yaml", ["resume=latest"]))
    assert resumed.resume_from is not None and resumed.cfg.gradient_checkpointing is False


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
