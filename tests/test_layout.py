"""The package's dependencies point down: no import cycle among its files (module-level imports;
an import inside a function runs when called, after every module has loaded), and library code
imports nothing from the benchmark or the trainers."""
from __future__ import annotations

import ast
import pathlib

import mldecoder_fast

PACKAGE = pathlib.Path(mldecoder_fast.__file__).resolve().parent


def _modules() -> dict:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: pathlib.Path, modules: dict, module_level: bool = True) -> set:
    """The package's modules that ``name`` imports (at module level, or anywhere)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            found.update(subs)
            if len(subs) < len(node.names):   # names defined in ``base`` itself
                found.add(base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in modules and m != name}


def test_no_import_cycles():
    modules = _modules()
    edges = {name: _imports(name, path, modules) for name, path in modules.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for name in sorted(modules):
        if name not in state:
            visit(name, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_library_code_imports_no_tooling():
    """The head, its paths, ops, kernels, interop and serving import nothing from ``benchmark`` or
    the trainer classes (serving may read checkpoints and data formats of ``train``)."""
    modules = _modules()
    library = [m for m in modules if m.split(".")[1:2] and m.split(".")[1] in
               ("head", "paths", "ops", "kernels", "interop", "serving", "files", "numerics")]
    assert library
    trainers = {"mldecoder_fast.train.trainer", "mldecoder_fast.train.multilabel", "mldecoder_fast.train.singlelabel",
                "mldecoder_fast.train.zsl", "mldecoder_fast.train.asl_trainer"}
    bad = [(m, i) for m in library for i in _imports(m, modules[m], modules, module_level=False)
           if i.startswith("mldecoder_fast.benchmark") or i in trainers]
    assert not bad, bad


def test_no_package_file_over_500_lines():
    """One concept per file: nothing over 500 lines but the Triton kernel sources (kernels/)."""
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if "kernels" not in p.relative_to(PACKAGE).parts[:1] and (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
