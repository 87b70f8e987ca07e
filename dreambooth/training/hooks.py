"""What the Trainer does between steps, mixed into it: checkpoints, validation and the log at their steps, the
end-of-training sweep, and the stops (signals, NaN streaks)."""

from __future__ import annotations

import time

from dreambooth.training import checkpoint
from dreambooth.errors import UserError


class TrainerHooks:
    """Bookkeeping around the Trainer's loop; uses its cfg, counters, accelerator, runlog and validator."""

    def _stop_requested(self, stop: checkpoint.StopSignals) -> bool:
        # Every process must stop after the same step.
        return checkpoint.any_process(self.accelerator, stop.requested is not None)

    def _stop_non_finite(self) -> None:
        kept = (f"the last good checkpoint {self.last_checkpoint} is kept" if self.last_checkpoint
                else "no checkpoint was written")
        raise UserError(f"stopped at step {self.global_step}: loss or gradients were NaN/inf for "
                        f"{self.bad_steps} steps in a row (nan_patience: {self.cfg.nan_patience}); train with "
                        f"mixed_precision: bf16 or a lower learning_rate (now {self.cfg.learning_rate:g}); {kept}")

    def after_step(self, logs: dict[str, float]) -> None:
        """Bookkeeping after each optimisation step (checkpoints, validation and logging hook in here)."""
        self.losses.append(logs["loss"])
        # A checkpoint only after a good step, so the newest one is never inside a NaN streak. A step about to be
        # validated with keep_checkpoints is kept from the start, so validation need not write it again.
        if self.cfg.checkpoint_steps and self.global_step % self.cfg.checkpoint_steps == 0 and not self.bad_steps:
            checkpoint.save(self, keep=self._keeps_validated_step())
        self.runlog.step(self.global_step, logs)
        self.validate_if_due()

    def validate_if_due(self) -> None:
        """Validation images at the scheduled steps (validation.steps / every_n_steps)."""
        if self.validator is not None and self.validator.due(self.global_step):
            # Exempt from keep_last, so any validated step can be exported (unless this step's is written already).
            if self._keeps_validated_step() and self.last_checkpoint_step != self.global_step:
                checkpoint.save(self, keep=True)
            start = time.time()
            images = self.validator.run(self.global_step)
            self.runlog.validated(self.global_step, images, time.time() - start)

    def _keeps_validated_step(self) -> bool:
        """This step is validated and validation.keep_checkpoints asks for its checkpoint to be kept."""
        return (self.cfg.validation.keep_checkpoints and self.validator is not None
                and self.validator.due(self.global_step))

    def end_of_training(self) -> None:
        """The final sweep grid and the loss history the report draws."""
        if self.validator is not None:
            self.validator.finish()
        self.runlog.write_history()
