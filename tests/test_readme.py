"""The README's commands and its Python example are the real ones."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_two_one_line_commands():
    first, second = _blocks("bash")[:2]
    assert len(first.strip().splitlines()) == 1 and "pyro-lvae train" in first
    assert len(second.strip().splitlines()) == 1 and "pytest" in second


def test_ci_runs_exactly_the_readme_test_command():
    test_command = _blocks("bash")[1].strip()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_python_example_runs(shared_data_root, monkeypatch):
    monkeypatch.setenv("PYRO_LVAE_DATA", str(shared_data_root))
    code = _blocks("python")[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    results = namespace["results"]
    assert results["elbo"] > -250  # 80 steps on 2000 digits: far above an untrained model's ~ -545
    assert results["log_likelihood"] >= results["elbo"]
