"""Pretrained models: export, offline loading, the sha256 check and the check value."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer import Importance

from pyro_lvae import evaluate, load_pretrained
from pyro_lvae.pretrained import MANIFEST_NAME, available, check_value, config_of, export_run, read_manifest
from pyro_lvae.training import load_run
from pyro_lvae.training.batches import prepare_data

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint-13e79a1"


@pytest.fixture(scope="module")
def exported_once(tmp_path_factory, shared_data_root) -> Path:
    root = tmp_path_factory.mktemp("export")
    shutil.copytree(FIXTURE, root / "run")
    export_run(root / "run", root / "pretrained", name="tiny-lvae", commit="test", data_root=shared_data_root)
    return root / "pretrained"


@pytest.fixture
def exported(exported_once, tmp_path) -> Path:
    """The fixture run exported into a folder of its own, with a manifest (a fresh copy per test)."""
    return shutil.copytree(exported_once, tmp_path / "pretrained")


def test_export_writes_the_weights_and_a_complete_manifest_entry(exported):
    entry = read_manifest(exported)["tiny-lvae"]
    results = json.loads((FIXTURE / "results.json").read_text())
    assert entry["test_log_likelihood"] == results["test_log_likelihood"] and entry["epochs"] == 2
    assert entry["check"]["num_samples"] == 1000 and entry["check"]["num_examples"] == 100
    assert len(entry["sha256"]) == 64 and entry["commit"] == "test"
    state = torch.load(exported / "tiny-lvae.pt", weights_only=True)
    assert "optimizer" not in state and not any(k.startswith("model.") for k in state["guide"])
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())


def test_loaded_model_equals_the_trained_one_and_loads_offline(exported, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("load_pretrained tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model, guide = load_pretrained(exported / "tiny-lvae.pt")
    assert not model.training and not guide.training
    trained, trained_guide, _, _ = load_run(FIXTURE)
    for a, b in zip(model.state_dict().values(), trained.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(guide.state_dict().values(), trained_guide.state_dict().values()):
        assert torch.equal(a, b)


def test_the_check_value_is_reproduced(exported, shared_data_root):
    pyro.clear_param_store()
    model, guide = load_pretrained(exported / "tiny-lvae.pt")
    value = check_value(model, guide, config_of(exported / "tiny-lvae.pt"), data_root=shared_data_root)
    assert value == pytest.approx(read_manifest(exported)["tiny-lvae"]["check"]["value"], abs=1e-3)
    assert -800 < value < -100  # a log-likelihood of binary 28×28 images, not a placeholder
    # It is L_1000, not the ELBO: above the ELBO of the same images by the importance-sampling gap.
    config = config_of(exported / "tiny-lvae.pt").replace(test_subset=100, seed=0)
    images = prepare_data(config, data_root=shared_data_root).test
    assert value > evaluate(model, guide, images, num_samples=1, seed=0)["elbo"] + 1.0


def test_a_corrupted_file_names_the_file_and_the_sha256_mismatch(exported):
    path = exported / "tiny-lvae.pt"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as info:
        load_pretrained(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "sha256" in message
    assert read_manifest(exported)["tiny-lvae"]["sha256"] in message


def test_a_loaded_model_works_with_importance_sampling_and_sampling(exported):
    model, guide = load_pretrained(exported / "tiny-lvae.pt")
    x = torch.bernoulli(torch.full((1, 784), 0.1))
    posterior = Importance(model, guide, num_samples=50).run(x)
    assert torch.isfinite(posterior.get_log_normalizer())
    assert model.sample(3).shape == (3, 784)
    assert evaluate(model, guide, x.expand(4, -1), num_samples=10)["log_likelihood"] < 0


def test_unknown_names_get_one_line_with_the_available_ones(tmp_path):
    with pytest.raises(ValueError, match="No pretrained model 'lvae-bn-wu-9'.*shipped one"):
        load_pretrained("lvae-bn-wu-9")
    assert available() == sorted(read_manifest())  # the shipped manifest, possibly empty
    (tmp_path / MANIFEST_NAME).write_text("{}")
    with pytest.raises(ValueError, match="not a pyro-lvae pretrained file"):
        bogus = tmp_path / "bogus.pt"
        torch.save({"weights": torch.zeros(2)}, bogus)
        load_pretrained(bogus)


def test_cli_export_writes_a_loadable_file(tmp_path, shared_data_root, capsys):
    from pyro_lvae.cli import main

    run = shutil.copytree(FIXTURE, tmp_path / "run")
    out = tmp_path / "out"
    status = main(["export", str(run), "--name", "tiny", "--out", str(out), "--data-root", str(shared_data_root)])
    assert status == 0 and json.loads(capsys.readouterr().out)["file"] == "tiny.pt"
    model, _ = load_pretrained(out / "tiny.pt")
    assert model.config.latent_sizes == (4, 2)


def test_a_model_from_a_hand_written_loop_saves_and_loads(tmp_path):
    from pyro.infer import SVI
    from pyro.optim import Adam

    from pyro_lvae import BottomUpGuide, GenerativeModel, elbo_for, get_preset
    from pyro_lvae.pretrained import save_pretrained

    config = get_preset("vae-bn-2").replace(latent_sizes=(4, 2), hidden_sizes=(16, 8))
    model = GenerativeModel(config.model)
    guide = BottomUpGuide(model)
    svi = SVI(model, guide, Adam({"lr": 1e-2}), loss=elbo_for(guide))
    for _ in range(3):
        svi.step(torch.bernoulli(torch.full((16, 784), 0.2)))
    save_pretrained(model, guide, config, tmp_path / "mine.pt", epochs=3)
    pyro.clear_param_store()
    loaded, loaded_guide = load_pretrained(tmp_path / "mine.pt")
    assert type(loaded_guide).__name__ == "BottomUpGuide"
    for mine, theirs in ((model, loaded), (guide, loaded_guide)):  # the trained weights of both
        assert mine.state_dict().keys() == theirs.state_dict().keys()
        assert all(torch.equal(a, theirs.state_dict()[k]) for k, a in mine.state_dict().items())
    assert config_of(tmp_path / "mine.pt") == config


def test_the_paper_length_models_ship_with_the_package():
    assert available() == ["lvae-bn-wu-5", "vae-bn-wu-3"]
    for name in available():
        entry = read_manifest()[name]
        assert entry["epochs"] == 2000 and entry["num_importance_samples"] == 5000
        assert entry["num_test_examples"] == 10_000 and entry["preset"] == name
        results = json.loads((REPO / "experiments" / "full" / f"{name}-seed0" / "results.json").read_text())
        assert entry["test_log_likelihood"] == results["test_log_likelihood"]  # the run's own results.json
        assert entry["test_elbo"] == results["test_elbo"]


@pytest.mark.parametrize("name", ["lvae-bn-wu-5", "vae-bn-wu-3"])
def test_a_shipped_model_loads_offline_by_name_and_reproduces_its_check_value(name, shared_data_root, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("load_pretrained tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    pyro.clear_param_store()
    model, guide = load_pretrained(name)
    assert not model.training and not guide.training
    assert config_of(name).name == name and config_of(name).train.epochs == 2000
    value = check_value(model, guide, config_of(name), data_root=shared_data_root)
    assert value == pytest.approx(read_manifest()[name]["check"]["value"], abs=1e-3)
    # Trained 2000 epochs: far above an untrained model's -540 nats on these images.
    assert -85 < value < -75
