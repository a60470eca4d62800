"""render / sample --markup-file: plain lines or JSONL, ids name the files, bad lines are named."""

from __future__ import annotations

import pytest

from markup2image.data.generators import markup_id
from markup2image.data.markup_file import read_markup_file


def test_plain_lines_get_stable_ids_and_jsonl_keeps_its_own(tmp_path):
    f = tmp_path / "m.txt"
    f.write_text("x ^ { 2 }\n\n\\frac { a } { b }\n" + '{"id": "mine", "markup": "a + b"}\n')
    rows = read_markup_file(f, "math")
    assert [r["id"] for r in rows] == [markup_id("math", "x ^ { 2 }"), markup_id("math", "\\frac { a } { b }"), "mine"]
    assert rows[2]["markup"] == "a + b"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"id": "a", "markup": 1}\n', "string 'markup'"),
        ("{not json\n", "not valid JSON"),
        ('{"id": "../x", "markup": "a"}\n', "safe file name"),
        ('{"id": "a", "markup": "x"}\n{"id": "a", "markup": "y"}\n', "repeats line 1"),
        ("\n\n", "no markup"),
    ],
)
def test_bad_files_name_the_line(tmp_path, text, message):
    f = tmp_path / "m.jsonl"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_markup_file(f, "math")
