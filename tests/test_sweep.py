"""Sweeps without Ray: the grid's trials as plain configs, one trial run, stopped and resumed, and the summary."""

import csv
import json
from pathlib import Path

import pytest
from conftest import second_subject

from dreambooth.cli import main
from dreambooth.errors import UserError
from dreambooth.models.builtin import TINY_RESOLUTION
from dreambooth.sweep import grid, summary
from dreambooth.sweep.trial import RECORD, STOP_FILE, check_metric, loss_metrics, metric_mode, run_trial
from dreambooth.training.signals import Interrupted
from dreambooth.training.trainer import run_training


def tiny_base(out, subject=None, **extra) -> dict:
    data = {"model": "builtin:tiny", "output_dir": str(out), "resolution": TINY_RESOLUTION, "center_crop": True,
            "gradient_checkpointing": False, "validation": {"enabled": False}, "learning_rate": 1e-3, **extra}
    if subject:
        data["data"] = {"dir": str(subject)}
    return data


def test_parse_grid_forms_and_mistakes():
    g = grid.parse_grid(["learning_rate=[1e-6, 2e-6]", "max_steps=50,100", "train_text_encoder=[true]"])
    assert g == {"learning_rate": ["1e-6", "2e-6"], "max_steps": [50, 100], "train_text_encoder": [True]}
    for item, said in [("learning_rate", "KEY=[v1,v2"), ("max_steps=[]", "at least one value"),
                       ("output_dir=[a,b]", "sweep folder"), ("resume=[latest]", "resumes each"),
                       ("data.dir=[a,b]", "--subjects"), ("max_steps=[1,1]", "listed twice"),
                       ("max_steps=[1, 2", "not a valid list")]:
        with pytest.raises(UserError, match=said.replace("[", r"\[")):
            grid.parse_grid([item])
    with pytest.raises(UserError, match="given twice"):
        grid.parse_grid(["max_steps=[1]", "max_steps=[2]"])


def test_expand_is_the_subjects_times_the_grid_product(tmp_path, subject_dir, monkeypatch):
    dog = second_subject(tmp_path)
    parent = tmp_path / "customers"
    parent.mkdir()
    (parent / "cat").symlink_to(subject_dir, target_is_directory=True)
    (parent / "dog").symlink_to(dog, target_is_directory=True)
    subjects = grid.find_subjects([str(parent)])  # a folder of subject folders stands for them
    assert [s.name for s in subjects] == [Path(subject_dir).name, "dog"]
    monkeypatch.chdir(tmp_path)
    g = grid.parse_grid(["learning_rate=[1e-3,1e-4]", "max_steps=[2,4]"])
    trials = grid.expand(tiny_base("sweeps/lr"), g, subjects, checkpoint_steps=2)
    assert len(trials) == 8 and len({t.dir for t in trials}) == 8
    first = trials[0]
    assert first.name == f"{Path(subject_dir).name},learning_rate-1e-3,max_steps-2"
    assert first.settings == {"subject": Path(subject_dir).name, "learning_rate": "1e-3", "max_steps": 2}
    assert first.dir == str(tmp_path / "sweeps" / "lr" / first.name)  # absolute: Tune runs trials elsewhere
    cfg = trials[-1].config()
    assert (cfg.learning_rate, cfg.max_steps, cfg.checkpoint_steps, cfg.quiet) == (1e-4, 4, 2, True)
    assert Path(cfg.data.dir) == subjects[1]
    # The config's own checkpoint interval wins over the sweep's default; without either, 100.
    assert grid.expand(tiny_base("s", checkpoint_steps=3), g, subjects)[0].config().checkpoint_steps == 3
    assert grid.expand(tiny_base("s", subject_dir), {})[0].config().checkpoint_steps == grid.DEFAULT_CHECKPOINT_STEPS
    assert grid.expand(tiny_base("s", subject_dir), {})[0].name == "trial"


def test_expand_refuses_before_any_trial_runs(tmp_path, subject_dir):
    base = tiny_base(tmp_path / "s", subject_dir)
    with pytest.raises(UserError, match=r"--grid learnig_rate=\[1,2\].*did you mean 'learning_rate'") as e:
        grid.expand(base, grid.parse_grid(["learnig_rate=[1,2]"]))
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(UserError, match="'learning_rate' must be > 0"):
        grid.expand(base, grid.parse_grid(["learning_rate=[1e-3,-1]"]))
    with pytest.raises(UserError, match="remove 'data.dir' when --subjects"):
        grid.expand(base, {}, [Path(subject_dir)])
    with pytest.raises(UserError, match="remove 'resume'"):
        grid.read_base(None, ["resume=latest"])
    with pytest.raises(UserError, match="no such folder"):
        grid.find_subjects([str(tmp_path / "missing")])


def test_class_images_are_topped_up_once_per_subject_before_the_trials(tmp_path, subject_dir):
    dog = second_subject(tmp_path)
    base = tiny_base(tmp_path / "s", with_prior_preservation=True)
    trials = grid.expand(base, grid.parse_grid(["num_class_images=[2,5]", "learning_rate=[1e-3,1e-4]"]),
                         [Path(subject_dir), dog])
    jobs = grid.class_image_jobs(trials)
    assert [(Path(j.data["data"]["dir"]).name, j.settings["num_class_images"]) for j in jobs] == \
        [(Path(subject_dir).name, 5), ("dog", 5)]
    assert grid.class_image_jobs(grid.expand(tiny_base(tmp_path / "s", subject_dir), {})) == []


def test_on_step_stops_the_run_with_a_checkpoint(make_cfg, tmp_path):
    seen = []

    def on_step(state, logs):
        seen.append((state.step, round(logs["loss"], 6)))
        return "enough" if state.step == 2 else None
    with pytest.raises(Interrupted) as stop:
        run_training(make_cfg(checkpoint_steps=3), on_step)
    assert [s for s, _ in seen] == [1, 2] and stop.value.signal_name == "enough"
    assert stop.value.step == 2 and stop.value.path.name == "step-000002"


def test_a_trial_stopped_by_the_sweep_resumes_then_is_skipped(tmp_path, subject_dir):
    sweep = tmp_path / "sweep"
    trial = grid.expand(tiny_base(sweep, subject_dir, max_steps=4), {}, checkpoint_steps=3)[0]
    stop_file = sweep / STOP_FILE
    reports = []

    def report(metrics):  # the sweep's Ctrl-C arrives while step 2 is reported
        reports.append(metrics)
        if metrics.get("step") == 2 and not reports[:-1]:
            stop_file.write_text("SIGINT")
    first = run_trial(trial, report, stop_file, report_steps=2)
    assert first["status"] == "stopped" and first["checkpoint"].endswith("step-000002")
    assert [r["step"] for r in reports] == [2, 2] and reports[-1]["status"] == "stopped"
    assert run_trial(trial, reports.append, stop_file)["status"] == "not_started"  # still stopping: not started

    stop_file.unlink()
    done = run_trial(trial, reports.append, stop_file, report_steps=2)
    record = json.loads((Path(trial.dir) / RECORD).read_text())
    assert done["status"] == "finished" and done["step"] == 4 and record["attempts"] == 2
    assert record["status"] == "finished" and record["settings"] == {} and record["data"] == trial.data
    assert [r["step"] for r in reports[2:]] == [4, 4]  # resumed at step 2: one progress report, then the result
    history = json.loads((Path(trial.dir) / "loss_history.json").read_text())
    assert done["final_loss"] == history[-1]["loss"] and len(history) == 4
    again = run_trial(trial, reports.append, stop_file)
    assert again["skipped"] and again["final_loss"] == done["final_loss"]


def test_loss_metrics():
    m = loss_metrics([4.0, float("nan")] + [1.0] * 10)
    assert m == {"step": 12, "final_loss": 1.0, "mean_loss": 14 / 11, "recent_loss": 1.0}
    assert loss_metrics([])["final_loss"] is None


def test_summary_files_and_the_best_pick(tmp_path):
    sweep = tmp_path / "sweep"
    trials = [grid.Trial(n, str(sweep / n), {"learning_rate": lr}, {}) for n, lr in
              [("a", 1), ("b", 2), ("c", 3), ("d", 4)]]
    rows = [{"trial": "a", "learning_rate": 1, "status": "finished", "final_loss": 0.5},
            {"trial": "b", "learning_rate": 2, "status": "finished", "final_loss": 0.2},
            {"trial": "c", "learning_rate": 3, "status": "early_stopped", "final_loss": 0.1},  # not a finished run
            {"trial": "d", "learning_rate": 4, "status": "finished", "final_loss": float("nan")}]
    (sweep / "b" / "validation").mkdir(parents=True)
    (sweep / "b" / "validation" / "index.json").write_text(json.dumps({"done": {"2": {"grid": "validation/g2.png"}}}))
    assert summary.write_summary(sweep, trials, rows, "final_loss", "min", "dreambooth sweep x.yaml") == "b"
    assert summary.best_trial(rows, "final_loss", "max") == "a"
    table = list(csv.DictReader(open(sweep / summary.CSV)))
    assert [(r["trial"], r["best"]) for r in table] == [("a", "False"), ("b", "True"), ("c", "False"), ("d", "False")]
    saved = json.loads((sweep / summary.JSON).read_text())
    assert saved["best"] == "b" and saved["metric"] == "final_loss" and len(saved["trials"]) == 4
    page = (sweep / summary.HTML).read_text()
    assert "<b>b</b>" in page and 'src="b/validation/g2.png"' in page and "<th>step 2</th>" in page
    assert page.count("class=best") == 2  # its table row and its row of grids


def test_a_trial_its_scheduler_stops_checkpoints_and_reports_no_more(tmp_path, subject_dir):
    trial = grid.expand(tiny_base(tmp_path / "sweep", subject_dir, max_steps=4), {}, checkpoint_steps=3)[0]
    reports = []

    def report(metrics):  # what Tune's report does in a trial that ASHA has just stopped
        reports.append(metrics)
        if metrics["step"] == 2:
            raise SystemExit(0)
    result = run_trial(trial, report, None, report_steps=1)
    assert result["status"] == "early_stopped" and result["checkpoint"].endswith("step-000002")
    assert [r["step"] for r in reports] == [1, 2]  # nothing after the stop
    assert json.loads((Path(trial.dir) / RECORD).read_text())["status"] == "early_stopped"
    # Any trial is a normal run: this one goes on alone, from its checkpoint, with `dreambooth train`.
    assert main(["train", str(Path(trial.dir) / "config.yaml"), "resume=latest"]) == 0
    assert json.loads((Path(trial.dir) / "train_summary.json").read_text())["steps"] == 4


def test_validation_scores_are_metrics_a_sweep_can_rank_by(tmp_path, subject_dir):
    validation = {"enabled": True, "steps": [2, 4], "num_inference_steps": 2, "metrics": ["loss"]}
    trial = grid.expand(tiny_base(tmp_path / "sweep", subject_dir, max_steps=4, validation=validation), {})[0]
    reports = []
    result = run_trial(trial, reports.append, None, report_steps=3)
    # Reported at every report_steps and at each scored validation step, with that step's score.
    assert [(r["step"], "validation_loss" in r) for r in reports] == [(2, True), (3, False), (4, True), (4, True)]
    index = json.loads((Path(trial.dir) / "validation" / "index.json").read_text())
    assert result["validation_loss"] == index["done"]["4"]["scores"]["loss"] == reports[2]["validation_loss"]
    check_metric("validation_loss", [trial])
    with pytest.raises(UserError, match="do not score dino .*validation.metrics=\\[dino\\]"):
        check_metric("validation_dino", [trial])
    with pytest.raises(UserError, match="choose one of final_loss"):
        check_metric("fid", [trial])
    assert (metric_mode("validation_dino"), metric_mode("validation_drift"), metric_mode("final_loss")) == \
        ("max", "min", "min")
    row = summary.trial_row(trial)
    assert row["validation_loss"] == result["validation_loss"] and "validation_dino" not in row
