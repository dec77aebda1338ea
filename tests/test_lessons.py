"""Notebook hygiene that strict nbval relies on: each lesson stored executed top to bottom in
a fresh python3 kernel, with no error or stderr output and no raw memory addresses."""
import json
import re
from pathlib import Path

import pytest

LESSONS = sorted((Path(__file__).parent.parent / "lessons").glob("[0-9][0-9]_*.ipynb"))


def test_lessons_exist_in_course_order():
    numbers = [int(p.name[:2]) for p in LESSONS]
    assert numbers[:4] == [1, 2, 3, 4], numbers
    assert numbers == sorted(set(numbers)), f"lesson numbers repeat or skip: {numbers}"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_is_stored_executed_in_order(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    for c in code:
        for out in c.get("outputs", []):
            assert out["output_type"] != "error", f"stored error in {path.name}"
            assert out.get("name") != "stderr", f"stderr stored in {path.name}: {out.get('text')}"
            text = "".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", ""))
            assert not re.search(r"at 0x[0-9a-f]{6,}", text), f"memory address in {path.name}"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_has_the_course_shape(path):
    """Title, what you will build, exercises: the skeleton every lesson shares."""
    nb = json.loads(path.read_text())
    md = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert md.lstrip().startswith("# "), f"{path.name} should open with a title"
    assert re.search(r"exercise", md, re.I), f"{path.name} has no exercises"
