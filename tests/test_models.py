"""Loading the base model the way real runs do: a local diffusers folder (the hub-id path), v-prediction
models, pickle refusal, and the machine checks for precision and optimizer."""

import json
import shutil

import pytest
from conftest import assert_bits_equal, max_diff
from diffusers import StableDiffusionPipeline

from dreambooth.errors import UserError
from dreambooth.config import Machine, resolve
from dreambooth.models.load import load_components, model_kind
from dreambooth.training.trainer import Trainer, run_training


def test_trains_from_a_local_diffusers_folder(make_cfg, tiny_model_dir):
    cfg = make_cfg(model=str(tiny_model_dir), max_steps=2)
    assert model_kind(cfg.model) == "folder"
    run_training(cfg)
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    out = StableDiffusionPipeline.from_pretrained(cfg.output_dir)
    assert type(out.scheduler).__name__ == type(base.scheduler).__name__ == "PNDMScheduler"
    assert max_diff(base.unet.state_dict(), out.unet.state_dict()) > 0
    assert_bits_equal(base.vae.state_dict(), out.vae.state_dict())


def test_v_prediction_model_trains_on_the_velocity(make_cfg, tiny_model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "v-model"
    shutil.copytree(tiny_model_dir, folder)
    sched = folder / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "v_prediction"}))
    cfg = make_cfg(model=str(folder), max_steps=1)
    assert load_components(cfg).noise_scheduler.config.prediction_type == "v_prediction"
    seen = []
    import dreambooth.training.step as step_module
    real = step_module.training_target
    monkeypatch.setattr(step_module, "training_target", lambda *a: seen.append(a[-1]) or real(*a))
    Trainer(cfg).setup().train()
    assert seen == ["v_prediction"]


def test_pickle_only_folder_is_refused_unless_allowed(make_cfg, tiny_model_dir, tmp_path):
    folder = tmp_path / "bin-model"
    shutil.copytree(tiny_model_dir, folder)
    for f in (folder / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(UserError, match="allow_pickle"):
        load_components(make_cfg(model=str(folder)))
    with pytest.raises(UserError, match="pickle file"):
        model_kind(str(tmp_path / "model.ckpt"))


def test_not_a_diffusers_folder(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(UserError, match="no model_index.json"):
        model_kind(str(tmp_path / "weights"))


def test_machine_choices(make_cfg):
    cpu, gpu = Machine(), Machine(cuda=True, gpu_gib=16.0, bitsandbytes=True)
    plan = resolve(make_cfg(), gpu, epoch_items=4)
    assert (plan.precision, plan.optimizer) == ("fp16", "adamw8bit")
    plan = resolve(make_cfg(), cpu, epoch_items=4)
    assert (plan.precision, plan.optimizer) == ("no", "adamw")
    assert resolve(make_cfg(), Machine(cuda=True, gpu_gib=16.0), epoch_items=4).optimizer == "adamw"  # no bnb
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        resolve(make_cfg(mixed_precision="fp16"), cpu, epoch_items=4)
    with pytest.raises(UserError, match="adamw8bit needs a CUDA GPU"):
        resolve(make_cfg(optimizer="adamw8bit"), cpu, epoch_items=4)
