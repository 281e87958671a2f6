"""One split-file reader for extraction, pre-training and detection."""

import pytest

from pcd.pipeline.errors import PcdError
from pcd.pipeline.splits import read_split


def test_split_lines_comments_and_blanks(tmp_path):
    path = tmp_path / "scannetv2_train.txt"
    path.write_text("scene0000_00\n\n# held out below\nscene0002_01  # trailing note\nscene0001_00")
    assert read_split(path) == ["scene0000_00", "scene0002_01", "scene0001_00"]


@pytest.mark.parametrize("content, words", [(None, "split file not found"), ("\n# only\n", "split file names no scenes"),
                                            (b"\xff\xfe\x00", "cannot read split file")])
def test_bad_split_files_are_one_line_errors(tmp_path, content, words):
    path = tmp_path / "split.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(PcdError, match=f"split.txt: {words}"):
        read_split(path)
