"""The convolutional bottom layer (ModelConfig.bottom = "conv") and user-supplied bottom networks."""

from __future__ import annotations

import pytest
import torch
from pyro.infer import Predictive
from torch import nn

from pyro_lvae import BottomUpGuide, ExperimentConfig, GenerativeModel, LadderGuide, ModelConfig, TrainConfig, evaluate
from pyro_lvae.models.nn import ConvDecoder, ConvEncoder
from pyro_lvae.training import load_run, train

CONV = ModelConfig(input_dim=784, latent_sizes=(16, 8), hidden_sizes=(64, 32), bottom="conv", conv_channels=8)


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_the_conv_bottom_replaces_only_the_networks_next_to_x(guide_cls):
    model = GenerativeModel(CONV)
    guide = guide_cls(model)
    assert isinstance(model.decoder_mlp, ConvDecoder)
    first = guide.upward_net["mlps"][0] if guide_cls is LadderGuide else guide.mlps[0]
    assert isinstance(first, ConvEncoder)
    rest = guide.upward_net["mlps"][1:] if guide_cls is LadderGuide else guide.mlps[1:]
    assert not any(isinstance(m, (ConvEncoder, ConvDecoder)) for m in list(rest) + list(model.top_down_mlps))
    x = torch.bernoulli(torch.full((5, 784), 0.3))
    assert first(x).shape == (5, 64)
    assert model.decoder_head(model.decoder_mlp(torch.randn(3, 5, 16))).shape == (3, 5, 784)  # particle dims


def test_the_conv_bottom_trains_on_real_mnist_and_its_bound_is_ordered(mnist, tmp_path):
    config = ExperimentConfig(
        model=CONV,
        train=TrainConfig(
            epochs=6,
            warmup_epochs=0,
            eval_every=2,
            batch_size=64,
            train_subset=2048,
            test_subset=256,
            num_importance_samples=50,
        ),
        name="conv-test",
    )
    config = config.replace(conv_channels=4, hidden_sizes=(32, 16), batch_size=32, train_subset=1024, test_subset=128)
    result = train(config, out_dir=tmp_path / "run", dataset=mnist, progress=False)
    elbos = [m["test_elbo"] for m in result.metrics if "test_elbo" in m]
    assert result.metrics[-1]["epoch"] == 6 and len(elbos) == 3
    assert elbos[-1] > elbos[0] + 10, elbos  # epochs 2 → 6, 128 more steps: the test ELBO rises clearly
    assert result.results.test_log_likelihood >= result.results.test_elbo
    model, guide, _, _ = load_run(tmp_path / "run")  # the checkpoint round trip
    again = evaluate(model, guide, result.data.test, num_samples=50, seed=0)
    before = evaluate(result.model.eval(), result.guide.eval(), result.data.test, num_samples=50, seed=0)
    assert again["log_likelihood"] == pytest.approx(before["log_likelihood"], abs=1e-5)


def test_your_own_bottom_networks_plug_in():
    config = ModelConfig(input_dim=12, latent_sizes=(3, 2), hidden_sizes=(8, 4), batch_norm=False)
    decoder = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 12))  # z1 -> Bernoulli logits
    model = GenerativeModel(config, decoder=decoder)
    encoder = nn.Sequential(nn.Linear(12, 8), nn.Tanh())  # x -> d1 of hidden_sizes[0]
    guide = LadderGuide(model, encoder=encoder)
    assert model.decoder_mlp is decoder and guide.upward_net["mlps"][0] is encoder
    out = evaluate(model, guide, torch.bernoulli(torch.full((6, 12), 0.5)), num_samples=10)
    assert out["log_likelihood"] >= out["elbo"]


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(input_dim=100), "side is a multiple of 4"),
        (dict(input_dim=50), "square images"),
        (dict(family="vlae", guide="vae"), "built for the LVAE family"),
        (dict(bottom="cnn"), "Unknown bottom 'cnn'; choose one of mlp, conv"),
        (dict(conv_channels=0), "conv_channels must be a positive integer"),
    ],
)
def test_a_conv_bottom_that_cannot_fit_is_refused(options, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{"latent_sizes": (4, 2), "hidden_sizes": (8, 4), "bottom": "conv", **options})


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
@pytest.mark.parametrize("shape", [(3, 700), (3, 28, 28)])
def test_x_that_does_not_fit_the_bottom_gets_one_clear_line(guide_cls, shape):
    """An image left unflattened, or of another size, is refused by the model, the guide,
    evaluate and Predictive with one sentence naming the fix, not a reshape error from inside."""
    model = GenerativeModel(ModelConfig(latent_sizes=(4, 2), hidden_sizes=(16, 8), bottom="conv", conv_channels=4))
    guide = guide_cls(model)
    model.eval(), guide.eval()
    x = torch.rand(shape).bernoulli()
    match = r"expects input_dim=784 features per example in its last dimension; flatten each image"
    for call in (
        lambda: model(x),
        lambda: guide(x),
        lambda: evaluate(model, guide, x if x.dim() == 2 else x.reshape(3, -1)[:, :700], num_samples=2),
        lambda: Predictive(model, guide=guide, num_samples=2)(x),
    ):
        with pytest.raises(ValueError, match=match):
            call()


def test_your_own_encoder_plugs_into_the_bottom_up_guide():
    config = ModelConfig(input_dim=12, latent_sizes=(3, 2), hidden_sizes=(8, 4), batch_norm=False)
    model = GenerativeModel(config)
    encoder = nn.Sequential(nn.Linear(12, 8), nn.Tanh())  # x -> the first hidden layer
    guide = BottomUpGuide(model, encoder=encoder)
    assert guide.mlps[0] is encoder
    out = evaluate(model, guide, torch.bernoulli(torch.full((6, 12), 0.5)), num_samples=10)
    assert out["log_likelihood"] >= out["elbo"]
