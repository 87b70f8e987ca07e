"""The Trainer: plans the run, composes its parts (inputs, step, checkpoints, validation, log), runs the loop and
saves the result. run_training() is the whole job: setup -> train -> save -> report."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from dreambooth.config.machine import Machine
from dreambooth.config.parse import save_config
from dreambooth.config.plan import resolve
from dreambooth.config.schema import Config, is_adapter
from dreambooth.data.subjects import resolve_subjects
from dreambooth.data.training_set import TrainingSet
from dreambooth.errors import UserError
from dreambooth.export.formats import export_run
from dreambooth.export.output_dir import check_output_dir, lock_output_dir, mark_output_dir, write_pipeline
from dreambooth.files import write_json_atomic
from dreambooth.models.load import load_components, load_frozen, sd_pipeline
from dreambooth.report.page import write_report
from dreambooth.training.checkpoint import Checkpointer, any_process, named_trainable
from dreambooth.training.compiling import CompileCache, compile_unet
from dreambooth.training.ema import EMA
from dreambooth.training.inputs import Inputs
from dreambooth.training.optim import make_optimizer
from dreambooth.training.phases import Phases
from dreambooth.training.placement import place_components, set_backends
from dreambooth.training.resume import resolve_resume
from dreambooth.training.runlog import RunLog, run_summary, tracker_kwargs
from dreambooth.training.scoring import ValidationScorer, check_scoring
from dreambooth.training.signals import Interrupted, StopSignals
from dreambooth.training.state import SubjectStats, TrainState
from dreambooth.training.step import TrainStep
from dreambooth.training.validation import Validator, config_prompts, preserved_training_state

log = logging.getLogger(__name__)
# Called after each optimisation step (its checkpoint and validation done) with the state and the step's logs
# (on a scored validation step, with "validation": its scores); a truthy return stops the run as Ctrl-C does
# (checkpoint, Interrupted), a str naming the reason.
OnStep = Callable[[TrainState, dict], "str | bool | None"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Trainer:
    """DreamBooth fine-tuning of one SD pipeline: Trainer(cfg) plans, setup() builds, train() runs, save() writes."""

    def __init__(self, cfg: Config, machine: Machine | None = None, on_step: OnStep | None = None):
        self.cfg = cfg
        self.on_step, self.stop_reason = on_step, None
        self.compile_cache = CompileCache(None, "")  # the plan's cache folder once the UNet is compiled
        self.out = check_output_dir(cfg.output_dir)
        self.lock = lock_output_dir(self.out)  # held until close() or the process ends (however it ends)
        try:
            # Everything that can refuse the run does so here, before anything is written or sampled.
            self.subjects = resolve_subjects(cfg)  # once per run; validation and export get them from here
            self.training_set = TrainingSet(cfg, self.subjects)
            self.plan = resolve(cfg, machine or Machine.detect(), self.training_set.epoch_items())
            self.resume_from = resolve_resume(self.plan, self.out)
            if cfg.validation.enabled and cfg.validation.metrics:
                check_scoring(cfg, self.subjects, config_prompts(cfg, self.subjects))
        except BaseException:
            self.close()
            raise
        self.state = TrainState()
        self.wall_time = 0.0
        self.phases = Phases()  # wall time of class sampling, model load, setup, validation (bench --job)

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        """Build the run's parts; a failure here ends the run, so output_dir is let go at once."""
        try:
            return self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> "Trainer":
        with self.phases("class_images"):
            self.dataset = self.training_set.build()  # samples missing class images first, then frees the sampler
        with self.phases("model_load"):
            self._load()
        with self.phases("setup"):
            return self._prepare()

    def _load(self) -> None:
        """The model's components on their devices, in their dtypes (compiled lazily, at the first step)."""
        cfg, plan = self.cfg, self.plan
        # accelerate keeps one mixed precision per process; a later run in the same process may use another.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = acc = Accelerator(mixed_precision=plan.precision, cpu=not torch.cuda.is_available(),
                                             **tracker_kwargs(cfg, self.out))
        set_seed(cfg.seed)
        c = self.components = load_components(cfg)
        mark_output_dir(self.out)
        save_config(plan, self.out / "config.yaml")  # auto keys stay auto; this machine's choices in comments
        self.runlog = RunLog(plan, self.out, acc, resumed=self.resume_from is not None)

        self.weight_dtype = DTYPES[plan.precision] if plan.precision != "no" else torch.float32
        master = DTYPES[plan.memory.master_weights]
        self._place_models(c, acc.device, master)

    def _prepare(self) -> "Trainer":
        """Caches, optimizer, checkpoints, validation: the rest of setup."""
        cfg, plan, acc, c = self.cfg, self.plan, self.accelerator, self.components
        self.inputs = Inputs(plan, self.dataset, c, acc.device, self.weight_dtype, acc.process_index,
                             acc.num_processes)
        self.inputs.fill_caches(self.training_set.prompts())

        trainable = [c.unet, c.text_encoder] if plan.trains_text_encoder else [c.unet]
        params = [p for m in trainable for p in m.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, plan)
        paramwise = optimizer if plan.memory.paramwise else None  # bf16 weights and/or steps inside backward
        schedule = cfg.lr_scheduler
        if schedule == "constant" and cfg.lr_warmup_steps:  # diffusers' plain constant would drop the warm-up
            schedule = "constant_with_warmup"
        lr_scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                     num_training_steps=plan.total_steps)
        prepared = acc.prepare(*trainable, optimizer)
        self.unet, optimizer = prepared[0], prepared[-1]
        if plan.trains_text_encoder:
            c.text_encoder = prepared[1]
        modules = {"unet": self.unet, "text_encoder": c.text_encoder, "vae": c.vae}
        named = named_trainable(modules, optimizer, acc.unwrap_model)
        self.ema = self._make_ema(named, paramwise, acc.device) if cfg.ema else None
        self.step = TrainStep(plan, acc, self.inputs, list(prepared[:-1]), optimizer, lr_scheduler, paramwise,
                              params, c.noise_scheduler, self.weight_dtype, ema=self.ema)
        self.checkpoints = Checkpointer(plan, self.out, acc, named, optimizer, lr_scheduler, ema=self.ema)
        self.state.generator = torch.Generator(device=acc.device).manual_seed(cfg.seed + acc.process_index)
        self.state.subjects = SubjectStats([s.name for s in self.subjects], cfg.gradient_accumulation_steps,
                                           cfg.with_prior_preservation)
        scorer = self._scorer()  # before a checkpoint is restored: the base model's scores
        if self.resume_from is not None:  # last, so everything it restores (RNG streams above all) stays put
            self.checkpoints.restore(self.state, self.resume_from)
        self.validator = Validator(cfg, self.subjects, plan.total_steps, self.out, acc, c, self.unet,
                                   self.inputs.encode_prompts, [self.state.generator],
                                   resumed=self.resume_from is not None, scorer=scorer, ema=self.ema) \
            if cfg.validation.enabled else None
        self.runlog.start(self.state.step)
        return self

    def _scorer(self) -> ValidationScorer | None:
        """validation.metrics' scorer (main process), prepared while the model is still the base model."""
        cfg, c = self.cfg, self.components
        if not (cfg.validation.enabled and cfg.validation.metrics and self.accelerator.is_main_process):
            return None
        scorer = ValidationScorer(cfg, self.subjects, self.training_set.instance_images, self.accelerator, c,
                                  self.unet, self.inputs.unet_embeds, self.weight_dtype)
        unwrap = self.accelerator.unwrap_model
        with preserved_training_state([unwrap(self.unet), unwrap(c.text_encoder), c.vae], [self.state.generator]):
            scorer.prepare()
        return scorer

    def _make_ema(self, named, paramwise, device) -> EMA:
        """The average of the trained weights, from their fp32 values (the bf16 profiles' exact master weights), in
        host memory when the plan says so."""
        cfg = self.cfg
        read = {"read": paramwise.master_weight} if paramwise is not None else {}  # else EMA's own fp32 copy
        return EMA(named, cfg.ema_decay, cfg.ema_warmup, "cpu" if self.plan.ema_on_cpu else device, **read)

    def _place_models(self, c, device, master: torch.dtype) -> None:
        """Devices, dtypes and trainability of the components, as the plan asks; the UNet compiled if planned."""
        plan = self.plan
        place_components(c, plan, device, self.weight_dtype, master)
        set_backends(plan)
        if plan.compile:
            if plan.memory.fused_backward:  # a compiled backward hands every gradient over at once
                log.warning("compile: true with memory_profile %s holds all gradients at once, which the optimizer "
                            "step fused into backward exists to avoid: expect more memory", plan.memory.profile)
            main = self.accelerator.is_main_process
            self.compile_cache = CompileCache(plan.compile_cache, plan.compile_entry, main).open()
            compile_unet(c.unet, plan.compile_mode, fall_back=plan.config.compile == "auto", scope=plan.compile_scope)

    def batches(self):
        """The run's batches from where its state stands."""
        return self.inputs.batches(self.state)

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> dict:
        cfg, state = self.cfg, self.state
        start, batches = time.time(), self.batches()
        bar = tqdm(total=self.plan.total_steps, initial=state.step, desc="training", unit="step",
                   disable=cfg.quiet or not self.accelerator.is_local_main_process)
        # Ctrl-C / SIGTERM: finish the step, write a checkpoint, stop (a second one aborts at once).
        with StopSignals() as stop, bar:
            while state.step < self.plan.total_steps:
                step_start = time.perf_counter()
                logs = self.step.run(batches, state)  # reading its loss back waits for the GPU
                self.compile_cache.step_done(time.perf_counter() - step_start)
                state.step += 1
                state.bad_steps = state.bad_steps + 1 if logs.get("skipped") else 0
                self.after_step(logs)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
                bar.update(1)
                if state.bad_steps >= cfg.nan_patience:
                    self._stop_non_finite()
                if self._stop_requested(stop):
                    saved = self.checkpoints.last_step == state.step
                    path = self.checkpoints.last if saved else self.checkpoints.save(state)
                    raise Interrupted(state.step, path, stop.requested or self.stop_reason or "SIGINT")
        self.checkpoints.assert_finite(state, "final model")  # never hand NaN weights to save()
        if self.validator is not None:
            with self.phases("validation"):
                self.validator.finish()  # the final sweep grid
        self.runlog.write_history()
        self.wall_time = time.time() - start
        summary = run_summary(self.plan, state, self.wall_time, self.validator.scoring() if self.validator else None)
        if self.ema is not None:
            summary["ema_updates"] = self.ema.updates
        if self.compile_cache.result is not None:
            summary["compile"] = self.compile_cache.result
        return summary

    def _stop_requested(self, stop: StopSignals) -> bool:
        requested = stop.requested is not None or self.stop_reason is not None
        return any_process(self.accelerator, requested)  # every process stops after the same step

    def after_step(self, logs: dict[str, float]) -> None:
        """After each optimisation step: the loss history, checkpoints, the log, validation at its steps."""
        state, cfg = self.state, self.cfg
        state.losses.append(logs["loss"])
        validating = self.validator is not None and self.validator.due(state.step)
        # A validated step with keep_checkpoints keeps its checkpoint, so any validated step can be exported.
        keep = validating and cfg.validation.keep_checkpoints
        # A checkpoint only after a good step, so the newest one is never inside a NaN streak.
        checkpointed = cfg.checkpoint_steps and state.step % cfg.checkpoint_steps == 0 and not state.bad_steps
        if checkpointed:
            self.checkpoints.save(state, keep=keep)
        self.runlog.step(state.step, logs)
        if checkpointed:  # a process killed later still leaves the loss history up to the checkpoint it resumes
            self.runlog.write_history()
        scores = None
        if validating:
            if keep and self.checkpoints.last_step != state.step:
                self.checkpoints.save(state, keep=True)
            start = time.time()
            with self.phases("validation"):
                images = self.validator.run(state.step)
            scores = self.validator.scores(state.step)
            self.runlog.validated(state.step, images, time.time() - start, scores)
        if self.on_step is not None:  # last: the step's checkpoint and validation images exist by now
            reason = self.on_step(state, {**logs, "validation": scores} if scores else logs)
            if reason:
                self.stop_reason = reason if isinstance(reason, str) else "stop requested"

    def _stop_non_finite(self) -> None:
        last = self.checkpoints.last
        kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was written"
        raise UserError(f"stopped at step {self.state.step}: loss or gradients were NaN/inf for "
                        f"{self.state.bad_steps} steps in a row (nan_patience: {self.cfg.nan_patience}); train with "
                        f"mixed_precision: bf16 or a lower learning_rate (now {self.plan.learning_rate:g}); {kept}")

    # ------------------------------------------------------------------------------------------ output
    def pipeline(self):
        """The trained pipeline: our UNet (and text encoder), the base model's other parts in fp32."""
        c, unwrap = self.components, self.accelerator.unwrap_model
        text_encoder = unwrap(c.text_encoder) if self.plan.trains_text_encoder else None
        vae, base_te = load_frozen(self.cfg) if self.weight_dtype != torch.float32 else (c.vae, c.text_encoder)
        unet = unwrap(self.unet).to("cpu", torch.float32)
        if text_encoder is not None:
            text_encoder.to("cpu", torch.float32)
        self.export_weights_()  # after the cast to fp32, so the average or master values are not rounded
        return sd_pipeline(vae.to("cpu"), (text_encoder or base_te).to("cpu", torch.float32), c.tokenizer, unet,
                           c.scheduler)

    def export_weights_(self) -> None:
        """Make the trained weights what the run exports (for its end): the EMA average when ema is on, else with the
        bf16 profiles the exact fp32 values training kept."""
        if self.ema is not None:
            self.ema.copy_to()
        elif self.step.paramwise is not None:
            self.step.paramwise.export_master_weights_()

    def save(self, summary: dict | None = None) -> Path:
        """Write export_formats beside config.yaml and train_summary.json: the diffusers pipeline (swapped in when
        complete), a LoRA run's LoRA file, single-file and kohya exports (export/formats.py)."""
        if not self.accelerator.is_main_process:
            return self.out
        unwrap = self.accelerator.unwrap_model
        if is_adapter(self.cfg):  # adapter weights are fp32 where they are: the file is written from them
            self.export_weights_()
        pipe = export_run(self.out, self.plan, summary, [s.instance_prompt for s in self.subjects], self.pipeline,
                          unwrap(self.unet), unwrap(self.components.text_encoder))
        if pipe is not None:
            write_pipeline(pipe, self.out)
        if summary is not None:
            write_json_atomic(self.out / "train_summary.json", summary)
        return self.out

    def close(self) -> None:
        """Keep what was compiled; let the next run into output_dir (a lock file in an otherwise empty folder goes,
        with the folder)."""
        self.compile_cache.close()
        if self.lock is not None:
            self.lock.release()


def run_training(cfg: Config, on_step: OnStep | None = None) -> dict:
    """setup -> train -> save -> report.html; returns the summary. on_step: see OnStep."""
    trainer = Trainer(cfg, on_step=on_step)
    try:
        trainer.setup()
        error = None
        try:
            summary = trainer.train()
            trainer.save(summary)
            if trainer.accelerator.is_main_process:
                write_report(trainer.out)
        except BaseException as e:
            error = e
            raise
        finally:
            trainer.runlog.close(error)  # the log file says how the run ended
    finally:
        trainer.close()
    return summary
