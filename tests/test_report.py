"""report.html: written after training, every referenced file exists, the loss curve, and (with chromium)
that it renders in a real headless browser with every image loaded."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from dreambooth.report.page import loss_svg, smooth, write_report
from dreambooth.training.trainer import run_training


class Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.refs.append(a["src"])
        if tag == "a" and "href" in a:
            self.refs.append(a["href"])


def refs_of(page: str) -> list[str]:
    parser = Refs()
    parser.feed(page)
    return parser.refs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run with validation, through run_training (which writes the report)."""
    from dreambooth.config import config_from_dict
    from dreambooth.demo import write_demo_dataset
    root = tmp_path_factory.mktemp("report")
    data = write_demo_dataset(root / "data", n=4, size=48)
    cfg = config_from_dict({"model": "builtin:tiny", "output_dir": str(root / "out"), "data": {"dir": str(data)},
                            "resolution": 32, "max_steps": 6, "learning_rate": 1e-3, "center_crop": True,
                            "gradient_checkpointing": False, "quiet": True,
                            "validation": {"steps": [3, 6], "num_inference_steps": 2}})
    run_training(cfg)
    return Path(cfg.output_dir)


def test_report_exists_and_every_reference_resolves(run):
    page = (run / "report.html").read_text()
    refs = refs_of(page)
    assert "validation/sweep.png" in refs
    assert sum(r.startswith("report_files/") for r in refs) == 4  # one thumbnail per training image
    for ref in refs:
        assert not re.match(r"^([a-z]+:|/)", ref), f"not relative: {ref}"
        assert (run / unquote(ref)).is_file(), ref


def test_report_content(run):
    page = (run / "report.html").read_text()
    assert page.count("<polyline") == 2  # instance loss raw + smoothed (no prior loss in this run)
    assert "max_steps: 6" in page  # the resolved config
    assert "instance prompt <b>a photo of riobugger toy</b>" in page  # from dataset_info.json
    assert "peak_memory_bytes" in page and "GiB" in page and "wall_time_s" in page
    history = json.loads((run / "loss_history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 7))
    assert {"loss", "instance_loss", "lr", "grad_norm"} <= set(history[0])


def test_report_reads_each_subjects_prompts_once(run, monkeypatch):
    from dreambooth.report import page as report
    calls = []
    real = report.prompts_as_trained
    monkeypatch.setattr(report, "prompts_as_trained", lambda *a: calls.append(a) or real(*a))
    page = write_report(run).read_text()
    assert len(calls) == 1  # one subject: its dataset_info.json serves the header and the thumbnails alike
    assert "Prompts: a photo of riobugger toy" in page and "instance prompt <b>a photo of riobugger toy</b>" in page


def test_report_without_validation_or_history(tmp_path):
    (tmp_path / "config.yaml").write_text("model: m\ndata:\n  dir: /nowhere\n")
    page = write_report(tmp_path).read_text()
    assert "No validation images" in page and "No loss history" in page and "not found" in page
    assert refs_of(page) == []


def test_loss_curve_draws_instance_and_prior_smoothed():
    history = [{"step": s, "loss": 1.0, "instance_loss": 0.6, "prior_loss": 0.4} for s in range(1, 21)]
    svg = loss_svg(history, marks=[10])
    assert svg.count("<polyline") == 4 and "prior loss" in svg and "validation at step 10" in svg
    assert smooth([2.0] * 5) == pytest.approx([2.0] * 5)  # bias-corrected: no ramp-up from zero
    assert smooth([0.0] * 50 + [1.0] * 50)[-1] > 0.9


def _browser():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not _browser(), reason="chromium is not installed")
def test_report_renders_in_headless_chromium(run, tmp_path):
    url = (run / "report.html").as_uri()
    flags = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--virtual-time-budget=5000"]
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    # The page's own check sets data-broken-images once every image has loaded or failed.
    assert 'data-broken-images="0"' in dom, dom[:500]
    shot = tmp_path / "report.png"
    subprocess.run(flags + ["--window-size=1100,1800", f"--screenshot={shot}", url], capture_output=True,
                   timeout=120)
    from PIL import Image
    image = Image.open(shot)
    assert image.size == (1100, 1800) and sum(1 for n in image.convert("L").histogram() if n) > 20  # not a blank page
