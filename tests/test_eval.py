"""Evaluation: DreamBench-style prompts, DINO / CLIP-I / CLIP-T on tiny random CLIP and ViT models (built from
configs, no hub), the recommended-step rule, loss and drift after training, scored validation in the summary,
the report and `dreambooth export --step best`, and the `dreambooth eval` command."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_bits_equal
from PIL import Image

from dreambooth.config import config_from_dict
from dreambooth.demo import write_demo_dataset
from dreambooth.errors import UserError
from dreambooth.eval import metrics
from dreambooth.eval.best import recommend
from dreambooth.eval.models import Clip, Dino, require
from dreambooth.eval.prompts import LIVE, OBJECT, SubjectText, kind_of, read_templates, templates_for
from dreambooth.training.trainer import Trainer, run_training

ALL = ["loss", "drift", "dino", "clip_i", "clip_t"]


# ------------------------------------------------------------------------------------------------ prompts

def test_prompt_sets_and_the_subject_they_name(tmp_path):
    assert len(OBJECT) == len(LIVE) == 25 and len(set(OBJECT)) == 25
    assert sum("wearing" in t or "outfit" in t for t in LIVE) == 10 and not any("outfit" in t for t in OBJECT)
    toy = SubjectText.from_prompts("a photo of riobugger toy", "a photo of a toy")
    assert (toy.phrase, toy.noun) == ("riobugger toy", "toy")
    prompt = toy.fill("a {subject} in the jungle")
    assert prompt == "a riobugger toy in the jungle" and toy.neutral(prompt) == "a toy in the jungle"
    assert toy.names("A Riobugger  Toy on the beach") and not toy.names("a photo of a toy")
    assert SubjectText.from_prompts("sks dog").noun == "dog"  # no class prompt: the last word
    with pytest.raises(UserError, match="--class-noun"):
        SubjectText.from_prompts("sks")
    assert kind_of("dog") == "live" and kind_of("toy") == "object"
    assert templates_for("auto", SubjectText("sks dog", "dog")) == ("live", LIVE)
    file = tmp_path / "prompts.txt"
    file.write_text("# mine\na {subject} on the moon\n\na {subject} in space\n")
    assert read_templates(file) == ["a {subject} on the moon", "a {subject} in space"]
    file.write_text("a dog on the moon\n")
    with pytest.raises(UserError, match="line 1.*{subject}"):
        read_templates(file)


# ------------------------------------------------------------------------------------------------ scores

def _pictures(folder: Path, n: int, seed: int) -> list[Image.Image]:
    files = sorted(write_demo_dataset(folder, n=n, size=48, seed=seed).glob("*.png"))
    return [Image.open(p).convert("RGB") for p in files]


def test_identical_image_sets_score_one_and_scores_are_deterministic(metric_models, tmp_path):
    clip_dir, dino_dir = metric_models
    clip, dino = Clip(str(clip_dir)), Dino(str(dino_dir))
    one, others = _pictures(tmp_path / "one", 1, seed=0)[0], _pictures(tmp_path / "others", 3, seed=1)
    for model in (clip, dino):
        same = model.images([one] * 3)
        assert metrics.mean_pairwise(same, model.images([one] * 2)) == pytest.approx(1.0, abs=1e-6)
        assert metrics.self_similarity(same) == pytest.approx(1.0, abs=1e-6)
        assert metrics.mean_pairwise(model.images(others), same) < 1 - 1e-4
        assert torch.equal(model.images(others), model.images(others))  # the same images, the same embeddings
    assert metrics.self_similarity(dino.images([one])) is None
    texts = clip.texts(["a toy in the jungle", "a toy"])
    assert texts.shape == (2, 16) and torch.equal(texts, clip.texts(["a toy in the jungle", "a toy"]))
    assert -1 <= metrics.paired(clip.images(others[:2]), texts) <= 1


def test_recommended_step_follows_the_rule():
    table = {50: {"dino": 0.50, "clip_t": 0.310}, 100: {"dino": 0.60, "clip_t": 0.305},
             200: {"dino": 0.70, "clip_t": 0.290}, 400: {"dino": 0.75, "clip_t": 0.250}}
    assert recommend(table, margin=0.01)["step"] == 100  # 200 and 400 fell more than 0.01 below step 50's
    assert recommend(table, margin=0.03)["step"] == 200
    assert recommend(table, margin=1.0)["step"] == 400
    assert recommend(table, margin=0.0)["step"] == 50
    tie = {"10": {"dino": 0.7, "clip_t": 0.3}, "20": {"dino": 0.7, "clip_t": 0.3}}  # index.json's string keys
    best = recommend(tie, 0.01)
    assert best["step"] == 10 and best["clip_t_floor"] == pytest.approx(0.29) and "highest DINO" in best["rule"]
    assert recommend({5: {"loss": 0.1}}, 0.01) is None
    assert recommend({5: {"dino": 0.5, "clip_t": 0.2}, 9: {"dino": 0.9}}, 0.01)["step"] == 5


def test_missing_metric_models_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        require({"CLIP": "nobody/no-clip", "DINO": str(tmp_path / "no-dino")}, "eval.clip_model / eval.dino_model")
    text = str(e.value)
    assert "nobody/no-clip (CLIP)" in text and "no-dino (DINO)" in text and "eval.clip_model" in text
    assert "\n" not in text


def test_metric_config_is_checked(make_cfg):
    with pytest.raises(UserError, match="'validation.metrics' has unknown \\['fid'\\]; choose from loss, drift"):
        make_cfg(**{"validation.enabled": True, "validation.metrics": ["dino", "fid"]})
    with pytest.raises(UserError, match="validation.enabled: true"):
        make_cfg(**{"validation.metrics": ["loss"]})  # validation is off in make_cfg
    with pytest.raises(UserError, match="nobody/clip.*eval.clip_model"):
        Trainer(make_cfg(**{"validation.enabled": True, "validation.metrics": ["clip_t"],
                            "eval.clip_model": "nobody/clip"}))


# ------------------------------------------------------------------------------------------------ trained runs

def _cfg(root: Path, data: Path, name: str, metric_models, **extra) -> dict:
    clip, dino = metric_models
    cfg = {"model": "builtin:tiny", "output_dir": str(root / name), "data": {"dir": str(data)}, "resolution": 32,
           "max_steps": 4, "learning_rate": 1e-3, "center_crop": True, "gradient_checkpointing": False,
           "quiet": True, "num_class_images": 4, "class_sampling_steps": 2,
           "eval": {"clip_model": str(clip), "dino_model": str(dino)},
           "validation": {"steps": [2, 4], "num_inference_steps": 1, "metrics": ALL}}
    for key, value in extra.items():
        node, parts = cfg, key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory, metric_models):
    """Two scored runs on one subject, same seed and steps: with prior preservation (which samples the class
    images, keeping a checkpoint at each validated step) and without (scored on those class images)."""
    root = tmp_path_factory.mktemp("eval")
    data = write_demo_dataset(root / "data", n=4, size=48)
    prior = run_training(config_from_dict(_cfg(root, data, "prior", metric_models, with_prior_preservation=True,
                                               **{"validation.keep_checkpoints": True})))
    plain = run_training(config_from_dict(_cfg(root, data, "plain", metric_models)))
    return {"root": root, "data": data, "prior": prior, "plain": plain}


def test_loss_falls_and_prior_preservation_keeps_drift_smaller(runs):
    for name in ("prior", "plain"):
        scoring = runs[name]["validation_scores"]
        losses = [scoring["scores"][s]["loss"] for s in ("2", "4")]
        assert scoring["base"]["loss"] > losses[0] > losses[-1], (name, losses)
        assert set(scoring["scores"]["4"]) == {"loss", "class_loss", "drift", "dino", "clip_i", "clip_t"}
    drift = {name: runs[name]["validation_scores"]["scores"]["4"]["drift"] for name in ("prior", "plain")}
    assert drift["prior"] < drift["plain"], drift
    # Both measured against the same base model on the same class images.
    assert runs["prior"]["validation_scores"]["base"] == pytest.approx(runs["plain"]["validation_scores"]["base"])


def test_scores_reach_index_summary_log_and_report(runs):
    out = runs["root"] / "prior"
    index = json.loads((out / "validation" / "index.json").read_text())
    summary = json.loads((out / "train_summary.json").read_text())
    assert index["scores"] == summary["validation_scores"]["scores"] and set(index["scores"]) == {"2", "4"}
    assert index["done"]["2"]["scores"] == index["scores"]["2"]
    best = recommend(index["scores"], 0.01)
    assert index["recommended"] == best and summary["recommended_step"] == best["step"]
    assert set(index["reference"]) == {"dino", "clip_i"} and 0 < index["reference"]["dino"] <= 1
    assert (out / "train.log").read_text().count("validation scores at step") == 2
    page = (out / "report.html").read_text()
    assert page.count('class="metric"') == 5 and page.count('class="recommended"') == 5
    assert f"Recommended step: <b>{best['step']}</b>" in page and "<tr class=best>" in page


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no chromium")
def test_report_charts_render_in_headless_chromium(runs):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    url = (runs["root"] / "prior" / "report.html").as_uri()
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          "--virtual-time-budget=3000", "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    assert 'data-broken-images="0"' in dom, dom[:300]
    assert dom.count('class="metric"') == 5 and dom.count("<circle") == 10 and "(recommended)" in dom


def test_export_step_best_writes_that_steps_model(runs, capsys):
    from safetensors.torch import load_file

    from dreambooth.cli import main
    out, step = runs["root"] / "prior", runs["prior"]["recommended_step"]
    assert main(["export", str(out), "--step", "best", "--out", str(runs["root"] / "best")]) == 0
    assert capsys.readouterr().out.strip() == str(runs["root"] / "best")
    exported = load_file(runs["root"] / "best" / "unet" / "diffusion_pytorch_model.safetensors")
    kept = load_file(out / "checkpoints" / f"step-{step:06d}" / "weights.safetensors")
    assert_bits_equal(exported, {k.removeprefix("unet."): v for k, v in kept.items()})
    assert json.loads((runs["root"] / "best" / "train_summary.json").read_text())["steps"] == step
    assert main(["export", str(runs["root"] / "plain"), "--step", "best"]) == 2  # no checkpoints kept there
    assert "validation.keep_checkpoints: true" in capsys.readouterr().err


def test_eval_command_writes_json_and_table_deterministically(runs, metric_models, capsys):
    from dreambooth.cli import main
    clip, dino = metric_models
    run = runs["root"] / "plain"
    args = ["eval", str(run), "--clip-model", str(clip), "--dino-model", str(dino), "--images-per-prompt", "1",
            "--num-inference-steps", "1", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| subject | DINO | CLIP-I | CLIP-T |" in printed
    assert "| paper: DreamBooth (Stable Diffusion) | 0.668 | 0.803 | 0.305 |" in printed
    result = json.loads((run / "eval" / "eval.json").read_text())
    (subject,) = result["subjects"]
    assert subject["prompt_set"] == "object" and len(subject["prompts"]) == 25
    assert subject["prompts"][0]["clip_t_prompt"] == "a toy in the jungle"
    assert all((run / "eval" / f).is_file() for p in subject["prompts"] for f in p["images"])
    assert 0 < subject["dino"] <= 1 and 0 < subject["real_clip_i"] <= 1 and "drift" in subject
    # The trained model's loss here is the last validation's: same images, seed and noise.
    assert subject["loss"] == pytest.approx(runs["plain"]["validation_scores"]["scores"]["4"]["loss"], rel=1e-5)
    assert (run / "eval" / "eval.md").read_text().startswith("| subject |") and "random weights" in result["note"]
    # A file of templates; its two prompts are the object list's first two, so with the same seed they must
    # come out as the first run's: the same images, the same scores (up to float rounding: other batch sizes).
    prompts = runs["root"] / "two.txt"
    prompts.write_text("# the first two scenes\na {subject} in the jungle\na {subject} in the snow\n")
    assert main(args + ["--prompts", str(prompts), "--out", str(runs["root"] / "again")]) == 0
    again = json.loads((runs["root"] / "again" / "eval.json").read_text())["subjects"][0]
    assert [p["prompt"] for p in again["prompts"]] == ["a riobugger toy in the jungle", "a riobugger toy in the snow"]
    for first, second in zip(subject["prompts"][:2], again["prompts"]):
        pixels = [Image.open(root / p["images"][0]).tobytes() for root, p in
                  ((run / "eval", first), (runs["root"] / "again", second))]
        assert pixels[0] == pixels[1]
        for key in ("dino", "clip_i", "clip_t"):
            assert first[key] == pytest.approx(second[key], rel=1e-6)
    assert again["loss"] == subject["loss"] and again["drift"] == subject["drift"]


def test_eval_without_metric_models_stops_before_generating(runs, capsys, monkeypatch):
    from dreambooth.cli import main
    from dreambooth.eval import run as eval_run
    monkeypatch.setattr(eval_run, "_pipeline", lambda req: pytest.fail("generated before checking the models"))
    assert main(["eval", "builtin:tiny", "--data", str(runs["data"])]) == 2
    err = capsys.readouterr().err
    assert "openai/clip-vit-base-patch32 (CLIP), facebook/dino-vits16 (DINO)" in err and "--clip-model" in err
    assert main(["eval", "builtin:tiny"]) == 2 and "--data DIR" in capsys.readouterr().err


def test_scores_go_to_the_tracker_and_the_log(caplog):
    """RunLog.validated: one log line with every score, and `validation/<score>` scalars for TensorBoard."""
    import logging

    from dreambooth.training.runlog import RunLog
    logged = []

    class Tracking:
        is_main_process, trackers = False, []  # no train.log file: the line is read from the progress logger

        def log(self, values, step):
            logged.append((step, values))
    log = RunLog.__new__(RunLog)
    log.tracking, log.accelerator, log._last_time = True, Tracking(), 0.0
    caplog.set_level(logging.INFO, logger="dreambooth.progress")
    log.validated(200, {}, 1.5, {"loss": 0.12345, "drift": -0.01, "dino": 0.7})
    assert logged == [(200, {"validation/loss": 0.12345, "validation/drift": -0.01, "validation/dino": 0.7})]
    assert "validation scores at step 200: loss 0.1235  drift -0.0100  dino 0.7000" in caplog.text
    assert log._last_time == 1.5  # its time kept out of s/step, as for any validation
