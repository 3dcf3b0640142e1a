"""The package's layering: no import cycles between its modules, and the cheap entry points
(`import sd_lora`, the CLI parser) leave torch, diffusers and transformers unloaded."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "gradio")


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _top_level_imports(tree: ast.Module):
    """Import statements that run when the module is imported: the module body, and the bodies of
    `if`/`try` at that level, but not `if TYPE_CHECKING:` blocks, nor anything inside a function or
    class body (those are the lazy imports)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                stack += node.body
            stack += node.orelse
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]


def import_graph(package: str = "sd_lora") -> dict[str, set[str]]:
    """module -> the package's modules it imports at module level. `from X import a` counts as an
    import of X, and of X.a when that is a module. Parent packages that Python initialises on the
    way are left out: they are not an import the module chose."""
    files = {_module_name(p)[0]: p for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        is_package = path.name == "__init__.py"
        deps = set()
        for node in _top_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = mod.split(".")[: len(mod.split(".")) - node.level + (1 if is_package else 0)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module
                targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in files and t != mod}
        graph[mod] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each as a sorted list."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    # the test below can fail: a graph with a cycle is reported
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve_to_modules():
    graph = import_graph()
    assert "sd_lora.caption.base" in graph["sd_lora.caption.simple"]  # `from .base import ...`
    assert "sd_lora.data.captions" in graph["sd_lora.caption.edit"]  # `from ..data.captions import ...`
    assert "sd_lora.caption.template" in graph["sd_lora.caption.edit"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "module-level import cycles (move the shared part into a lower module): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def _loaded_after(code: str) -> dict:
    """Run `code` in a fresh interpreter; which heavy packages are in sys.modules afterwards."""
    probe = code + f"\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_sd_lora_loads_no_torch():
    assert _loaded_after("import sd_lora; sd_lora.__version__; dir(sd_lora)") == []


def test_public_names_resolve_lazily():
    # every name of the table is importable, and getting one loads what it needs
    assert _loaded_after("import sd_lora; sd_lora.TrainConfig; sd_lora.caption_folder") == []
    import sd_lora

    for name in sd_lora.__all__:
        assert getattr(sd_lora, name) is not None, name
    assert "torch" in _loaded_after("import sd_lora; sd_lora.train")  # the heavy ones load on first use


def test_cli_parser_loads_no_torch():
    assert _loaded_after("from sd_lora.cli import build_parser; build_parser()") == []


def test_sd_lora_help_loads_no_torch():
    # `sd-lora --help` (argparse exits after printing): record the modules at exit
    code = (
        "import atexit, json, sys\n"
        f"atexit.register(lambda: print(json.dumps([m for m in {HEAVY!r} if m in sys.modules])))\n"
        "from sd_lora.cli import main\nmain(['--help'])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: sd-lora" in out.stdout
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_torch_free_modules():
    # what the CLI parser, the config checks, the caption tools and the web UI's event reader stand on
    for module in ("sd_lora.io", "sd_lora.models", "sd_lora.artifacts", "sd_lora.training.events",
                   "sd_lora.data.captions", "sd_lora.caption.edit"):
        assert _loaded_after(f"import {module}") == [], module
