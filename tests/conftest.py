"""Shared fixtures: tiny offline models and JumpStart-format folders, built once per test session."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# compile_cache: auto keeps compiled code under $DREAMBOOTH_CACHE: a scratch folder, never the user's ~/.cache.
os.environ["DREAMBOOTH_CACHE"] = tempfile.mkdtemp(prefix="dreambooth-test-cache-")
atexit.register(shutil.rmtree, os.environ["DREAMBOOTH_CACHE"], True)

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from dreambooth.config import config_from_dict  # noqa: E402
from dreambooth.demo import write_demo_dataset  # noqa: E402
from dreambooth.models.builtin import TINY_RESOLUTION  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --- comparing weights -------------------------------------------------------------------------------------------

def final_unet(out: Path) -> dict:
    """The UNet weights a finished run wrote to its output folder."""
    return load_file(Path(out) / "unet" / "diffusion_pytorch_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts, which must hold the same keys."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_bits_equal(a, b):
    """Nested dicts/lists of tensors and plain values, equal bit for bit (tensors by their bytes; dicts by their
    keys too, lists by their length)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_bits_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_bits_equal(x, y)
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))
        assert torch.equal(a, b)  # as strict as torch.equal too: a NaN never counts as equal to itself
    else:
        assert a == b


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny SD pipeline folder (diffusers layout, safetensors), shared by the whole session."""
    from dreambooth.models.builtin import save_tiny_pipeline
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-model") / "model", seed=0)


@pytest.fixture
def subject_dir(tmp_path):
    """A JumpStart-format folder: 4 synthetic images plus dataset_info.json."""
    return write_demo_dataset(tmp_path / "subject", n=4, size=48)


def second_subject(tmp_path, prompt="a photo of zwx dog", klass="a photo of a dog"):
    """A second JumpStart-format subject folder, tmp_path/dog: 2 images (another seed) and its own prompts."""
    folder = write_demo_dataset(tmp_path / "dog", n=2, size=48, seed=1)
    (folder / "dataset_info.json").write_text(json.dumps({"instance_prompt": prompt, "class_prompt": klass}))
    return folder


def two_subjects(make_cfg, subject_dir, dog, **overrides):
    """A Config training `subject_dir` and `dog` as two subjects (data.dir unset)."""
    return make_cfg(**{"data.dir": None, "subjects": [{"dir": str(subject_dir)}, {"dir": str(dog)}], **overrides})


@pytest.fixture
def make_cfg(tmp_path, subject_dir):
    """Build a validated tiny-training Config; keyword overrides use dotted keys as in the CLI."""
    def make(**overrides):
        data = {"model": "builtin:tiny", "output_dir": str(tmp_path / "out"), "data": {"dir": str(subject_dir)},
                "resolution": TINY_RESOLUTION, "max_steps": 4, "learning_rate": 1e-3, "center_crop": True,
                "gradient_checkpointing": False, "validation": {"enabled": False}, "quiet": True}
        for key, value in overrides.items():
            node, parts = data, key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        return config_from_dict(data)
    return make


@pytest.fixture(autouse=True)
def fresh_base_model_checks(monkeypatch):
    """Each test's hub is its own: an SD 2.1 base check passed in an earlier test does not count."""
    from dreambooth.models import base_model
    monkeypatch.setattr(base_model, "PASSED_IDS", set())


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and spinning OpenMP threads slow them badly when
    another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def metric_models(tmp_path_factory):
    """(CLIP folder, DINO ViT folder): tiny random-weight models built from configs, saved with their image
    processors (and CLIP's tokenizer, the packaged tiny one) like the hub's, for the eval metrics."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, ViTConfig, ViTImageProcessor,
                              ViTModel)

    from dreambooth.models.builtin import asset_path
    root = tmp_path_factory.mktemp("metric-models")
    tokenizer = CLIPTokenizer.from_pretrained(asset_path("tokenizer"))
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(tower, vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(tower, image_size=32, patch_size=8),
                                    projection_dim=16))
        dino = ViTModel(ViTConfig(**tower, image_size=32, patch_size=8), add_pooling_layer=False)
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    dino.save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    return root / "clip", root / "dino"
