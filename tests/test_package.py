"""The package's shape: importing it does no work, and each module imports only modules of
its own or earlier lessons (a learner at lesson N can read every line of lesson N's module)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "minqlora"
LESSON = {"_checks": 1, "absmax": 1, "blockwise": 2, "nf4": 3, "double_quant": 4,
          "launch": 5, "emulate": 5, "cuda": 5, "lora": 6, "linear4bit": 7, "qlora": 7,
          "pager": 8, "paged_adam": 8, "toy": 9, "training": 9, "finetune": 9, "memory": 9,
          "tour": 11, "codebooks": 11, "microscaling": 11,
          "compare": 11}


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
