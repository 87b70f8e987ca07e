"""A non-finite loss with the optimizer step fused into backward (memory profiles 8gb/6gb): the step is dropped
before its backward, and weights and optimizer state stay bit for bit as they were."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import assert_bits_equal

from dreambooth.errors import UserError
from dreambooth.training.step import TrainStep
from dreambooth.training.trainer import Trainer

PRIOR = dict(with_prior_preservation=True, num_class_images=2, class_sampling_steps=2, sample_batch_size=2)
SEQ = {**PRIOR, "prior_mode": "sequential"}


def poison(monkeypatch, trainer, step: int, call: int | None) -> None:
    """Make the UNet's prediction NaN in step `step` (from it on, where call is None), at its `call`-th forward
    of that step (0-based: micro-batches, and with the sequential prior their instance and class passes)."""
    original, calls, state = TrainStep.predict, [], trainer.state

    def predict(self, *args):
        calls.append(state.step)
        pred, target = original(self, *args)
        if (call is None and state.step >= step) or (state.step == step and calls.count(step) == call + 1):
            pred = pred * math.nan
        return pred, target
    monkeypatch.setattr(TrainStep, "predict", predict)


def training_state(trainer) -> dict:
    """Everything a step may change: weights, per-tensor AdamW states, Kahan buffers, rounding streams, the
    clip coefficient and the lr schedule."""
    step = trainer.step
    return copy.deepcopy({"weights": [p.detach() for p in step.params], "optimizer": step.paramwise.state_dict(),
                          "schedule": step.lr_scheduler.state_dict()})


def step_counts(trainer) -> set[int]:
    return {int(o.state_dict()["state"][0]["step"]) for o in trainer.step.paramwise._inner.values()}


@pytest.mark.parametrize("profile, extra, call", [
    ("8gb", {}, 0),
    ("8gb", {"gradient_accumulation_steps": 2}, 1),     # after the first micro-batch's gradients accumulated
    ("8gb", PRIOR, 0),                                   # prior joined to the instances in one forward
    ("6gb", SEQ, 0),                                     # sequential prior: the instance pass
    ("6gb", SEQ, 1),                                     # sequential prior: the class pass, after instance backward
    ("6gb", {**SEQ, "gradient_accumulation_steps": 2}, 3),  # the step's very last pass
], ids=["concat", "accumulation", "concat-prior", "sequential-1st", "sequential-2nd", "sequential-accumulation"])
def test_nan_loss_drops_the_fused_step_bit_for_bit(make_cfg, monkeypatch, profile, extra, call):
    cfg = make_cfg(memory_profile=profile, max_steps=3, learning_rate=1e-3, max_grad_norm=1.0, **extra)
    trainer = Trainer(cfg).setup()
    assert trainer.step.paramwise.fused
    poison(monkeypatch, trainer, step=1, call=call)
    drawn = []
    batches = (drawn.append(b) or b for b in trainer.batches())
    trainer.step.run(batches, trainer.state)
    trainer.state.step = 1
    before, position = training_state(trainer), len(drawn)

    logs = trainer.step.run(batches, trainer.state)
    assert logs["skipped"] == 1.0 and not math.isfinite(logs["loss"])
    assert_bits_equal(training_state(trainer), before)
    assert all(p.grad is None for p in trainer.step.params) and not trainer.step.paramwise._counts
    assert len(drawn) - position == cfg.gradient_accumulation_steps  # the data position moves on as ever

    trainer.state.step = 2  # the next step trains as usual: every tensor stepped once more, schedule moves on
    logs = trainer.step.run(batches, trainer.state)
    assert logs["skipped"] == 0.0 and math.isfinite(logs["loss"]) and math.isfinite(logs["grad_norm"])
    assert step_counts(trainer) == {2}
    assert trainer.step.lr_scheduler.state_dict()["last_epoch"] == before["schedule"]["last_epoch"] + 1
    assert any(not torch.equal(a, b) for a, b in zip(before["weights"], trainer.step.params))
    trainer.runlog.close()


def test_fused_nan_steps_count_towards_nan_patience(make_cfg, monkeypatch):
    trainer = Trainer(make_cfg(memory_profile="6gb", max_steps=10, nan_patience=3, **SEQ)).setup()
    poison(monkeypatch, trainer, step=1, call=None)  # every step from the second on
    seen = []
    monkeypatch.setattr(Trainer, "after_step", lambda self, logs: seen.append((logs["skipped"], training_state(self))))
    try:
        with pytest.raises(UserError, match="3 steps in a row"):
            trainer.train()
    finally:
        trainer.runlog.close()
    assert [s for s, _ in seen] == [0.0, 1.0, 1.0, 1.0] and trainer.state.bad_steps == 3
    for _, state in seen[1:]:
        assert_bits_equal(state, seen[0][1])
