"""The `dreambooth` command end to end: demo, train, generate, and one-line errors with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from dreambooth.cli import main
from dreambooth.models.builtin import TINY_RESOLUTION


def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    out = capsys.readouterr().out
    images = sorted((tmp_path / "demo" / "images").glob("*.png"))
    assert len(images) == 2 and str(images[0]) in out
    assert Image.open(images[0]).size == (TINY_RESOLUTION, TINY_RESOLUTION)
    # A second run replaces the earlier demo instead of refusing the folder.
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0


def test_train_then_generate(tmp_path, subject_dir, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: builtin:tiny\ndata:\n  dir: {subject_dir}\nresolution: {TINY_RESOLUTION}\n"
                   "validation:\n  enabled: false\n")
    model = tmp_path / "model"
    assert main(["train", str(cfg), "max_steps=2", f"output_dir={model}", "quiet=true"]) == 0
    assert (model / "model_index.json").is_file()

    payload = tmp_path / "request.json"
    payload.write_text(json.dumps({"prompt": "a photo of riobugger toy", "width": 40, "height": 24,
                                   "num_inference_steps": 2, "num_images_per_prompt": 2, "seed": 7}))
    out_dir = tmp_path / "images"
    assert main(["generate", str(model), "--payload", str(payload), "--prompt", "a", "b",
                 "--num-images-per-prompt", "1", "--scheduler", "ddim", "--out-dir", str(out_dir), "--quiet"]) == 0
    paths = capsys.readouterr().out.split()[-2:]
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["0000-a-seed7.png", "0001-b-seed8.png"]
    image = Image.open(paths[0])
    assert image.size == (40, 24)
    meta = json.loads(image.text["parameters"])
    assert meta["prompt"] == "a" and meta["seed"] == 7 and meta["scheduler"] == "DDIMScheduler"


def run_error(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    cases = [
        (["train", str(tmp_path / "nope.yaml")], "does not exist"),
        (["train", "data.dir=x", "learnig_rate=1"], "did you mean 'learning_rate'"),
        (["train", f"data.dir={tmp_path / 'missing'}", "model=builtin:tiny",
          f"output_dir={tmp_path / 'o'}"], "does not exist"),
        (["generate", str(tmp_path / "no-model"), "--prompt", "x"], "does not exist"),
        (["generate", "builtin:tiny", "--prompt", "x", "--width", "30"], "multiple of 8"),
        (["sweep", "data.dir=x", "--grid", "learnig_rate=[1,2]"], "(--grid learnig_rate=[1,2]): unknown key"),
        (["sweep", "data.dir=x", "--metric", "fid"], "choose one of final_loss"),
        (["sweep", "model=builtin:tiny", "--subjects", str(tmp_path / "none")], "no such folder"),
    ]
    for args, expected in cases:
        code, err = run_error(args, capsys)
        assert code == 2, args
        assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_scripts_are_thin_wrappers(tmp_path):
    result = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts" / "train.py"), str(tmp_path / "nope.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr


def test_config_mistakes_are_answered_before_the_heavy_imports():
    """A bad key is reported at once: torch, diffusers and transformers (seconds to import) are not loaded."""
    code = ("import sys; from dreambooth.cli import main; rc = main(['train', 'data.dir=x', 'learnig_rate=1']); "
            "print(rc, [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "2 []", result.stdout + result.stderr
    assert "did you mean 'learning_rate'" in result.stderr


def test_sweep_mistakes_are_answered_before_torch_or_ray():
    """`dreambooth sweep` checks every trial's config first; torch and Ray (seconds to import) are not loaded."""
    code = ("import sys; from dreambooth.cli import main; rc = main(['sweep', 'data.dir=x', '--grid', "
            "'learnig_rate=[1,2]']); print(rc, [m for m in ('torch', 'ray') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "2 []", result.stdout + result.stderr


def test_generate_passes_revision_and_variant_to_the_hub(tmp_path, monkeypatch, capsys):
    """A hub id loads at the asked revision and variant; a LoRA run's folder uses the ones its base trained on."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file
    seen = []

    def from_pretrained(model, **kw):
        seen.append((model, kw.get("revision"), kw.get("variant")))
        raise OSError("not in the cache")  # no hub here: stop at the load
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", from_pretrained)
    assert main(["generate", "someone/sd-model", "--revision", "v2", "--variant", "fp16", "--prompt", "x"]) == 2
    assert seen[-1] == ("someone/sd-model", "v2", "fp16")
    assert "not in the cache" in capsys.readouterr().err
    run = tmp_path / "lora-run"
    run.mkdir()
    save_file({"x": torch.zeros(1)}, str(run / "pytorch_lora_weights.safetensors"))  # readable; not loaded here
    (run / "config.yaml").write_text("model: someone/sd-model\nrevision: abc123\nvariant: null\n")
    assert main(["generate", str(run), "--prompt", "x"]) == 2
    assert seen[-1] == ("someone/sd-model", "abc123", None)


def test_train_with_mixed_precision_no(tmp_path, subject_dir):
    """`mixed_precision=no`, a listed choice that YAML reads as false, trains (on CPU here)."""
    import yaml
    model = tmp_path / "model"
    assert main(["train", "model=builtin:tiny", f"data.dir={subject_dir}", f"resolution={TINY_RESOLUTION}",
                 "validation.enabled=false", "max_steps=1", "mixed_precision=no", f"output_dir={model}",
                 "quiet=true"]) == 0
    assert yaml.safe_load((model / "config.yaml").read_text())["mixed_precision"] == "no"
    assert json.loads((model / "train_summary.json").read_text())["steps"] == 1
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_train_from_a_jumpstart_job_hyperparameters_file(tmp_path, subject_dir, capsys):
    """Issue 22: a real JumpStart job's hyperparameters dict, pasted in unchanged, trains."""
    import yaml
    from test_config import JUMPSTART_HP
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps(JUMPSTART_HP))
    model = tmp_path / "model"
    assert main(["train", str(hp), "model=builtin:tiny", f"data.dir={subject_dir}", "max_steps=1",
                 f"resolution={TINY_RESOLUTION}", "validation.enabled=false", f"output_dir={model}", "quiet=true"]) == 0
    assert "error" not in capsys.readouterr().err
    saved = yaml.safe_load((model / "config.yaml").read_text())
    assert not [k for k in saved if k.startswith(("sagemaker", "_"))]
    assert (saved["compute_fid"], saved["learning_rate"], saved["epochs"]) == (False, 2e-6, 20)
    assert json.loads((model / "train_summary.json").read_text())["steps"] == 1
