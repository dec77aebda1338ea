"""Notebook hygiene that strict nbval relies on: each lesson stored executed top to bottom in
a fresh python3 kernel, with no error or stderr output and no raw memory addresses. And the
lesson's code is the library's: a function a lesson defines under a library name is its code
or shown beside it."""
import ast
import copy
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


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_nbval_markers_stand_alone(path):
    """nbval reads a marker only when it is the whole line: `# NBVAL_IGNORE_OUTPUT (why)` is
    silently not a marker, and the cell's output is compared after all."""
    nb = json.loads(path.read_text())
    for c in nb["cells"]:
        for line in "".join(c["source"]).splitlines():
            if "NBVAL_" in line and line.lstrip().startswith("#"):
                assert re.fullmatch(r"\s*#\s*NBVAL_[A-Z_]+\s*", line), f"{path.name}: {line!r}"


# The lesson's code is the module's code (issue 23, item 3) ------------------------------------
PACKAGE = Path(__file__).parent.parent / "minqlora"
NOT_BUILT = {"exercises", "bench"}   # the lessons' checks and the speed runs: no lesson builds them

def library_definitions() -> dict:
    """{name: ast node} of every public function and class at the top of a library module."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if NOT_BUILT & set(path.relative_to(PACKAGE).parts):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                found[node.name] = node
    return found


def code_cells(path: Path) -> list:
    """The syntax tree of each code cell, in order (IPython's % and ! lines dropped)."""
    nb = json.loads(path.read_text())
    trees = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            lines = "".join(cell["source"]).split("\n")
            trees.append(ast.parse("\n".join(l for l in lines if l.lstrip()[:1] not in ("%", "!"))))
    return trees


def same_code(a: ast.AST, b: ast.AST) -> bool:
    """The same code once docstrings and type annotations are dropped (comments and layout are
    free): what a learner diffing the lesson against the module would call the same text."""
    def bare(node):
        node = copy.deepcopy(node)
        for n in ast.walk(node):
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.body and isinstance(
                    n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant) \
                    and isinstance(n.body[0].value.value, str):
                n.body = n.body[1:] or [ast.Pass()]
            if isinstance(n, ast.FunctionDef):
                n.returns = None
            if isinstance(n, ast.arg):
                n.annotation = None
        return ast.dump(node)
    return bare(a) == bare(b)


def shown_sources(tree: ast.AST) -> set:
    """Names whose library source a cell prints: inspect.getsource(mq.x) or getsource(mod.x)."""
    return {call.args[0].attr for call in ast.walk(tree) if isinstance(call, ast.Call)
            and getattr(call.func, "attr", getattr(call.func, "id", None)) == "getsource"
            and call.args and isinstance(call.args[0], ast.Attribute)}


def library_names_not_built(path: Path) -> set:
    """Names a lesson defines as the library does, neither with the library's code nor followed
    (in that cell or a later one) by inspect.getsource of the library's."""
    library, cells = library_definitions(), code_cells(path)
    missing = set()
    for i, tree in enumerate(cells):
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in library:
                shown = set().union(*(shown_sources(t) for t in cells[i:]))
                if not same_code(node, library[node.name]) and node.name not in shown:
                    missing.add(node.name)
    return missing


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_a_library_name_in_a_lesson_is_the_librarys_code_or_shown_beside_it(path):
    """Issue 23: every function (or class) a lesson defines under a library name is that
    function's code (lesson 02's quantize_blockwise), or the lesson shows the library's with
    inspect.getsource after its own (lesson 01's absmax_quantize)."""
    missing = library_names_not_built(path)
    assert not missing, (f"{path.name} defines {sorted(missing)} as the library does: write the "
                         "library's code, or print inspect.getsource(mq.<name>) after yours and "
                         "say in one sentence what it adds")


def test_the_scan_sees_a_copy_a_drift_and_a_shown_source():
    """The rule itself, on three made-up cells: the library's code passes, a drifted copy fails,
    and a drifted copy followed by getsource passes."""
    library = library_definitions()["ceil_div"]
    copy_ = ast.parse("def ceil_div(n, d):\n    # a comment\n    return -(-n // d)\n").body[0]
    drift = ast.parse("def ceil_div(n, d):\n    return (n + d - 1) // d\n").body[0]
    assert same_code(copy_, library) and not same_code(drift, library)
    assert "ceil_div" in shown_sources(ast.parse("print(inspect.getsource(mq.blockwise.ceil_div))"))
    assert "ceil_div" not in shown_sources(ast.parse("print(inspect.getsource(ceil_div))"))
