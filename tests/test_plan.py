"""The run plan: config + machine -> every decision once, with its reason; the loaded config is never changed."""

import copy
import dataclasses

import pytest

from dreambooth.config import Machine, resolve
from dreambooth.config.plan import steps_per_epoch

GPU = Machine(cuda=True, gpu_gib=79.6, triton=True, bitsandbytes=True)


@pytest.mark.parametrize("overrides", [{}, {"memory_profile": "6gb"}, {"finetune": "lora"},
                                       {"max_steps": 800, "compile": "auto"}, {"mixed_precision": "bf16"}])
def test_resolving_never_changes_the_config(make_cfg, overrides):
    cfg = make_cfg(**overrides)
    before = copy.deepcopy(cfg)
    plan = resolve(cfg, GPU, epoch_items=4)
    assert cfg == before and cfg.provided == before.provided
    assert plan.config is cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.precision = "no"
    with pytest.raises(TypeError):
        plan.choices["optimizer"] = None  # the decisions are read-only too


def test_each_decision_says_what_was_given_and_why(make_cfg):
    plan = resolve(make_cfg(max_steps=None, epochs=3), GPU, epoch_items=4)
    assert (plan.precision, plan.optimizer, plan.memory.profile) == ("fp16", "adamw8bit", "24gb")
    assert plan.choices["memory_profile"].why == "auto on a 79.6 GiB GPU"
    assert plan.choices["prior_mode"].given == "auto" and plan.choices["prior_mode"].value == "concat"
    assert plan.choices["compile"].why.startswith("12 steps, under the 700")  # 3 epochs x 4 items, batch 1
    assert plan.resolved() == {k: c.value for k, c in plan.choices.items()}
    assert plan.total_steps == 12 and plan.steps_per_epoch == 4


def test_lora_rate_and_profile_settings_enter_what_checkpoints_compare(make_cfg):
    cfg = make_cfg(finetune="lora", memory_profile="24gb")
    assert "learning_rate" in cfg.provided  # make_cfg sets 1e-3: the user's rate wins
    plan = resolve(dataclasses.replace(cfg, provided=cfg.provided - {"learning_rate"}), Machine(), epoch_items=4)
    assert plan.learning_rate == 1e-4 and plan.config.learning_rate == 1e-3  # LoRA's default, config untouched
    effective = plan.effective_config()
    assert effective.learning_rate == 1e-4 and effective.gradient_checkpointing is False  # make_cfg's false
    assert resolve(make_cfg(memory_profile="6gb"), Machine(), 4).effective_config().mixed_precision == "bf16"


@pytest.mark.parametrize("items, processes, batch, accumulation, expected", [
    (4, 1, 1, 1, 4), (5, 1, 2, 1, 3), (5, 2, 1, 1, 3), (8, 2, 2, 2, 1), (1, 4, 1, 1, 1)])
def test_steps_per_epoch(make_cfg, items, processes, batch, accumulation, expected):
    cfg = make_cfg(batch_size=batch, gradient_accumulation_steps=accumulation)
    assert steps_per_epoch(items, cfg, processes) == expected
