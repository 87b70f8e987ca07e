"""Tests for dreambooth.data.dataset: folder scanning, image loading, prompts, transforms, dataset and collate."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth.data.dataset import (
    DreamBoothDataset,
    ImageTransform,
    collate,
    list_images,
    load_image,
    load_images,
    read_dataset_info,
    resolve_prompts,
)
from dreambooth.errors import UserError


def warnings_from(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "dreambooth.data.dataset" and r.levelno == logging.WARNING]


def save(path, size=(32, 32), color=(200, 100, 50), mode="RGB", **kw):
    Image.new(mode, size, color).save(path, **kw)
    return path


def noise_image(size=(64, 48), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


# --- load_image -------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    img.paste((0, 0, 255), (10, 0, 20, 10))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.mode == "RGB" and out.size == (10, 20)
    top, bottom = np.asarray(out)[2, 5], np.asarray(out)[17, 5]
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_rgba_transparent_becomes_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    img.paste((0, 255, 0, 0), (0, 0, 4, 8))  # left half fully transparent
    img.save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png"))
    assert out.shape == (8, 8, 3)
    assert (out[:, :4] == 255).all()
    assert (out[:, 4:] == [255, 0, 0]).all()


def test_palette_with_transparency_becomes_white(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(load_image(tmp_path / "p.png"))
    assert (out[0, 0] == 255).all() and (out[1, 1] == [10, 20, 30]).all()


@pytest.mark.parametrize(
    "name,mode,color",
    [("gray.png", "L", 128), ("cmyk.jpg", "CMYK", (0, 255, 255, 0)), ("pal.png", "P", 3), ("bw.bmp", "1", 1),
     ("photo.webp", "RGB", (1, 2, 3))],
)
def test_modes_become_rgb(tmp_path, name, mode, color):
    save(tmp_path / name, mode=mode, color=color)
    out = load_image(tmp_path / name)
    assert out.mode == "RGB" and out.size == (32, 32)


def test_cmyk_red_stays_red(tmp_path):
    save(tmp_path / "cmyk.jpg", mode="CMYK", color=(0, 255, 255, 0), quality=95)
    r, g, b = np.asarray(load_image(tmp_path / "cmyk.jpg"))[16, 16].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_16bit_gray_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "g16.png")
    out = np.asarray(load_image(tmp_path / "g16.png"))
    assert out.shape == (8, 8, 3) and abs(int(out[0, 0, 0]) - 128) <= 1


def test_loaded_image_is_detached_from_file(tmp_path):
    save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    (tmp_path / "a.png").unlink()
    assert out.getpixel((0, 0)) == (200, 100, 50)


# --- list_images / load_images ------------------------------------------------------------------------------


def test_list_images_skips_junk_with_one_warning(tmp_path, caplog):
    for name in ["b.png", "a.jpg", "C.JPG", "d.PNG", "e.JpEg", "f.webp", "g.bmp", ".hidden.jpg", "._a.jpg"]:
        save(tmp_path / name)
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    save(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.jpg")
    (tmp_path / "class_data_dir").mkdir()
    save(tmp_path / "class_data_dir" / "c.png")
    (tmp_path / "more").mkdir()
    (tmp_path / "dataset_info.json").write_text('{"instance_prompt": "x"}')
    with caplog.at_level(logging.WARNING):
        found = list_images(tmp_path)
    assert [p.name for p in found] == ["C.JPG", "a.jpg", "b.png", "d.PNG", "e.JpEg", "f.webp", "g.bmp"]
    (msg,) = warnings_from(caplog)
    for name in [".DS_Store", ".ipynb_checkpoints/", "notes.txt", ".hidden.jpg", "._a.jpg", "more/"]:
        assert name in msg
    assert "class_data_dir" not in msg and "dataset_info.json" not in msg


def test_list_images_clean_folder_no_warning(tmp_path, caplog):
    save(tmp_path / "a.png")
    with caplog.at_level(logging.WARNING):
        assert len(list_images(tmp_path)) == 1
    assert warnings_from(caplog) == []


def test_missing_or_file_folder_is_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist") as e:
        list_images(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    save(tmp_path / "a.png")
    with pytest.raises(UserError, match="not a folder"):
        load_images(tmp_path / "a.png", 16)


def test_empty_folder_is_user_error(tmp_path):
    with pytest.raises(UserError) as e:
        load_images(tmp_path, 16)
    msg = str(e.value)
    assert "no usable images" in msg and str(tmp_path) in msg and ".jpg" in msg and "\n" not in msg


def test_truncated_image_skipped_with_warning(tmp_path, caplog):
    noise_image().save(tmp_path / "good.png")
    noise_image(seed=1).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "full.png").unlink()
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    with caplog.at_level(logging.WARNING):
        images, paths = load_images(tmp_path, 16)
    assert [p.name for p in paths] == ["good.png"] and len(images) == 1
    msgs = warnings_from(caplog)
    assert any("broken.png" in m for m in msgs) and any("garbage.jpg" in m for m in msgs)


def test_only_broken_images_is_user_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(UserError, match="no usable images"):
        load_images(tmp_path, 16)


def test_small_image_warned_and_upscaled(tmp_path, caplog):
    save(tmp_path / "tiny.png", size=(12, 8))
    save(tmp_path / "big.png", size=(80, 64))
    with caplog.at_level(logging.WARNING):
        images, _ = load_images(tmp_path, 32)
    (msg,) = warnings_from(caplog)
    assert "tiny.png" in msg and "upscaled" in msg and "big.png" not in msg
    x = ImageTransform(32)(images[1], torch.Generator().manual_seed(0))
    assert x.shape == (3, 32, 32)


# --- prompts ----------------------------------------------------------------------------------------------


def write_info(folder, text):
    (folder / "dataset_info.json").write_text(text if isinstance(text, str) else json.dumps(text))


def test_read_dataset_info(tmp_path):
    assert read_dataset_info(tmp_path) == {}
    write_info(tmp_path, {"instance_prompt": " a photo of sks dog ", "class_prompt": "a photo of a dog"})
    assert read_dataset_info(tmp_path) == {"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog"}


@pytest.mark.parametrize(
    "content,needle",
    [
        ('{"instance_prompt": "x",}', "not valid JSON"),
        ('["a photo"]', "JSON object"),
        ({"instance_prompt": 3}, "'instance_prompt'"),
        ({"instance_prompt": "x", "class_prompt": None}, "'class_prompt'"),
        ({"instance_prompt": "   "}, "'instance_prompt' is empty"),
        ({"instance_prompt": "x", "prompt": "y"}, "'prompt'"),
    ],
)
def test_bad_dataset_info_is_user_error(tmp_path, content, needle):
    write_info(tmp_path, content)
    with pytest.raises(UserError) as e:
        read_dataset_info(tmp_path)
    msg = str(e.value)
    assert needle in msg and "dataset_info.json" in msg and "\n" not in msg


def test_resolve_prompts_from_json(tmp_path):
    write_info(tmp_path, {"instance_prompt": "a sks dog"})
    assert resolve_prompts(tmp_path) == ("a sks dog", None)


def test_resolve_prompts_missing_everywhere(tmp_path):
    with pytest.raises(UserError) as e:
        resolve_prompts(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "dataset_info.json" in msg and "data.instance_prompt" in msg


def test_resolve_prompts_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_prompts(tmp_path / "nope", "a sks dog")


def test_resolve_prompts_yaml_only(tmp_path):
    assert resolve_prompts(tmp_path, "a sks cat", "a cat") == ("a sks cat", "a cat")


def test_yaml_overrides_json_with_warning(tmp_path, caplog):
    write_info(tmp_path, {"instance_prompt": "json dog", "class_prompt": "a dog"})
    with caplog.at_level(logging.WARNING):
        assert resolve_prompts(tmp_path, instance_prompt="yaml dog") == ("yaml dog", "a dog")
    (msg,) = warnings_from(caplog)
    assert "YAML wins" in msg and "instance_prompt" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert resolve_prompts(tmp_path, "json dog", "a dog") == ("json dog", "a dog")
    assert warnings_from(caplog) == []  # same values: nothing to warn about


# --- transforms -------------------------------------------------------------------------------------------


def test_transform_range_and_shape():
    img = Image.new("RGB", (40, 30))
    img.paste((255, 255, 255), (0, 0, 20, 30))
    x = ImageTransform(16, random_flip=True)(img, torch.Generator().manual_seed(0))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9


def test_center_crop_is_deterministic():
    img = noise_image((50, 30))
    t = ImageTransform(24, center_crop=True)
    assert t.is_deterministic
    a = t(img, torch.Generator().manual_seed(1))
    b = t(img, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and torch.equal(a, t(img))
    assert not ImageTransform(24, center_crop=True, random_flip=True).is_deterministic
    assert not ImageTransform(24).is_deterministic


def test_random_crop_varies_but_is_reproducible():
    img = noise_image((80, 24))
    t = ImageTransform(24, random_flip=True)
    outs = [t(img, torch.Generator().manual_seed(s)) for s in range(8)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert torch.equal(outs[3], t(img, torch.Generator().manual_seed(3)))
    assert torch.equal(outs[3], ImageTransform(24, random_flip=True)(img, torch.Generator().manual_seed(3)))


def test_resize_is_cached_per_image():
    img = noise_image((40, 20))
    t = ImageTransform(16)
    assert t.resized(img) is t.resized(img)
    assert t.resized(img).shape == (16, 32, 3)


# --- dataset / collate ------------------------------------------------------------------------------------


def test_dataset_and_collate_with_class_images():
    inst = [noise_image((40, 32), s) for s in range(2)]
    cls = [noise_image((32, 48), s) for s in range(10, 15)]
    ds = DreamBoothDataset(inst, "a sks dog", ImageTransform(32, random_flip=True), cls, "a dog", seed=7)
    assert len(ds) == 5
    item = ds[3]
    assert set(item) == {"pixel_values", "prompt", "class_pixel_values", "class_prompt"}
    assert torch.equal(item["pixel_values"], ds[3]["pixel_values"])  # same (seed, epoch, index) -> same crop
    batch = collate([ds[i] for i in range(4)])
    assert batch["has_class"] is True
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["class_pixel_values"].shape == (4, 3, 32, 32)
    assert batch["prompts"] == ["a sks dog"] * 4 and batch["class_prompts"] == ["a dog"] * 4


def test_dataset_epochs_are_reproducible():
    inst = [noise_image((64, 32), s) for s in range(3)]
    make = lambda: DreamBoothDataset(inst, "p", ImageTransform(32, random_flip=True), seed=1)  # noqa: E731
    a, b = make(), make()
    a.set_epoch(4)
    b.set_epoch(4)
    assert all(torch.equal(a[i]["pixel_values"], b[i]["pixel_values"]) for i in range(3))
    epochs = []
    for e in range(6):
        a.set_epoch(e)
        epochs.append(a[0]["pixel_values"])
    assert any(not torch.equal(epochs[0], x) for x in epochs[1:])


def test_dataset_without_class_images():
    ds = DreamBoothDataset([noise_image()], "a sks dog", ImageTransform(16))
    assert len(ds) == 1 and set(ds[0]) == {"pixel_values", "prompt"}
    batch = collate([ds[0], ds[0]])
    assert batch["has_class"] is False and "class_pixel_values" not in batch
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["prompts"] == ["a sks dog"] * 2


def test_dataset_works_with_dataloader():
    ds = DreamBoothDataset([noise_image(seed=s) for s in range(3)], "p", ImageTransform(16), seed=0)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate))
    assert [b["pixel_values"].shape[0] for b in batches] == [2, 1]
