"""files.replacing: the one atomic write that save_onnx, save_text, save_npz and
build_runner's copy go through."""

from __future__ import annotations

import pytest

from edgekit.errors import EdgekitError
from edgekit.files import replacing


def test_the_new_file_replaces_the_old_and_no_temporary_is_left(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with replacing(path) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old"  # readers see the old file until the rename
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_failed_write_keeps_the_old_file_and_names_the_target(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(EdgekitError, match=r"^cannot write .*out\.txt: "), replacing(path) as tmp:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_the_suffix_ends_the_temporary_name(tmp_path):
    with replacing(tmp_path / "a.npz", ".npz") as tmp:
        assert tmp.name == ".a.npz.tmp.npz"
        tmp.write_bytes(b"x")
    assert (tmp_path / "a.npz").read_bytes() == b"x"
