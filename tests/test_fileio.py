"""mtlue_fast.fileio: the check that an output folder may be written."""

import pytest

from mtlue_fast.fileio import missing_or_empty


def test_missing_or_empty(tmp_path):
    assert missing_or_empty(tmp_path / "new", "out_dir")
    (tmp_path / "empty").mkdir()
    assert missing_or_empty(tmp_path / "empty", "out_dir")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.txt").write_text("x")
    assert not missing_or_empty(tmp_path / "full", "out_dir")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder; choose another out_root"):
        missing_or_empty(tmp_path / "file", "out_root")
