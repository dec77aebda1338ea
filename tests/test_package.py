"""The package's shape: importing it does no work; each module imports only modules of its own
or earlier lessons (a learner at lesson N can read every line of lesson N's module), each name
from the module that defines it; no two public functions share a name; every module has a
test file."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "minqlora"
LESSON = {"_checks": 1, "absmax": 1, "blockwise": 2, "nf4": 3, "double_quant": 4,
          "quant_state": 4, "state_checks": 4, "launch": 5, "build": 5, "emulate": 5, "cuda": 5, "cpu_decode": 5, "backends": 5, "lora": 6,
          "linear4bit": 7, "bnb_state_dict": 7, "save_guard": 7, "qlora": 7, "merge": 7, "pages": 8, "pager": 8, "paged_adam": 8, "toy": 9, "training": 9,
          "finetune": 9, "memory": 9, "bnb_layout": 7, "checkpoint": 10, "adapter": 10,
          "folders": 10, "load_plan": 10, "files": 10,
          "codebooks": 11, "microscaling": 11, "compare": 11, "tour": 11, "llama_shapes": 9,
          "mx_state": 11, "models": 12, "distributed": 13}
TESTS = Path(__file__).parent
TEST_FILE = {"tour": "test_cli",          # the tour is the command line's default command
             "bnb_state_dict": "test_linear4bit",   # Linear4bit's state_dict, through the layer
             "state_checks": "test_quant_state",    # with the states quantize_4bit makes
             "pages": "test_pager",                 # the pager's bookkeeping, through the Pager
             "build": "test_build_cache", "files": "test_hostile_files",
             "mx_state": "test_hostile_states",
             # the Transformers folders, the load's plan and the save_pretrained guard: tested
             # through save_4bit / load_4bit / prepare_qlora on tiny and real LLaMAs
             "folders": "test_checkpoint", "load_plan": "test_checkpoint",
             "save_guard": "test_checkpoint"}


def minqlora_imports(path: Path) -> set:
    """Names of minqlora modules that `path` imports (relative or absolute, at any depth)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level or module.startswith("minqlora"):
                parts = module.removeprefix("minqlora").strip(".").split(".")
                names.add(parts[0] if parts[0] else None)
                names.update(a.name for a in node.names if not parts[0])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("minqlora."))
    return {n for n in names if n in LESSON}


def test_every_module_has_a_lesson():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules == set(LESSON), f"place new modules in LESSON: {modules ^ set(LESSON)}"


@pytest.mark.parametrize("module", sorted(LESSON))
def test_imports_only_earlier_lessons(module):
    later = {m for m in minqlora_imports(PACKAGE / f"{module}.py") if LESSON[m] > LESSON[module]}
    assert not later, f"{module}.py (lesson {LESSON[module]}) imports later lessons' {later}"


def test_import_does_no_work():
    """No CuPy, no compiler, no optional references, no plotting at `import minqlora`."""
    code = ("import sys, minqlora; print(sorted(m for m in ('cupy', 'bitsandbytes', 'torchao', "
            "'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"imported at `import minqlora`: {out.stdout}"


def defined_and_imported(path: Path):
    """(public functions and classes defined at module level, {name: module} imported from a
    minqlora module) of one file."""
    tree = ast.parse(path.read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
               and not n.name.startswith("_")}
    imported = {a.asname or a.name: (node.module or "").removeprefix("minqlora").strip(".")
                for node in tree.body if isinstance(node, ast.ImportFrom)
                and (node.level or (node.module or "").startswith("minqlora"))
                for a in node.names}
    return defined, imported


def test_no_two_public_functions_share_a_name():
    """(Each bench section's `run(quick)` is the one interface bench/__init__.py calls; each
    lesson's checks, exercises/lessonNN.py, are `exercise_1`, `exercise_2`, ... for the notebook's
    `check.exercise_1(answer_1)`.)"""
    owners = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        defined = defined_and_imported(path)[0]
        interface = ({"run"} if path.parent.name == "bench" else
                     {n for n in defined if re.fullmatch(r"exercise_\d+", n)}
                     if path.parent.name == "exercises" else set())
        for name in defined - interface:
            owners.setdefault(name, []).append(str(path.relative_to(PACKAGE)))
    shared = {name: where for name, where in owners.items() if len(where) > 1}
    assert not shared, f"public names defined in more than one module: {shared}"


def test_names_are_imported_from_the_module_that_defines_them():
    """No re-export facades inside the package: `from .x import name` only where x defines it
    (the package's __init__ is the one place that gathers names for `import minqlora as mq`)."""
    defined = {path.stem: defined_and_imported(path)[0] for path in PACKAGE.glob("*.py")}
    constants = {path.stem: {t.id for n in ast.parse(path.read_text()).body
                             if isinstance(n, ast.Assign) for t in n.targets
                             if isinstance(t, ast.Name)} for path in PACKAGE.glob("*.py")}
    wrong = []
    for path in sorted(PACKAGE.glob("*.py")):
        for name, module in defined_and_imported(path)[1].items():
            if module in defined and name not in defined[module] | constants[module]:
                wrong.append(f"{path.name}: {name} from {module}")
    assert not wrong, f"names imported from a module that does not define them: {wrong}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_no_module_level_getattr(path):
    names = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
    assert "__getattr__" not in names, f"{path.name} defines a module-level __getattr__"


@pytest.mark.parametrize("module", sorted(LESSON))
def test_every_module_has_a_test_file(module):
    name = TEST_FILE.get(module, f"test_{module.strip('_')}")
    assert (TESTS / f"{name}.py").exists(), f"minqlora/{module}.py has no tests/{name}.py"
