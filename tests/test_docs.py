"""The documentation site builds strictly, the quickstart page is notebook 1, and the API is documented."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import pyro_lvae

REPO = Path(__file__).resolve().parents[1]
STRICT = ["-W", "--keep-going", "-n", "-q", "-b", "html"]


def _sphinx(src: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sphinx", *STRICT, str(src), str(out)], capture_output=True, text=True, timeout=600
    )


def test_docs_build_strictly(tmp_path):
    proc = _sphinx(REPO / "docs", tmp_path / "html")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for page in (
        "index",
        "quickstart",
        "concepts",
        "cli",
        "api",
        "results",
        "performance",
        "faq",
        "families",
        "reproduce",
        "reliability",
        "distributed",
        "short-runs",
    ):
        assert (tmp_path / "html" / f"{page}.html").exists()
    # The CLI reference comes from the real parser: every config field is an option.
    cli = (tmp_path / "html" / "cli.html").read_text()
    assert "--warmup-epochs" in cli and "--engine" in cli and "--codebook-ema" in cli


@pytest.mark.parametrize(
    "page, named",
    [
        ("See [a page that does not exist](missing.md).", "missing"),
        ("See {py:func}`pyro_lvae.no_such_function`.", "no_such_function"),
    ],
    ids=["broken link", "unresolved reference"],
)
def test_the_sites_own_configuration_fails_a_broken_link_or_reference(tmp_path, page, named):
    """With docs/conf.py itself, so that a setting that hid such warnings would fail here."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "conf.py").write_text((REPO / "docs" / "conf.py").read_text())
    (src / "index.md").write_text(f"# Index\n\n{page}\n")
    proc = _sphinx(src, tmp_path / "html")
    assert proc.returncode != 0 and named in proc.stderr


def test_quickstart_page_holds_the_code_of_notebook_one():
    page = (REPO / "docs" / "quickstart.md").read_text()
    blocks = [b.rstrip() for b in re.findall(r"```python\n(.*?)```", page, flags=re.S)]
    nb = nbformat.read(REPO / "notebooks" / "01_quickstart.ipynb", as_version=4)
    cells = [c.source.rstrip() for c in nb.cells if c.cell_type == "code"]
    assert blocks == cells


def _public_objects():
    for info in pkgutil.walk_packages(pyro_lvae.__path__, prefix="pyro_lvae."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if not name.startswith("_") and getattr(obj, "__module__", None) == module.__name__:
                if inspect.isfunction(obj) or inspect.isclass(obj):
                    yield f"{module.__name__}.{name}", obj


def _own_doc(obj) -> str:
    """The docstring written for ``obj`` itself: not inherited, and not the signature that
    ``@dataclass`` puts on a class without one."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    if not doc or (inspect.isclass(obj) and doc.startswith(f"{obj.__name__}(")):
        return ""
    return doc


def _overrides_a_documented_method(cls, name: str) -> bool:
    """Whether ``cls.name`` overrides a method of this package that has its own docstring."""
    return any(
        base.__module__.startswith("pyro_lvae") and name in vars(base) and _own_doc(vars(base)[name])
        for base in cls.__mro__[1:]
    )


def _undocumented_parameters(fn) -> list[str]:
    named = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return [name for name in named if f":param {name}:" not in _own_doc(fn)]


def test_every_public_function_and_class_is_documented():
    """Each public class, method and function has a docstring of its own (an override of one of
    this package's documented methods may share it), and each function documents every parameter."""
    undocumented, without_params = [], []
    for name, obj in _public_objects():
        members = [(name, obj)]
        if inspect.isclass(obj):
            members += [
                (f"{name}.{k}", v)
                for k, v in vars(obj).items()
                if not k.startswith("_") and inspect.isfunction(v) and not _overrides_a_documented_method(obj, k)
            ]
        undocumented += [member for member, fn in members if not _own_doc(fn)]
        if inspect.isfunction(obj) and _undocumented_parameters(obj):
            without_params.append(f"{name}: {', '.join(_undocumented_parameters(obj))}")
    assert not undocumented, f"no docstring of their own: {undocumented}"
    assert not without_params, f"module-level functions with undocumented parameters: {without_params}"


def test_saved_runs_page_runs_on_a_saved_run(tmp_path, shared_data_root, monkeypatch):
    """Every Python block of docs/saved-runs.md, in order, on a tiny saved run at runs/lvae5."""
    import shutil

    shutil.copytree(REPO / "tests" / "fixtures" / "checkpoint-13e79a1", tmp_path / "runs" / "lvae5")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYRO_LVAE_DATA", str(shared_data_root))
    page = (REPO / "docs" / "saved-runs.md").read_text()
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", page, flags=re.S):
        exec(compile(block, "saved-runs.md", "exec"), namespace)
    assert namespace["result"].metrics[-1]["epoch"] == 52
    assert namespace["codes"]["mean_z2"].shape == (500, 2)  # the page's 500-image subset
    assert (tmp_path / "my-lvae.pt").exists() and not namespace["model"].training


def test_latents_page_runs_on_a_saved_run(tmp_path, shared_data_root, monkeypatch):
    """Every Python block of docs/latents.md, in order, on the tiny saved run of the fixture."""
    import shutil

    shutil.copytree(REPO / "tests" / "fixtures" / "checkpoint-13e79a1", tmp_path / "runs" / "lvae5")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYRO_LVAE_DATA", str(shared_data_root))
    page = (REPO / "docs" / "latents.md").read_text()
    namespace: dict = {}
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    for block in blocks:
        exec(compile(block, "latents.md", "exec"), namespace)
    assert len(blocks) == 6
    assert (
        namespace["data_share"].shape == (100, 4)
        and ((namespace["data_share"] > 0) & (namespace["data_share"] < 1)).all()
    )
    assert namespace["x_draws"].shape == (10, 5, 784)
