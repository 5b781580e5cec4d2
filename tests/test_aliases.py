"""The module paths of the flat layout still import, as the very same modules."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from pyro_lvae._aliases import FLAT_NAMES


@pytest.mark.parametrize("old, new", sorted(FLAT_NAMES.items()))
def test_every_flat_path_is_the_module_in_its_subpackage(old, new):
    alias = importlib.import_module(f"pyro_lvae.{old}")
    assert alias is importlib.import_module(f"pyro_lvae.{new}")
    assert alias.__name__ == alias.__spec__.name == f"pyro_lvae.{new}"


def test_an_old_import_first_in_a_fresh_process_gives_the_same_objects():
    code = (
        "from pyro_lvae.model import GenerativeModel\n"
        "from pyro_lvae.engine import TrainingStep\n"
        "import pyro_lvae.models.model as m, pyro_lvae.training.steps as s\n"
        "assert GenerativeModel is m.GenerativeModel and TrainingStep is s.TrainingStep\n"
        "assert GenerativeModel.__module__ == 'pyro_lvae.models.model'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_name_that_never_existed_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("pyro_lvae.modle")


def test_submodules_are_attributes_after_a_bare_import():
    code = "import pyro_lvae as p; print(len(p.presets.PRESETS) > 0, p.models.__name__, p.engine.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "pyro_lvae.models", "pyro_lvae.training.steps"], out.stderr
