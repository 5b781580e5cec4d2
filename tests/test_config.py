"""Configs validate themselves; presets and overrides."""

from __future__ import annotations

import dataclasses

import pytest

from pyro_lvae import PRESETS, ExperimentConfig, ModelConfig, TrainConfig, get_preset
from pyro_lvae.repro.presets import AUTHORS_CODE


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(latent_sizes=(64, 32), hidden_sizes=(512,)), "same length"),
        (dict(latent_sizes=(64, 0), hidden_sizes=(512, 256)), "positive integers"),
        (dict(latent_sizes=(), hidden_sizes=()), "non-empty"),
        (dict(activation="relu6"), "Unknown activation"),
        (dict(likelihood="poisson"), "Unknown likelihood"),
        (dict(guide="iaf"), "Unknown guide"),
        (dict(input_dim=-3), "input_dim"),
        (dict(batch_norm="yes"), "batch_norm"),
    ],
)
def test_invalid_model_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epochs=0), "epochs"),
        (dict(batch_size=-1), "batch_size"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(dataset="cifar"), "Unknown dataset"),
        (dict(warmup_epochs=-5), "warmup_epochs"),
        (dict(dataset="binarized_mnist", binarization="dynamic"), "static"),
        (dict(finetune_epochs=-1), "finetune_epochs"),
        (dict(finetune_iw_samples=0), "finetune_iw_samples"),
        (dict(finetune_lr_decay=1.5), "finetune_lr_decay"),
        (dict(finetune_decay_every=0), "finetune_decay_every"),
        (dict(compile="yes"), r"^compile must be True or False, got 'yes'\.$"),
        (
            dict(compile=True, engine="cuda-graph"),
            r"^compile runs on the fast engine, not 'cuda-graph'; set engine='fast' or compile",
        ),
        (dict(compile=True, free_bits=1.0), r"^compile runs without free bits"),
    ],
)
def test_invalid_train_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_likelihood_and_binarization_must_agree():
    with pytest.raises(ValueError, match="Bernoulli likelihood needs binary"):
        ExperimentConfig(model=ModelConfig(likelihood="bernoulli"), train=TrainConfig(binarization="none"))
    with pytest.raises(ValueError, match="Gaussian likelihood"):
        ExperimentConfig(model=ModelConfig(likelihood="gaussian"), train=TrainConfig(binarization="dynamic"))


def test_compile_is_refused_for_a_family_without_the_closed_form():
    with pytest.raises(ValueError, match=r"^compile applies to the closed-form loss of the LVAE family, not 'vlae'"):
        ExperimentConfig(model=ModelConfig(family="vlae", guide="vae"), train=TrainConfig(compile=True))
    assert ExperimentConfig(train=TrainConfig(compile=True)).train.compile


def test_presets():
    # 4 variants × 5 depths × 4 settings, two fine-tuning presets, vlae-3 and vqvae, and the
    # 20 MNIST presets with the authors' code settings
    assert len(PRESETS) == 104
    omniglot = get_preset("omniglot-lvae-bn-wu-3")
    assert omniglot.train.dataset == "omniglot28" and omniglot.train.epochs == 1500
    assert omniglot.model.likelihood == "bernoulli" and omniglot.train.binarization == "dynamic"
    for name, dataset, dim in (("norb-gauss-vae-bn-2", "norb", 1024), ("fashion-gauss-vae-bn-2", "fashion_mnist", 784)):
        cfg = get_preset(name)
        assert (cfg.train.dataset, cfg.model.input_dim) == (dataset, dim)
        assert (
            cfg.model.likelihood == "gaussian" and cfg.model.activation == "tanh" and cfg.train.binarization == "none"
        )
        assert cfg.train.epochs == 2000
    ft = get_preset("lvae-bn-wu-5-ft-iw10").train
    assert (ft.epochs, ft.finetune_epochs, ft.finetune_mc_samples, ft.finetune_iw_samples) == (2000, 2000, 10, 10)
    assert (ft.finetune_lr_decay, ft.finetune_decay_every) == (0.75, 200)
    assert get_preset("lvae-bn-wu-5-ft").train.finetune_iw_samples == 1
    assert get_preset("vlae-3").model.family == "vlae" and get_preset("vqvae").model.family == "vqvae"
    lvae = get_preset("lvae-bn-wu-5")
    assert lvae.model.latent_sizes == (64, 32, 16, 8, 4)
    assert lvae.model.hidden_sizes == (512, 256, 128, 64, 32)
    assert lvae.model.guide == "ladder" and lvae.model.batch_norm and lvae.train.warmup_epochs == 200
    assert lvae.train.epochs == 2000 and lvae.train.learning_rate == 1e-3 and lvae.train.batch_size == 256
    vae2 = get_preset("vae-2")
    assert vae2.model.latent_sizes == (64, 32) and not vae2.model.batch_norm and vae2.train.warmup_epochs == 0
    assert get_preset("vae-bn-3").model.batch_norm and get_preset("vae-bn-3").train.warmup_epochs == 0
    with pytest.raises(ValueError, match="Unknown preset"):
        get_preset("lvae-9")


def test_replace_and_round_trip():
    cfg = get_preset("vae-bn-wu-3").replace(epochs=7, batch_norm=False, latent_sizes=(8, 4, 2))
    assert cfg.train.epochs == 7 and not cfg.model.batch_norm
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="Unknown configuration key 'epoch'"):
        cfg.replace(epoch=3)
    with pytest.raises(ValueError, match="same length"):
        cfg.replace(latent_sizes=(8, 4))
    with pytest.raises(ValueError, match="not written by this version"):
        ExperimentConfig.from_dict({"model": {"bogus": 1}, "train": {}})


def test_paper_presets_follow_the_paper_text_and_authors_presets_the_authors_code():
    paper, authors = get_preset("lvae-bn-wu-5"), get_preset("lvae-bn-wu-5-authors")
    assert (paper.model.leaky_slope, paper.model.ladder_share_params, paper.model.only_mu_up) == (0.1, True, False)
    assert (paper.train.adam_eps, paper.train.grad_clip, paper.train.grad_clip_value) == (1e-8, 0.0, 0.0)
    assert paper.model.variance_floor == 1e-5  # the one deviation, needed to finish a run
    assert (authors.model.leaky_slope, authors.model.ladder_share_params, authors.model.only_mu_up) == (
        0.01,
        False,
        True,
    )
    # The authors' thresholds are for the gradient of the batch-mean loss; this library's
    # loss is the batch sum (batch 256), so they are scaled by 256.
    assert authors.train.learning_rate == 2e-4 and authors.train.adam_eps == pytest.approx(1e-4 * 256)
    assert authors.train.grad_clip == pytest.approx(4.0 * 256) and authors.train.grad_clip_value == pytest.approx(
        0.9 * 256
    )
    # Otherwise the same experiment: data, architecture, schedule.
    changed = set(AUTHORS_CODE) | {"ladder_share_params", "only_mu_up"}
    for section in ("model", "train"):
        a, p = authors.to_dict()[section], paper.to_dict()[section]
        assert {k for k in a if a[k] != p[k]} <= changed
    vae = get_preset("vae-bn-wu-3-authors")
    assert vae.model.guide == "vae" and vae.train.grad_clip == 4.0 * 256 and vae.model.ladder_share_params
    assert sum(name.endswith("-authors") for name in PRESETS) == 20


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(adam_eps=0.0), "adam_eps"),
        (dict(grad_clip=-1.0), "grad_clip"),
        (dict(grad_clip_value=float("inf")), "grad_clip_value"),
    ],
)
def test_invalid_optimizer_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match", [(dict(leaky_slope=1.5), "leaky_slope"), (dict(only_mu_up="yes"), "only_mu_up")]
)
def test_invalid_authors_code_model_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_one_parser_reads_every_field_type_for_the_cli_and_the_sweep():
    from pyro_lvae.config import parse_field
    from pyro_lvae.repro.sweep import parse_override

    assert parse_field("epochs", "12") == 12 and parse_field("learning_rate", "2e-4") == 2e-4
    assert parse_field("hidden_sizes", "512,256") == (512, 256) and parse_field("only_mu_up", "yes") is True
    assert parse_field("guide", "bottom-up") == "vae" and parse_field("dataset", "omniglot28") == "omniglot28"
    assert parse_override("guide=bottom-up") == ("guide", "vae")  # the sweep reads values the same way
    with pytest.raises(ValueError, match="activation: choose one of leaky_relu, tanh, identity, got 'relu6'"):
        parse_field("activation", "relu6")
    with pytest.raises(ValueError, match="Unknown configuration key 'epoch'"):
        parse_field("epoch", "3")


def test_the_parser_reads_every_fields_default_back_from_its_text_form():
    """Each field's default, written as text, parses back to itself: the parser follows the
    annotation of every field, not a list of known type names."""
    from pyro_lvae.config import parse_field

    def as_text(value):
        if isinstance(value, bool):
            return str(value).lower()
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    checked = 0
    for cls in (ModelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            parsed = parse_field(f.name, as_text(default))
            assert parsed == default and type(parsed) is type(default), f.name
            checked += 1
    assert checked > 40


def test_the_parser_handles_annotations_no_field_has_yet():
    from pyro_lvae.config import _parse_as, type_form

    assert _parse_as(int | None, "none") is None and _parse_as(int | None, "7") == 7
    assert _parse_as(tuple[int, float], "3, 0.5") == (3, 0.5)
    assert _parse_as(tuple[float, ...], "1e-3,2") == (1e-3, 2.0)
    assert _parse_as(float | str, "2.5") == 2.5 and _parse_as(float | str, "auto") == "auto"
    with pytest.raises(ValueError):
        _parse_as(tuple[int, float], "1,2,3")  # a fixed-length tuple needs exactly its arms
    with pytest.raises(ValueError):
        _parse_as(bool, "maybe")
    assert type_form(tuple[float, ...]) == "comma-separated numbers"


def test_the_guide_can_be_named_bottom_up_in_python_too():
    config = ModelConfig(guide="bottom-up")
    assert config.guide == "vae" and config == ModelConfig(guide="vae")
    with pytest.raises(ValueError, match="choose one of ladder, vae"):
        ModelConfig(guide="bottomup")
