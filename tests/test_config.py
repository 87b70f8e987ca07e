"""Config schema: files in configs/ and the demo's packaged one validate, overrides, JumpStart string forms,
unknown keys, cross-field checks."""

import json
from pathlib import Path

import pytest

from dreambooth.config.schema import Config, config_from_dict, load_config, schema_rows, subjects_of
from dreambooth.demo import demo_config_path
from dreambooth.errors import UserError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")) + [demo_config_path()]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.resolution % 8 == 0


def test_jumpstart_defaults():
    cfg = config_from_dict({"data": {"dir": "x"}})
    assert (cfg.epochs, cfg.max_steps, cfg.batch_size, cfg.learning_rate) == (20, None, 1, 2e-6)
    assert (cfg.with_prior_preservation, cfg.num_class_images, cfg.prior_loss_weight) == (False, 100, 1.0)
    assert (cfg.center_crop, cfg.lr_scheduler, cfg.adam_weight_decay) == (False, "constant", 0.01)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon) == (0.9, 0.999, 1e-8)
    assert (cfg.gradient_accumulation_steps, cfg.max_grad_norm, cfg.seed) == (1, 1.0, 0)
    assert cfg.model == "stabilityai/stable-diffusion-2-1-base" and cfg.resolution == 512


def test_jumpstart_string_forms_from_json(tmp_path):
    # A SageMaker hyperparameters dict: every value is a string.
    hp = {"with_prior_preservation": "False", "max_steps": "400", "learning_rate": "2e-06", "epochs": "20",
          "center_crop": "True", "seed": "0", "adam_epsilon": "1e-08", "prior_loss_weight": "1.0",
          "lr_scheduler": "constant", "batch_size": "1", "data": {"dir": "cat"}}
    path = tmp_path / "hyperparameters.json"
    path.write_text(json.dumps(hp))
    cfg = load_config(path)
    assert cfg.max_steps == 400 and cfg.learning_rate == 2e-6 and cfg.center_crop is True
    assert cfg.with_prior_preservation is False and cfg.adam_epsilon == 1e-8
    assert config_from_dict({"max_steps": "None", "data": {"dir": "x"}}).max_steps is None


def test_dotted_overrides_parse_as_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  dir: a\nmax_steps: 10\n")
    cfg = load_config(path, ["max_steps=400", "data.dir=./cat", "validation.steps=[100,200]",
                             "learning_rate=1e-5", "center_crop=true"])
    assert cfg.max_steps == 400 and cfg.data.dir == "./cat" and cfg.validation.steps == [100, 200]
    assert cfg.learning_rate == 1e-5 and cfg.center_crop is True
    assert {"max_steps", "data.dir", "validation.steps"} <= cfg.provided


def test_unknown_key_suggests_closest_name():
    with pytest.raises(UserError, match="unknown key 'learnig_rate': did you mean 'learning_rate'"):
        config_from_dict({"learnig_rate": 1e-5, "data": {"dir": "x"}})
    with pytest.raises(UserError, match="did you mean 'data.instance_prompt'"):
        config_from_dict({"data": {"dir": "x", "instance_promt": "a"}})


def test_all_problems_reported_at_once():
    with pytest.raises(UserError) as err:
        config_from_dict({"learning_rate": -1, "max_steps": 0, "resolution": 500, "lr_scheduler": "cosinus",
                          "batch_size": "two"})
    text = str(err.value)
    assert "6 problems" in text
    for key in ("learning_rate", "max_steps", "resolution", "lr_scheduler", "batch_size", "data.dir"):
        assert f"'{key}'" in text


def test_wrong_types_name_the_key():
    with pytest.raises(UserError, match="'with_prior_preservation' expected true or false"):
        config_from_dict({"with_prior_preservation": "maybe", "data": {"dir": "x"}})
    with pytest.raises(UserError, match="'epochs' expected a whole number"):
        config_from_dict({"epochs": 2.5, "data": {"dir": "x"}})


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: [1, 2\n")
    with pytest.raises(UserError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="not of the form key=value"):
        load_config(None, ["max_steps"])


def test_single_folder_is_one_subject():
    cfg = config_from_dict({"data": {"dir": "cat", "instance_prompt": "a photo of rio cat"}})
    (subject,) = subjects_of(cfg)
    assert subject.dir == "cat" and subject.instance_prompt == "a photo of rio cat"
    with pytest.raises(UserError, match="not both"):
        config_from_dict({"data": {"dir": "cat"}, "subjects": [{"dir": "dog"}]})


def test_every_option_is_documented():
    rows = schema_rows(Config)
    assert len(rows) > 50
    assert all(doc for _, _, doc in rows)


def test_readme_documents_every_option():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [key for key, _, _ in schema_rows(Config) if f"| `{key}` |" not in readme]
    assert not missing, f"README's option table lacks {missing}: rerun scripts/config_table.py"


def test_memory_profile_keys_accept_auto_and_boolean_forms():
    cfg = config_from_dict({"gradient_checkpointing": "auto", "prior_mode": "AUTO", "data": {"dir": "x"}})
    assert (cfg.gradient_checkpointing, cfg.prior_mode) == ("auto", "auto")
    for text, value in (("yes", True), ("off", False), ("True", True), (0, False)):
        assert config_from_dict({"gradient_checkpointing": text, "data": {"dir": "x"}}).gradient_checkpointing is value
    assert config_from_dict({"cache_latents": "no", "data": {"dir": "x"}}).cache_latents is False
    with pytest.raises(UserError, match="'gradient_checkpointing' got 'maybe'"):
        config_from_dict({"gradient_checkpointing": "maybe", "data": {"dir": "x"}})
