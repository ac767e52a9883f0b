"""dinat_m2f.utils.file_io: atomic writes keep the old file on failure, leave no temp file, and give the new file the
mode any new file gets under the process umask (not mkstemp's 0600)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from PIL import Image

from dinat_m2f.utils.file_io import atomic_copy, atomic_write, atomic_write_text, make_temp_dir_beside


@pytest.fixture
def umask():
    """``os.umask`` for one test; the process umask is restored afterwards."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_new_file_gets_the_mode_of_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    target = tmp_path / "out.bin"
    atomic_write(target, lambda f: f.write(b"abc"))
    assert target.read_bytes() == b"abc"
    assert _mode(target) == expected
    reference = tmp_path / "plain.bin"  # what a plain open() gives, for comparison
    reference.write_bytes(b"")
    assert _mode(target) == _mode(reference)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "data.json"
    atomic_write_text(target, "old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["data.json"]


def test_creates_the_folder_and_replaces_an_existing_file(tmp_path):
    target = tmp_path / "a" / "b" / "note.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert os.listdir(target.parent) == ["note.txt"]


def test_image_format_follows_the_target_extension(tmp_path):
    """PIL picks the format from the file name: the temp file keeps the target's extension."""
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    atomic_write(tmp_path / "label.png", Image.fromarray(array).save)
    with Image.open(tmp_path / "label.png") as img:
        assert img.format == "PNG"
        assert (np.asarray(img) == array).all()


def test_atomic_copy(tmp_path):
    src = tmp_path / "src.jpg"
    src.write_bytes(bytes(range(256)) * 10)
    atomic_copy(src, tmp_path / "out" / "dst.jpg")
    assert (tmp_path / "out" / "dst.jpg").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("mask, expected", [(0o022, 0o755), (0o077, 0o700)])
def test_temp_dir_gets_the_mode_of_the_umask(tmp_path, umask, mask, expected):
    """A tree built in the folder and renamed into place (the synthetic dataset) keeps the folder's mode."""
    from dinat_m2f.data.synthetic import SyntheticSpec, generate_synthetic_dataset

    umask(mask)
    tmp = make_temp_dir_beside(tmp_path / "tree")
    assert os.path.dirname(tmp) == str(tmp_path) and os.listdir(tmp) == []
    assert _mode(tmp) == expected
    root = generate_synthetic_dataset(str(tmp_path / "synthetic"), SyntheticSpec(num_train=1, num_val=1, size=64))
    assert _mode(root) == expected
    assert _mode(os.path.join(root, "spec.json")) == expected & 0o666
