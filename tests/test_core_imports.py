"""Everything but ``integrations/`` depends on torch and the standard library only, and the folders import
each other downwards only.

(a) A static scan of every file outside ``integrations/``: module-level imports are stdlib, torch or
    largeep_plugin (never the integrations); imports inside functions may also be ``yaml`` and ``matplotlib``;
    megatron, deepspeed, transformers and apex appear nowhere, not even through importlib; ``layer/`` and
    ``placement/`` never touch ``torch.cuda`` (``largeep gpu-check`` in ``commands/`` may).
(b) In a fresh interpreter where ``megatron`` and ``deepspeed`` cannot be imported, every core module imports and
    a single-process layer runs a forward pass; ``import largeep_plugin`` gives the public API without importing
    a framework, yaml or matplotlib.
(c) The folders' floors (``../shared/design.md``): placement/ < layer/ < tools/, cluster/ < models/, perfmodel/ <
    integrations/ < commands/; every import (also inside functions) points to a lower floor or stays in its
    folder, so there is no circle and layer/ and placement/ never reach tools/ or integrations/.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import largeep_plugin

PACKAGE_DIR = Path(largeep_plugin.__file__).resolve().parent
ROOT = "largeep_plugin"
FORBIDDEN = ("megatron", "deepspeed", "transformers", "apex")
MODULE_LEVEL_OK = set(sys.stdlib_module_names) | {"torch", ROOT}
FUNCTION_LEVEL_OK = MODULE_LEVEL_OK | {"yaml", "matplotlib"}


def core_files() -> list[Path]:
    return sorted(
        p for p in PACKAGE_DIR.rglob("*.py")
        if "integrations" not in p.relative_to(PACKAGE_DIR).parts and "__pycache__" not in p.parts
    )


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    parts = [ROOT, *path.relative_to(package_dir).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(path: Path, package_dir: Path) -> list[str]:
    name = module_name(path, package_dir).split(".")
    return name if path.name == "__init__.py" else name[:-1]


def _imported_modules(node: ast.AST, path: Path, package_dir: Path) -> list[str]:
    """Absolute dotted names an import statement brings in (relative imports resolved against ``path``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = _package_of(path, package_dir)
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    # "from pkg import sub" may import a submodule: report both spellings.
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _violations(path: Path, package_dir: Path = PACKAGE_DIR) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []
    # The layer and the placement run anywhere: they never touch torch.cuda (tools and commands that check a GPU may).
    room = path.relative_to(package_dir).parts[0]
    device_generic = room in ("layer", "placement") or room.endswith(".py")

    def where(node: ast.AST) -> str:
        return f"{path.relative_to(package_dir.parent)}:{getattr(node, 'lineno', '?')}"

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = _imported_modules(node, path, package_dir)
            allowed = FUNCTION_LEVEL_OK if in_function else MODULE_LEVEL_OK
            for name in names[:1] if isinstance(node, ast.ImportFrom) else names:
                top = name.split(".")[0]
                if top not in allowed:
                    level = "function" if in_function else "module"
                    found.append(f"{where(node)}: {level}-level import of {name!r}")
            if not in_function and any(n == f"{ROOT}.integrations" or n.startswith(f"{ROOT}.integrations.")
                                       for n in names):
                found.append(f"{where(node)}: module-level import of the integrations")
            if any(n.split(".")[0] in FORBIDDEN for n in names):
                found.append(f"{where(node)}: imports {names[0]!r}")
            if device_generic and any(n == "torch.cuda" or n.startswith("torch.cuda.") for n in names):
                found.append(f"{where(node)}: imports torch.cuda")
        elif device_generic and isinstance(node, ast.Attribute) and node.attr == "cuda" and _is_torch(node.value):
            found.append(f"{where(node)}: uses torch.cuda")
        elif isinstance(node, ast.Call) and _dynamic_import_target(node).split(".")[0] in FORBIDDEN:
            found.append(f"{where(node)}: imports {_dynamic_import_target(node)!r} dynamically")
        nested = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, nested)

    visit(tree, False)
    return found


def _dynamic_import_target(call: ast.Call) -> str:
    """The literal module name of ``importlib.import_module("x")`` or ``__import__("x")``, else ''."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name not in ("import_module", "__import__") or not call.args:
        return ""
    first = call.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else ""


def _is_torch(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "torch"


def test_core_files_found() -> None:
    names = {module_name(p) for p in core_files()}
    assert {f"{ROOT}.layer.config", f"{ROOT}.layer.moe_layer", f"{ROOT}.layer.comm", f"{ROOT}.layer.reference",
            f"{ROOT}.placement.plan", f"{ROOT}.tools.launch"} <= names
    assert not any(".integrations" in n for n in names)


def test_scanner_catches_violations(tmp_path: Path) -> None:
    """The scanner itself: each of these lines must be reported."""
    package_dir = tmp_path / ROOT
    package_dir.mkdir()
    bad = package_dir / "bad.py"
    bad.write_text(textwrap.dedent("""
        from .integrations import megatron as adapter
        from .config import LargeEPConfig
        import numpy
        import yaml
        from megatron.core import parallel_state
        import torch.cuda
        from torch import cuda
        def f():
            import matplotlib   # fine here
            import deepspeed
            import importlib; importlib.import_module("apex")
            return torch.cuda.is_available()
    """))
    found = _violations(bad, package_dir)
    for needle in ("'numpy'", "'yaml'", "'megatron.core'", "'deepspeed'", "'apex'", "the integrations"):
        assert any(needle in v for v in found), (needle, found)
    assert sum("torch.cuda" in v for v in found) == 3, found
    # Every line is reported but the relative import of config (line 3) and the lazy matplotlib (line 10).
    reported = {int(v.split(":")[1]) for v in found}
    assert reported == {2, 4, 5, 6, 7, 8, 11, 12, 13}, found


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_core_file_imports(path: Path) -> None:
    assert _violations(path) == []


BLOCKER = '''
import importlib.abc, sys

class _Block(importlib.abc.MetaPathFinder):
    """Makes megatron and deepspeed (and apex) unimportable, as on a machine without them."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in ("megatron", "deepspeed", "apex"):
            raise ImportError(f"{fullname} is blocked for this test")
        return None

sys.meta_path.insert(0, _Block())
'''

PROBE = '''
import importlib, sys
for name in ("megatron", "megatron.core", "deepspeed", "apex"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} should be blocked")
for name in sys.argv[1:]:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("megatron", "deepspeed", "apex"))
assert not leaked, leaked

import torch
from largeep_plugin.layer.config import LargeEPConfig
from largeep_plugin.layer.moe_layer import LargeEPMoE
from largeep_plugin.layer.reference import DenseMoEReference
cfg = LargeEPConfig(hidden_size=8, ffn_hidden_size=16, num_experts=1, top_k=1, activation="swiglu", init_std=0.5)
x = torch.randn(2, 3, 8, requires_grad=True)
y = LargeEPMoE(cfg)(x)
y.sum().backward()
assert y.shape == x.shape and x.grad is not None
assert torch.allclose(y, DenseMoEReference(cfg)(x), atol=1e-6)
print("CORE-OK", len(sys.argv) - 1)
'''


def test_core_imports_without_megatron_and_deepspeed(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    # __main__ modules run the CLI when imported: the static scan covers them.
    modules = sorted(m for m in {module_name(p) for p in core_files()} if not m.endswith(".__main__"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(PACKAGE_DIR.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *modules], env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"CORE-OK {len(modules)}" in proc.stdout


# ---- (b) the public API -------------------------------------------------------------------------------------------
PUBLIC_API = ("LargeEPConfig", "LargeEPMoE", "Placement", "plan_placement", "Topology", "load_topology",
              "allreduce_gradients", "update_expert_biases", "load_stats", "LoadMonitor", "rebalance", "refresh_clones",
              "clip_grad_norm_", "grad_norm", "set_aux_loss_scale", "move_experts", "save_training_state",
              "load_training_state", "end_process")

API_PROBE = '''
import sys
import largeep_plugin as lep
names = sys.argv[1:]
missing = [n for n in names if not hasattr(lep, n)]
assert not missing, missing
assert sorted(lep.__all__) == sorted(names), lep.__all__
leaked = sorted({m.split(".")[0] for m in sys.modules} & {"megatron", "deepspeed", "transformers", "yaml", "matplotlib"})
assert not leaked, leaked
print("API-OK")
'''


def test_public_api_without_frameworks(tmp_path: Path) -> None:
    """``import largeep_plugin`` gives the public API with megatron and deepspeed unimportable, and imports none
    of megatron, deepspeed, transformers, yaml or matplotlib."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(PACKAGE_DIR.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", API_PROBE, *PUBLIC_API], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "API-OK" in proc.stdout


# ---- (c) floors ---------------------------------------------------------------------------------------------------
# Folder (or top-level module) -> floor. A file may import its own folder and any lower floor, nothing else.
FLOORS = {
    "placement": 0,
    "layer": 1,
    "__init__": 2,              # the public API: layer/ and placement/ re-exported
    "tools": 2, "cluster": 2,
    "models": 3, "perfmodel": 3,
    "integrations": 4,
    "deepspeed": 5, "megatron": 5, "hf": 5,   # deepspeed.py, megatron.py, hf.py: short names of integrations/,
                                              # imported on first use
    "commands": 5,
    "cli": 6, "__main__": 6,
}


def room_of(module: str) -> str:
    """The folder (or top-level module) of a dotted ``largeep_plugin`` module name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def folder_arrows(package_dir: Path = PACKAGE_DIR) -> set[tuple[str, str, str]]:
    """(from room, to room, where) for every import between two rooms of the package, at any level."""
    arrows = set()
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        here = room_of(module_name(path, package_dir))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = _imported_modules(node, path, package_dir)
                for name in names[:1] if isinstance(node, ast.ImportFrom) else names:
                    if name.split(".")[0] != ROOT:
                        continue
                    target = name
                    if isinstance(node, ast.ImportFrom) and name == ROOT:   # from largeep_plugin import x
                        sub = node.names[0].name  # a module of the package, or a name of the public API
                        is_module = (package_dir / sub).is_dir() or (package_dir / f"{sub}.py").is_file()
                        target = f"{ROOT}.{sub}" if is_module else ROOT
                    there = room_of(target)
                    if there != here:
                        arrows.add((here, there, f"{path.relative_to(package_dir.parent)}:{node.lineno}"))
    return arrows


def test_every_room_has_a_floor() -> None:
    rooms = {room_of(module_name(p)) for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    assert rooms <= set(FLOORS), sorted(rooms - set(FLOORS))


def test_imports_point_down_only() -> None:
    arrows = folder_arrows()
    assert ("layer", "placement") in {(a, b) for a, b, _ in arrows}   # the scan sees real arrows
    upward = sorted(f"{where}: {a} (floor {FLOORS[a]}) imports {b} (floor {FLOORS[b]})"
                    for a, b, where in arrows if FLOORS[b] >= FLOORS[a])
    assert upward == []


def test_floor_check_catches_an_upward_import(tmp_path: Path) -> None:
    package_dir = tmp_path / ROOT
    (package_dir / "layer").mkdir(parents=True)
    (package_dir / "tools").mkdir()
    (package_dir / "layer" / "bad.py").write_text("def f():\n    from largeep_plugin.tools import launch\n")
    (package_dir / "tools" / "launch.py").write_text("from ..layer import bad\n")
    arrows = {(a, b) for a, b, _ in folder_arrows(package_dir)}
    assert arrows == {("layer", "tools"), ("tools", "layer")}
