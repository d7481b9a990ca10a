"""The top-level API: what ``import objdl`` offers, what it costs, and what the docs import."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import json
import re
import sys
from typing import Any

import pytest

import objdl
from tests._cli_procs import ROOT, run

LAYERS = (
    "objdl.cell",
    "objdl.message",
    "objdl.downloader",
    "objdl.objects",
    "objdl.errors",
    "objdl.security",
)
HEAVY = ("numpy", "torch", "cryptography", "tqdm")


def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    config: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config


def test_star_import_gives_exactly_all() -> None:
    assert len(objdl.__all__) == len(set(objdl.__all__)), "a name is listed twice"
    namespace: dict[str, object] = {}
    exec("from objdl import *", namespace)
    del namespace["__builtins__"]
    assert sorted(namespace) == sorted(objdl.__all__)


def test_every_public_name_is_the_layer_modules_object() -> None:
    for name in objdl.__all__:
        homes = [m for m in LAYERS if name in importlib.import_module(m).__all__]
        assert homes, f"objdl.{name} is in no layer module's __all__"
        for home in homes:
            assert getattr(objdl, name) is getattr(importlib.import_module(home), name), name


def _own_docstring(obj: object) -> str:
    doc = obj.__doc__ or ""  # a class's __doc__ is its own, never a base class's
    if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):  # type: ignore[union-attr]
        return ""  # the signature dataclass writes when the class has no docstring
    return doc.strip()


def test_every_public_name_has_a_docstring() -> None:
    missing = []
    for name in objdl.__all__:
        obj = getattr(objdl, name)
        assert inspect.isclass(obj) or inspect.isfunction(obj), f"{name}: not a class or function"
        if not _own_docstring(obj):
            missing.append(name)
    assert not missing, f"public names without a docstring: {missing}"
    assert objdl.__doc__ and "from objdl import" in objdl.__doc__


def _python_blocks() -> list[tuple[str, str]]:
    """(where, source) of every Python code the README, docs and examples show."""
    found = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", md.read_text(), re.S)):
            found.append((f"{md.relative_to(ROOT)} block {i + 1}", block))
    for py in sorted((ROOT / "examples").rglob("*.py")):
        found.append((str(py.relative_to(ROOT)), py.read_text()))
    return found


def _imports() -> list[tuple[str, str, str]]:
    """(where, module, name) of every ``from module import name`` of objdl or broker."""
    out = []
    for where, source in _python_blocks():
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").split(".")[0] in ("objdl", "broker")
            ):
                out.extend((where, str(node.module), alias.name) for alias in node.names)
    return out


def test_the_docs_show_imports() -> None:
    imports = _imports()
    readme = [i for i in imports if i[0].startswith("README.md")]
    assert any(module == "objdl" for _, module, _ in readme), "the README uses `from objdl`"
    assert len({where for where, _, _ in imports}) >= 5, imports


def _is_subpackage(module: str, name: str) -> bool:
    """`from objdl import aio`: a package of its own, not a name in objdl's namespace."""
    if not hasattr(importlib.import_module(module), "__path__"):
        return False  # a module, not a package: it has no subpackages
    return importlib.util.find_spec(f"{module}.{name}") is not None


def test_every_import_the_docs_show_resolves() -> None:
    for where, module, name in _imports():
        found = hasattr(importlib.import_module(module), name) or _is_subpackage(module, name)
        assert found, f"{where}: {module}.{name}"


def test_every_layer_name_the_docs_import_is_at_the_top_level() -> None:
    for where, module, name in _imports():
        if module in LAYERS and not _is_subpackage(module, name):
            assert name in objdl.__all__, f"{where} imports {name} from {module}; objdl lacks it"
            assert getattr(objdl, name) is getattr(importlib.import_module(module), name)


def test_import_is_light_and_starts_no_thread() -> None:
    probe = (
        "import json, sys, threading\n"
        "before = {t.ident for t in threading.enumerate()}\n"
        "import objdl\n"
        "from objdl import *\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "threads = [t.name for t in threading.enumerate() if t.ident not in before]\n"
        "print(json.dumps({'heavy': heavy, 'threads': threads, 'file': objdl.__file__}))\n"
    )
    proc = run([sys.executable, "-c", probe], timeout=30.0)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["file"].startswith(str(ROOT)), seen
    assert seen["heavy"] == [], f"import objdl imported {seen['heavy']}"
    assert seen["threads"] == [], f"import objdl started threads {seen['threads']}"


def test_the_testing_package_imports_without_starting_anything() -> None:
    probe = (
        "import json, sys, threading\n"
        "before = {t.ident for t in threading.enumerate()}\n"
        "import objdl\n"
        "light = 'objdl.testing' not in sys.modules\n"
        "import objdl.testing\n"
        "from objdl.testing import *\n"
        "threads = [t.name for t in threading.enumerate() if t.ident not in before]\n"
        "print(json.dumps({'light': light, 'threads': threads}))\n"
    )
    proc = run([sys.executable, "-c", probe], timeout=30.0)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"light": True, "threads": []}


def test_the_testing_package_documents_its_names() -> None:
    testing = importlib.import_module("objdl.testing")
    assert testing.__doc__ and "from objdl.testing import" in testing.__doc__
    for name in testing.__all__:
        obj = getattr(testing, name)
        if inspect.isclass(obj):
            assert _own_docstring(obj), f"objdl.testing.{name} has no docstring"


def test_version_has_one_source() -> None:
    project = _pyproject()
    assert "version" not in project["project"], "the version is written in objdl/__init__.py"
    assert "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "objdl.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*(\.dev\d+)?", objdl.__version__)
    # setuptools reads it without importing objdl: a plain literal assignment
    tree = ast.parse((ROOT / "objdl" / "__init__.py").read_text())
    values = [
        n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign)
        and [getattr(t, "id", None) for t in n.targets] == ["__version__"]
        and isinstance(n.value, ast.Constant)
    ]
    assert values == [objdl.__version__]


def test_packages_and_py_typed_are_shipped() -> None:
    tool = _pyproject()["tool"]["setuptools"]
    include = tool["packages"]["find"]["include"]
    for package in ("objdl", "broker"):
        assert package in include and f"{package}.*" in include, include
        assert (ROOT / package / "py.typed").is_file()
        assert "py.typed" in tool["package-data"][package]


@pytest.mark.parametrize("module", ["objdl", *LAYERS, "objdl.testing", "broker"])
def test_every_layer_has_an_api_page(module: str) -> None:
    pages = {p.read_text().strip() for p in (ROOT / "docs" / "api").glob("*.md")}
    assert any(line.strip() == f"::: {module}" for page in pages for line in page.splitlines())


def test_every_guide_is_in_the_site_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    for guide in sorted((ROOT / "docs").glob("*.md")):
        assert f" {guide.name}" in config, f"{guide.name} is not in mkdocs.yml's nav"
    for page in sorted((ROOT / "docs" / "api").glob("*.md")):
        assert f" api/{page.name}" in config, f"api/{page.name} is not in mkdocs.yml's nav"
