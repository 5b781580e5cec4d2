"""The VQ-VAE: nearest-code quantization, straight-through gradients, the VQ terms and the ELBO."""

from __future__ import annotations

import math

import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyro_lvae import evaluate, get_preset, make_guide, make_model
from pyro_lvae.config import ModelConfig
from pyro_lvae.models.vqvae import VQVAEGuide, VQVAEModel, vq_statistics
from pyro_lvae.training import train


def _small(**overrides) -> tuple[VQVAEModel, VQVAEGuide]:
    kwargs = dict(
        family="vqvae",
        guide="vae",
        input_dim=12,
        latent_sizes=(3,),
        hidden_sizes=(16,),
        codebook_size=5,
        code_dim=4,
        batch_norm=False,
    )
    kwargs.update(overrides)
    model = make_model(ModelConfig(**kwargs))
    with torch.no_grad():
        model.codebook.normal_()  # codes far apart, so that the nearest one is unambiguous
    return model, make_guide(model)


def test_quantize_returns_the_nearest_codebook_vector():
    model, guide = _small()
    z_e = torch.randn(7, 3, 4)
    indices, e, z_st = guide.quantize(z_e)
    brute = torch.cdist(z_e.reshape(-1, 4), model.codebook).argmin(-1).reshape(7, 3)
    assert torch.equal(indices, brute)
    torch.testing.assert_close(e, model.codebook[brute])
    torch.testing.assert_close(z_st, e)  # the straight-through value is the code, numerically


def test_straight_through_gradient_reaches_the_encoder():
    model, guide = _small()
    x = torch.bernoulli(torch.full((6, 12), 0.5))
    z_e = guide.encode(x)
    _, _, z_st = guide.quantize(z_e)
    z_q = z_st.detach().requires_grad_(True)
    (grad_q,) = torch.autograd.grad(model.likelihood(z_q).log_prob(x).sum(), z_q)
    (grad_e,) = torch.autograd.grad(model.likelihood(z_st).log_prob(x).sum(), z_e)
    torch.testing.assert_close(grad_e, grad_q)  # the decoder-input gradient, copied to z_e
    assert grad_e.abs().sum() > 0
    loss = Trace_ELBO().differentiable_loss(model, guide, x)
    loss.backward()
    assert guide.encoder.net[0].weight.grad.abs().sum() > 0
    assert model.codebook.grad.abs().sum() > 0


def test_commitment_term_pulls_encoder_outputs_toward_their_codes():
    model, guide = _small()
    x = torch.bernoulli(torch.full((32, 12), 0.5))
    # Step the encoder only: the codebook stays where it is.
    opt = torch.optim.SGD(list(guide.encoder.parameters()) + list(guide.project.parameters()), lr=0.05)

    def distance() -> float:
        z_e = guide.encode(x)
        return (z_e - guide.quantize(z_e)[1]).pow(2).sum((-2, -1)).mean().item()

    before = distance()
    for _ in range(30):
        # The guide's vq_loss factor: its only encoder gradient is the commitment term's.
        vq = poutine.trace(guide).get_trace(x).nodes["vq_loss"]["fn"].log_factor.sum()
        opt.zero_grad()
        vq.backward()
        opt.step()
    assert distance() < 0.5 * before


def test_loss_is_reconstruction_plus_constant_kl_plus_vq_terms():
    model, guide = _small()
    x = torch.bernoulli(torch.full((9, 12), 0.5))
    loss = Trace_ELBO().loss(model, guide, x)
    z_e = guide.encode(x)
    _, e, z_q = guide.quantize(z_e)
    nll = -model.likelihood(z_q).log_prob(x).sum().item()
    kl = 9 * 3 * math.log(5)
    vq = ((z_e - e).pow(2).sum((-2, -1)) * (1 + 0.25)).sum().item()
    assert loss == pytest.approx(nll + kl + vq, rel=1e-5)
    # The evaluation reads only z1 and x: the ELBO under the uniform prior, and L_K = ELBO.
    model.eval()
    guide.eval()
    ev = evaluate(model, guide, x, num_samples=7)
    assert ev["elbo"] == pytest.approx(-(nll + kl) / 9, rel=1e-5)
    assert ev["log_likelihood"] == pytest.approx(ev["elbo"], rel=1e-6)
    stats = vq_statistics(model, guide, x)
    assert stats["elbo"] == pytest.approx(ev["elbo"], rel=1e-5) and stats["kl"] == pytest.approx(3 * math.log(5))


@pytest.mark.parametrize("ema", [False, True])
def test_vqvae_trains_from_its_preset_and_uses_several_codes(mnist, ema):
    config = get_preset("vqvae").replace(
        epochs=2,
        train_subset=2000,
        test_subset=300,
        hidden_sizes=(128,),
        batch_size=100,
        codebook_ema=ema,
    )
    result = train(config, dataset=mnist, progress=False)
    vq = result.results["vq"]
    assert vq["codes_used"] > 1 and vq["perplexity"] > 1
    assert result.results["test_log_likelihood"] == pytest.approx(result.results["test_elbo"], rel=1e-6)
    assert result.results["test_elbo"] == pytest.approx(vq["elbo"], rel=1e-4)
    assert result.metrics[-1]["test_elbo"] > -545  # better than an untrained Bernoulli(0.5) decoder


def _ema_model(codes: int = 8) -> tuple[VQVAEModel, VQVAEGuide]:
    model = make_model(
        ModelConfig(
            family="vqvae",
            guide="vae",
            input_dim=784,
            latent_sizes=(16,),
            hidden_sizes=(64,),
            codebook_size=codes,
            code_dim=16,
            batch_norm=False,
            codebook_ema=True,
            ema_decay=0.9,
        )
    )
    return model, make_guide(model)


def test_one_ema_update_moves_the_used_codes_to_the_smoothed_average_and_keeps_the_others():
    model, guide = _ema_model(64)
    x = torch.bernoulli(torch.full((32, 784), 0.3))
    before = model.codebook.clone()
    with torch.no_grad():
        z_e = guide.encode(x)
        indices = guide.quantize(z_e)[0]
    guide(x)  # training mode, gradients on: one EMA update
    flat, idx = z_e.reshape(-1, 16), indices.reshape(-1)
    counts = torch.bincount(idx, minlength=64).float()
    used = counts > 0
    assert 0 < used.sum() < 64  # both kinds of code exist in this batch
    # N = (1 - γ) n, m = (1 - γ) Σ z_e, e = m / Ñ with Laplace smoothing of N.
    n_ema = 0.1 * counts
    smoothed = (n_ema + 1e-5) / (n_ema.sum() + 64e-5) * n_ema.sum()
    sums = torch.zeros(64, 16).index_add_(0, idx, flat) * 0.1
    torch.testing.assert_close(model.codebook[used], sums[used] / smoothed[used, None], rtol=1e-5, atol=1e-6)
    assert torch.equal(model.codebook[~used], before[~used]) and torch.isfinite(model.codebook).all()
    # The used codes sit among the encodings, not 10^4 times farther out.
    assert model.codebook.norm(dim=1).max() < 2 * flat.norm(dim=1).max()


def test_the_ema_codebook_gets_no_gradient_and_does_not_move_in_evaluation_mode():
    model, guide = _ema_model()
    assert not model.codebook.requires_grad and "codebook" not in dict(model.named_parameters())
    x = torch.bernoulli(torch.full((16, 784), 0.3))
    state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("codebook", "ema_"))}
    guide.eval()
    guide(x)
    with torch.no_grad():
        guide.train()
        guide(x)  # no gradient: an evaluation pass in training mode does not update either
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
