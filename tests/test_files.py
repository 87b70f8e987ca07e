"""files.py: a write that fails part-way (an error, Ctrl-C) leaves the old file or folder intact and no temp
behind; a write that succeeds replaces it whole."""

import fnmatch
import json
from pathlib import Path

import pytest
from PIL import Image

from dreambooth.files import (atomic_file, atomic_folder, save_png, slug, temp_glob, temp_path, write_json_atomic,
                              write_text_atomic)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_a_failed_file_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, error):
    path = tmp_path / "summary.json"
    path.write_text("old")
    with pytest.raises(type(error)):
        with atomic_file(path) as tmp:
            tmp.write_text("half of the new")
            raise error
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_file_write_replaces_the_old_file(tmp_path):
    path = tmp_path / "sub" / "index.json"  # the folder is made
    write_text_atomic(path, "first")
    with atomic_file(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".") and tmp.suffix == ".json"
        assert path.read_text() == "first"  # the old file stays readable while the new one is written
        tmp.write_text("second")
    assert path.read_text() == "second"
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["index.json"]


def test_a_write_that_never_made_its_file_fails_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        with atomic_file(path):
            pass  # a writer that wrote nothing must not replace the file with nothing
    assert path.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_a_failed_folder_write_keeps_the_old_folder_and_leaves_no_temp(tmp_path, error):
    final = tmp_path / "step-000002"
    atomic_folder(final, lambda tmp: (tmp / "weights.bin").write_text("old"))

    def write(tmp: Path):
        (tmp / "weights.bin").write_text("half")
        (tmp / "sub").mkdir()
        raise error
    with pytest.raises(type(error)):
        atomic_folder(final, write)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000002"]
    assert [p.name for p in final.iterdir()] == ["weights.bin"] and (final / "weights.bin").read_text() == "old"


def test_a_folder_write_replaces_the_old_folder_whole(tmp_path):
    final = tmp_path / "step-000002"
    atomic_folder(final, lambda tmp: (tmp / "old-only.txt").write_text("old"))

    def write(tmp: Path):
        assert tmp.parent == tmp_path and tmp.name.startswith(".step-000002.tmp-")  # what prune clears up
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("new")
    atomic_folder(final, write)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000002"]
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*")) == ["sub", "sub/new.txt"]


def test_temp_names_match_their_glob():
    for name, pattern in [("class-00012.png", "class-*.png"), ("manifest.json", "manifest.json"),
                          ("model.safetensors", "model.safetensors"), ("README", "README")]:
        tmp = temp_path(Path(name)).name
        assert fnmatch.fnmatch(tmp, temp_glob(pattern)), (tmp, temp_glob(pattern))
        assert not fnmatch.fnmatch(name, temp_glob(pattern))


def test_png_keeps_its_settings_and_slug_names(tmp_path):
    path = save_png(Image.new("RGB", (8, 8), "red"), tmp_path / "a.png", {"prompt": "x", "seed": 3})
    assert json.loads(Image.open(path).text["parameters"]) == {"prompt": "x", "seed": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    assert slug("A photo of riobugger Cat!") == "a-photo-of-riobugger-cat" and slug("!!!") == "image"
