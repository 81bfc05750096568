"""The op map (``mldecoder_fast/ops/__init__.py``'s docstring) names only paths that exist, and
the README links to it."""
from __future__ import annotations

import pathlib
import re

import mldecoder_fast.ops as ops

ROOT = pathlib.Path(ops.__file__).resolve().parents[2]
PATH = re.compile(r"\b((?:mldecoder_fast|csrc|tests|bench|docs)/[\w/.-]+\.(?:py|cpp|cu|h|md|sh))\b")


def test_every_path_in_the_op_map_exists():
    named = PATH.findall(ops.__doc__)
    assert len(named) >= 20, "the op map should name each op's files"
    missing = sorted({p for p in named if not (ROOT / p).is_file()})
    assert not missing, f"the op map in mldecoder_fast/ops/__init__.py names missing files: {missing}"


def test_the_readme_links_the_op_map():
    assert "mldecoder_fast/ops/__init__.py" in (ROOT / "README.md").read_text()


# What every op shares: a row's tests may import these without the row listing them.
SHARED = ("mldecoder_fast/__init__.py", "mldecoder_fast/head/", "mldecoder_fast/benchmark/",
          "mldecoder_fast/kernels/_common.py", "mldecoder_fast/ops/triton_support.py",
          "mldecoder_fast/ops/__init__.py", "mldecoder_fast/paths/__init__.py", "mldecoder_fast/numerics.py")


def _rows() -> dict:
    """{op row's first line: (package files it names, its test files)} from the op map: each row a
    block of an unindented title and indented "key  value" lines."""
    rows = {}
    for block in ops.__doc__.split("\nOp map:", 1)[1].split("\n\n"):
        lines = block.strip("\n").splitlines()
        if len(lines) < 2 or lines[0].startswith(" ") or not lines[1].startswith("    "):
            continue
        found = PATH.findall(block)
        rows[lines[0]] = ({p for p in found if p.startswith("mldecoder_fast/")},
                          [p for p in found if p.startswith("tests/")])
    return rows


def _imported_files(test_file: pathlib.Path) -> set:
    """The package files a test file imports (anywhere in it)."""
    import ast
    def file_of(name):
        base = ROOT / name.replace(".", "/")
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return str(candidate.relative_to(ROOT))
        return None

    found = set()
    for node in ast.walk(ast.parse(test_file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mldecoder_fast":
            modules = [f for a in node.names if (f := file_of(f"{node.module}.{a.name}"))]
            # the module itself, unless every name imported from it is a module of its own
            names = modules if len(modules) == len(node.names) else [*modules, file_of(node.module)]
        elif isinstance(node, ast.Import):
            names = [file_of(a.name) for a in node.names if a.name.split(".")[0] == "mldecoder_fast"]
        else:
            continue
        found.update(n for n in names if n)
    return found


def test_each_rows_tests_import_only_what_the_row_lists():
    rows = _rows()
    assert len(rows) >= 6, sorted(rows)
    problems = []
    for name, (files, tests) in rows.items():
        assert tests, f"op map row {name!r} lists no tests"
        for test in tests:
            for imported in sorted(_imported_files(ROOT / test)):
                if imported not in files and not imported.startswith(SHARED):
                    row = name.split(":")[0]
                    problems.append(f"{test} (row {row!r}) imports {imported}, which the row does not list")
    assert not problems, "\n".join(problems)
