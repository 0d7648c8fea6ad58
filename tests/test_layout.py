"""The layout the README promises: the reading path imports downward only (model.py imports no project file,
parallelcomp.py only model.py), no side file imports the CLI back, and the four core files stay within the
line budget of the design (1,650 lines, `wc -l`)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and f not in ("conftest.py", "test_parallelcomp.py")}


def project_imports(name: str) -> set[str]:
    """The project modules `name`.py imports, anywhere in the file (function-level imports included)."""
    with open(os.path.join(ROOT, name + ".py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PROJECT


def test_the_reading_path_imports_downward_only():
    assert project_imports("model") == set()
    assert project_imports("parallelcomp") == {"model"}
    assert project_imports("chat_template") == {"model"}
    assert project_imports("tokenizer") == {"model", "chat_template"}


def test_no_side_file_imports_the_cli():
    for name in PROJECT - {"generate"}:
        assert "generate" not in project_imports(name), name
    assert "distributed" not in project_imports("cli_io") | project_imports("session")  # only the CLI composes them


def test_the_four_core_files_fit_the_line_budget():
    lines = {}
    for name in ("parallelcomp", "model", "tokenizer", "generate"):
        with open(os.path.join(ROOT, name + ".py"), encoding="utf-8") as f:
            lines[name] = sum(1 for _ in f)
    assert sum(lines.values()) <= 1650, lines
