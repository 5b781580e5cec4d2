"""Comparing guides on one fixed model: fit_guide and the paired compare."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_lvae import BottomUpGuide, GenerativeModel, LadderGuide, ModelConfig
from pyro_lvae.inference.comparison import compare, fit_guide, khat_threshold, own_parameters, paired_difference


def _model() -> GenerativeModel:
    return GenerativeModel(ModelConfig(input_dim=12, latent_sizes=(4, 2), hidden_sizes=(16, 8), batch_norm=True))


def _data(n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    protos = torch.rand(2, 12, generator=g)
    return torch.bernoulli(protos[torch.randint(0, 2, (n,), generator=g)], generator=g)


def test_paired_difference_of_a_known_case():
    reference = torch.tensor([-90.0, -85.0, -100.0, -70.0])
    values = reference + torch.tensor([1.0, 2.0, 3.0, 4.0])
    d = paired_difference(values, reference)
    assert d.mean == pytest.approx(2.5)
    assert d.standard_error == pytest.approx(math.sqrt(5 / 3) / 2)  # sample std of 1..4 over sqrt(4)
    with pytest.raises(ValueError, match="N >= 2"):
        paired_difference(values[:1], reference[:1])


def test_khat_threshold_follows_vehtari_et_al():
    assert khat_threshold(100) == pytest.approx(0.5)
    assert khat_threshold(1000) == pytest.approx(2 / 3)
    assert khat_threshold(5000) == 0.7


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_fit_guide_trains_the_guide_only(guide_cls):
    model = _model()
    guide = guide_cls(model)
    model_state = {k: v.clone() for k, v in model.state_dict().items()}  # parameters and BN statistics
    own_before = [p.detach().clone() for p in own_parameters(model, guide)]
    losses = fit_guide(model, guide, _data(), epochs=10, batch_size=16, learning_rate=1e-2)
    for key, value in model.state_dict().items():
        assert torch.equal(value, model_state[key]), key
    assert all(not torch.equal(a, b) for a, b in zip(own_before, own_parameters(model, guide)))
    assert losses[-1] < 0.95 * losses[0]  # a fixed random model: the guide alone closes part of the gap
    assert model.training and not guide.training
    assert all(p.requires_grad for p in model.parameters())
    if guide_cls is LadderGuide:
        # The top-down networks the ladder guide merges are the model's: not its own.
        shared = {id(p) for p in model.top_down_heads.parameters()}
        assert shared.isdisjoint(id(p) for p in own_parameters(model, guide))


def test_compare_pairs_guides_on_the_same_draws():
    model = _model()
    ladder, bottom_up = LadderGuide(model), BottomUpGuide(model)
    x = _data(32)
    fit_guide(model, ladder, x, epochs=3, batch_size=16)
    fit_guide(model, bottom_up, x, epochs=3, batch_size=16)
    table = compare(model, {"ladder": ladder, "again": ladder, "bottom-up": bottom_up}, x, num_samples=50)
    # The same guide under the same seed: identical draws, a difference of exactly zero.
    assert table.elbo_difference["again"].mean == 0 and table.elbo_difference["again"].standard_error == 0
    d = table.log_likelihood_difference["bottom-up"]
    assert d.mean == pytest.approx(table.log_likelihood["bottom-up"] - table.log_likelihood["ladder"], abs=1e-4)
    assert d.standard_error > 0
    assert set(table.share_khat_above) == {"ladder", "again", "bottom-up"}
    assert all(0 <= s <= 1 for s in table.share_khat_above.values())
    assert table.khat_threshold == pytest.approx(khat_threshold(50))
    assert "| bottom-up |" in table.to_markdown() and "reference" in table.to_markdown()
    with pytest.raises(ValueError, match="at least 11"):
        compare(model, {"ladder": ladder}, x, num_samples=5)


def test_several_guides_of_one_model_are_fitted_and_compared_without_renaming(recwarn):
    model = _model()
    first, second = LadderGuide(model), LadderGuide(model)
    x = _data(32)
    fit_guide(model, first, x, epochs=1, batch_size=16)
    fit_guide(model, second, x, epochs=1, batch_size=16)
    compare(model, {"first": first, "second": second}, x, num_samples=20)
    assert first.name == second.name == "lvae.ladder"
    assert not [w for w in recwarn if "param store" in str(w.message)]


def test_fit_guide_keeps_an_evaluation_mode_model_in_evaluation_mode_and_drops_a_last_single_example():
    model = _model().eval()
    guide = LadderGuide(model)  # holds the model: guide.train() would reach it
    losses = fit_guide(model, guide, _data(33), epochs=1, batch_size=16)  # batches of 16, 16 and 1
    assert not model.training and len(losses) == 1
