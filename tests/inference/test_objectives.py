"""The fine-tuning objective: the importance-weighted bound, per example."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import RenyiELBO

from pyro_lvae import BottomUpGuide, GenerativeModel, LadderGuide, ModelConfig
from pyro_lvae.inference.evaluation import importance_sampled_bounds
from pyro_lvae.inference.objectives import ImportanceWeightedLoss, importance_weighted_loss
from pyro_lvae.training.steps import TrainingStep, trainable_parameters

GUIDES = {"ladder": LadderGuide, "vae": BottomUpGuide}


def _model(batch_norm: bool = False) -> GenerativeModel:
    cfg = ModelConfig(input_dim=10, latent_sizes=(4, 3), hidden_sizes=(16, 8), batch_norm=batch_norm)
    return GenerativeModel(cfg)


def _data(n: int = 6) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, 10), 0.4), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("guide_cls", GUIDES.values(), ids=GUIDES.keys())
def test_iwae_objective_equals_vectorized_l_k_on_the_same_draws(guide_cls):
    model = _model().eval()
    guide = guide_cls(model).eval()
    x = _data()
    pyro.set_rng_seed(11)
    loss = importance_weighted_loss(model, guide, x, mc_samples=1, iw_samples=50)
    pyro.set_rng_seed(11)
    bounds = importance_sampled_bounds(model, guide, x, num_samples=50, chunk_size=50)
    assert loss.item() == pytest.approx(-bounds["log_likelihood"].sum().item(), rel=1e-6)
    # M Monte Carlo samples of K: the mean over m of the per-m L_K, on the same M × K draws.
    pyro.set_rng_seed(11)
    loss = importance_weighted_loss(model, guide, x, mc_samples=5, iw_samples=10)
    pyro.set_rng_seed(11)
    log_w = importance_sampled_bounds(model, guide, x, num_samples=50, chunk_size=50)["log_weights"]
    expected = (torch.logsumexp(log_w.reshape(5, 10, -1), 1) - math.log(10)).mean(0).sum()
    assert loss.item() == pytest.approx(-expected.item(), rel=1e-6)
    # K = 1: the Monte Carlo ELBO.
    pyro.set_rng_seed(11)
    loss = importance_weighted_loss(model, guide, x, mc_samples=50, iw_samples=1)
    assert loss.item() == pytest.approx(-log_w.mean(0).sum().item(), rel=1e-6)


def test_iwae_objective_matches_renyi_elbo_on_one_example():
    """RenyiELBO(alpha=0) bounds log p(batch); for a single example it is the same
    estimator, so the two agree in expectation (the draws differ)."""
    model = _model().eval()
    guide = LadderGuide(model).eval()
    x = _data(1)
    ours = torch.stack([importance_weighted_loss(model, guide, x, mc_samples=1, iw_samples=20) for _ in range(300)])
    renyi = RenyiELBO(alpha=0, num_particles=20, vectorize_particles=True, max_plate_nesting=1)
    theirs = torch.tensor([renyi.loss(model, guide, x, torch.tensor(1.0)) for _ in range(300)])
    se = math.sqrt(ours.var().item() / 300 + theirs.var().item() / 300)
    assert abs(ours.mean().item() - theirs.mean().item()) < 4 * se + 1e-3


def test_iwae_objective_is_tighter_than_the_elbo_and_has_gradients():
    model = _model()
    guide = BottomUpGuide(model)
    x = _data(32)
    with torch.no_grad():
        elbo = -torch.stack(
            [importance_weighted_loss(model, guide, x, mc_samples=200, iw_samples=1) for _ in range(3)]
        ).mean()
        iwae = -torch.stack(
            [importance_weighted_loss(model, guide, x, mc_samples=20, iw_samples=10) for _ in range(3)]
        ).mean()
    assert iwae > elbo + 0.1
    loss = importance_weighted_loss(model, guide, x, mc_samples=2, iw_samples=3)
    loss.backward()
    for p in list(model.parameters()) + list(guide.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in guide.parameters())


@pytest.mark.parametrize("engine", ["fast", "svi"])
def test_both_engines_take_the_same_iwae_step(engine):
    """The loss callable works with SVI (which must see the parameters) and the fast engine."""
    torch.set_default_dtype(torch.float64)
    states = {}
    for eng in ("fast", engine):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = _model(batch_norm=True)
        guide = LadderGuide(model)
        initial = [p.detach().clone() for p in trainable_parameters(model, guide)]  # the upward nets too
        step = TrainingStep(model, guide, learning_rate=1e-2, engine=eng)
        step.use_objective(ImportanceWeightedLoss(mc_samples=2, iw_samples=3))
        step.set_learning_rate(5e-3)
        x = _data(8).double()
        losses = [step(x, torch.tensor(1.0)).item() for _ in range(3)]
        states[eng] = (losses, [p.detach().clone() for p in trainable_parameters(model, guide)])
    (l_fast, p_fast), (l_eng, p_eng) = states["fast"], states[engine]
    assert l_fast == pytest.approx(l_eng, rel=1e-9)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(p_fast, p_eng, strict=True))
    # Every parameter moved, by steps of about the set learning rate (Adam's steps are
    # close to lr in size), not of the initial 1e-2.
    moved = [(a - b).abs().max().item() for a, b in zip(p_eng, initial)]
    assert all(0 < m <= 3 * 5e-3 * 1.1 for m in moved) and max(moved) > 3 * 5e-3 * 0.9


def test_iwae_loss_rejects_warmup_weight_and_bad_sample_counts():
    model = _model()
    guide = LadderGuide(model)
    with pytest.raises(ValueError, match="no warm-up weight"):
        ImportanceWeightedLoss(mc_samples=1, iw_samples=2)(model, guide, _data(), torch.tensor(0.5))
    with pytest.raises(ValueError, match="iw_samples"):
        importance_weighted_loss(model, guide, _data(), mc_samples=1, iw_samples=0)


@pytest.mark.parametrize("guide_cls", GUIDES.values(), ids=GUIDES.keys())
def test_iwae_loss_and_gradients_equal_renyi_elbo_on_one_example_with_the_same_draws(guide_cls):
    """On a single example RenyiELBO(alpha=0) is the same estimator; with the same seed
    both draw the same particles, so loss and every gradient agree to rounding."""
    torch.set_default_dtype(torch.float64)
    model = _model()
    guide = guide_cls(model)
    x = _data(1).double()
    params = list(dict.fromkeys(list(model.parameters()) + list(guide.parameters())))
    pyro.set_rng_seed(5)
    ours = importance_weighted_loss(model, guide, x, mc_samples=1, iw_samples=20)
    ours.backward()
    our_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    pyro.set_rng_seed(5)
    renyi = RenyiELBO(alpha=0, num_particles=20, vectorize_particles=True, max_plate_nesting=1)
    theirs = renyi.loss_and_grads(model, guide, x)
    assert ours.item() == pytest.approx(theirs, rel=1e-12)
    for p, g in zip(params, our_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
    assert sum(g.abs().sum().item() > 0 for g in our_grads) > len(params) // 2


def _independent_iwae_loss(model, guide, x: torch.Tensor, mc: int, iw: int) -> torch.Tensor:
    """−Σ_x (1/M) Σ_m log (1/K) Σ_k w_mk, written with M·K copies of the batch instead of a particle plate."""
    batch = len(x)
    xs = x.repeat(mc * iw, 1)
    guide_trace = pyro.poutine.trace(guide).get_trace(xs)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace(xs)
    log_w = sum(
        site["fn"].log_prob(site["value"]) for site in model_trace.nodes.values() if site["type"] == "sample"
    ) - sum(site["fn"].log_prob(site["value"]) for site in guide_trace.nodes.values() if site["type"] == "sample")
    log_w = log_w.reshape(mc, iw, batch)
    return -(torch.logsumexp(log_w, 1) - math.log(iw)).mean(0).sum()


@pytest.mark.parametrize("engine", ["fast", "svi"])
def test_each_engine_minimizes_an_independent_iwae_loss(engine):
    """The loss an engine computes for fine-tuning has the mean of an IWAE loss written here
    from scratch, and not that of the ELBO, which is looser by more than the tolerance."""
    model = _model()
    guide = LadderGuide(model)
    step = TrainingStep(model, guide, learning_rate=1e-3, engine=engine)
    step.use_objective(ImportanceWeightedLoss(mc_samples=2, iw_samples=5))
    x = _data(8)
    n = 400
    with torch.no_grad():
        if engine == "fast":
            engine_losses = torch.stack([step.loss(x, torch.tensor(1.0)) for _ in range(n)])
        else:
            engine_losses = torch.tensor([step.svi.evaluate_loss(x, torch.tensor(1.0)) for _ in range(n)])
        independent = torch.stack([_independent_iwae_loss(model, guide, x, 2, 5) for _ in range(n)])
        elbo = torch.stack([_independent_iwae_loss(model, guide, x, 10, 1) for _ in range(n)])
    se = math.sqrt(engine_losses.var().item() / n + independent.var().item() / n)
    assert abs(engine_losses.mean().item() - independent.mean().item()) < 4 * se
    assert elbo.mean().item() - independent.mean().item() > 8 * se  # the test can tell IWAE from ELBO


@pytest.mark.parametrize(
    "options, match",
    [
        ({"mc_samples": 0, "iw_samples": 2}, r"^mc_samples must be a positive integer, got 0\.$"),
        ({"mc_samples": 2.0, "iw_samples": 2}, r"^mc_samples must be a positive integer, got 2\.0\.$"),
        ({"mc_samples": 1, "iw_samples": True}, r"^iw_samples must be a positive integer, got True\.$"),
        ({"mc_samples": 1, "iw_samples": -3}, r"^iw_samples must be a positive integer, got -3\.$"),
    ],
)
def test_bad_sample_counts_name_the_option(options, match):
    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    with pytest.raises(ValueError, match=match):
        importance_weighted_loss(model, LadderGuide(model), torch.ones(2, 4), **options)


def test_the_objective_works_with_a_guide_written_as_a_plain_function():
    """A guide that is a function, not one of the package's modules, is left to register
    its own parameters: the objective only registers the package's modules."""
    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    ladder = LadderGuide(model)

    def guide(x, beta=None):
        ladder(x, beta)

    pyro.set_rng_seed(0)
    loss = ImportanceWeightedLoss(mc_samples=1, iw_samples=3).differentiable_loss(model, guide, torch.ones(2, 4))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("free_bits", [0.0, 0.5])
@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_elbo_for_passes_the_estimators_options_through(guide_cls, free_bits):
    from pyro_lvae.inference.objectives import elbo_for

    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    elbo = elbo_for(guide_cls(model), free_bits=free_bits, num_particles=3, vectorize_particles=True)
    assert elbo.num_particles == 3 and elbo.vectorize_particles
    assert ("FreeBits" in type(elbo).__name__) == (free_bits > 0)


def test_the_lean_mean_field_elbo_skips_the_latent_densities_and_keeps_the_loss():
    """Validation off: only x's log-density is computed, and loss and gradients are
    ``TraceMeanField_ELBO``'s on the same draws, in float64."""
    from pyro.infer import TraceMeanField_ELBO

    from pyro_lvae.inference.objectives import MeanFieldELBO

    model = GenerativeModel(ModelConfig(input_dim=10, latent_sizes=(4, 3), hidden_sizes=(16, 8)), name="lean").double()
    guide = LadderGuide(model).double()
    x = _data().double()
    grads = []
    for elbo in (MeanFieldELBO(), TraceMeanField_ELBO()):
        pyro.set_rng_seed(5)
        with pyro.validation_enabled(False):
            loss = elbo.differentiable_loss(model, guide, x)
        grads.append(torch.autograd.grad(loss, list(guide.parameters())))
        grads[-1] = (loss.detach(), grads[-1])
    (lean, lean_g), (ref, ref_g) = grads
    assert lean.item() == pytest.approx(ref.item(), rel=1e-12)
    for a, b in zip(lean_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with pyro.validation_enabled(False):
        model_trace, guide_trace = MeanFieldELBO()._get_trace(model, guide, (x,), {})
    computed = {n for n, s in model_trace.nodes.items() if "log_prob" in s}
    assert computed == {"x"}
    assert not any("score_parts" in s for s in guide_trace.nodes.values())


def test_the_lean_mean_field_elbo_computes_every_density_when_a_latent_is_not_normal():
    """A Gamma latent: the loss may fall back on log-densities, so all are computed."""
    import pyro.distributions as dist

    from pyro_lvae.inference.objectives import MeanFieldELBO

    def model(x):
        z = pyro.sample("z", dist.Gamma(2.0, 2.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Gamma(torch.tensor(3.0), torch.tensor(2.0)))

    with pyro.validation_enabled(False):
        model_trace, guide_trace = MeanFieldELBO()._get_trace(model, guide, (torch.tensor(0.5),), {})
    assert "log_prob" in model_trace.nodes["z"] and "score_parts" in guide_trace.nodes["z"]


def test_elbo_for_refuses_a_lean_flag_that_is_not_a_bool():
    from pyro_lvae.inference.objectives import elbo_for

    with pytest.raises(ValueError, match="lean must be True or False"):
        elbo_for(LadderGuide(_model()), lean="yes")


def _closed_form_spy(monkeypatch, name: str = "closed_form_loss") -> list:
    """Record the calls of the closed-form function ``name`` (the objectives import it at call time)."""
    from pyro_lvae.inference import closed_form

    calls: list = []
    real = getattr(closed_form, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(closed_form, name, spy)
    return calls


@pytest.mark.parametrize("guide_cls", GUIDES.values(), ids=GUIDES.keys())
def test_the_fast_objectives_take_the_closed_form_for_the_papers_model_only(guide_cls, monkeypatch):
    """The lean objective of each guide computes the closed form with validation off and one
    particle, and Pyro's traced loss with β as a keyword, validation on, several particles,
    another model or a wrapped guide. Either way the value is Pyro's own."""
    from pyro import poutine

    from pyro_lvae.inference.objectives import elbo_for

    class Subclass(GenerativeModel):
        pass

    calls = _closed_form_spy(monkeypatch)
    model = GenerativeModel(ModelConfig(input_dim=10, latent_sizes=(4, 3), hidden_sizes=(16, 8)), name="m").double()
    guide = guide_cls(model).double()
    sub = Subclass(model.config, name="sub").double()
    sub.load_state_dict(model.state_dict())
    x = _data().double()
    beta = torch.tensor(0.5, dtype=torch.float64)

    def both(model, guide, *, validate=False, **elbo_kw):
        """The lean objective's loss and Pyro's own on the same draws."""
        losses = []
        for lean in (True, False):
            pyro.set_rng_seed(4)
            with pyro.validation_enabled(validate):
                losses.append(elbo_for(guide, lean=lean, **elbo_kw).differentiable_loss(model, guide, x, beta).item())
        return losses

    taken, reference = both(model, guide)
    assert len(calls) == 1 and taken == pytest.approx(reference, rel=1e-12)

    def with_keyword_beta():
        """β as a keyword argument: the model and the guide take it so; the closed form does not."""
        losses = []
        for lean in (True, False):
            pyro.set_rng_seed(4)
            with pyro.validation_enabled(False):
                elbo = elbo_for(guide, lean=lean)
                losses.append(elbo.differentiable_loss(model, guide, x, beta=beta).item())
        return losses

    for case in (
        with_keyword_beta,
        lambda: both(model, guide, validate=True),
        lambda: both(model, guide, num_particles=3),
        lambda: both(sub, guide_cls(sub).double()),
        lambda: both(model, poutine.scale(guide, scale=1.0)),
    ):
        taken, reference = case()
        assert len(calls) == 1 and taken == pytest.approx(reference, rel=1e-12)


@pytest.mark.parametrize("guide_cls", GUIDES.values(), ids=GUIDES.keys())
def test_svi_on_the_lean_objective_takes_the_closed_form_and_pyros_steps(guide_cls, monkeypatch):
    """``SVI.step`` calls ``loss_and_grads`` under its parameter capture (a param-only trace):
    the lean objective computes it in closed form there, and SVI sees every parameter, so that
    its steps are those of SVI on Pyro's own ELBO on the same draws."""
    import copy

    from pyro.infer import SVI
    from pyro.optim import Adam

    from pyro_lvae.inference.objectives import elbo_for

    calls = _closed_form_spy(monkeypatch)
    model = GenerativeModel(ModelConfig(input_dim=10, latent_sizes=(4, 3), hidden_sizes=(16, 8)), name="lean").double()
    reference = copy.deepcopy(model)
    reference.name = "traced"
    guides = {"lean": guide_cls(model).double(), "traced": guide_cls(reference).double()}
    guides["traced"].load_state_dict(guides["lean"].state_dict())
    svis = {
        name: SVI(m, guides[name], Adam({"lr": 1e-2}), elbo_for(guides[name], lean=name == "lean"))
        for name, m in (("lean", model), ("traced", reference))
    }
    x, beta = _data().double(), torch.tensor(0.5, dtype=torch.float64)
    start = [p.detach().clone() for p in trainable_parameters(model, guides["lean"])]
    with pyro.validation_enabled(False):
        for seed in (1, 2):
            losses = {}
            for name, svi in svis.items():
                pyro.set_rng_seed(seed)
                losses[name] = svi.step(x, beta)
            assert losses["lean"] == pytest.approx(losses["traced"], rel=1e-12)
    assert len(calls) == 2
    lean = trainable_parameters(model, guides["lean"])
    for a, b, before in zip(lean, trainable_parameters(reference, guides["traced"]), start, strict=True):
        # Adam divides by sqrt(v): a gradient near 0 carries its last-digit rounding into the step.
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
        assert not torch.equal(a, before)  # SVI saw this parameter and stepped it


def test_a_callers_effect_handler_keeps_the_traced_loss(monkeypatch):
    """A caller's ``poutine.scale`` acts on the traced sites only; under it the objective takes
    the traced path, so the loss is scaled as Pyro's is."""
    import contextlib

    from pyro import poutine

    from pyro_lvae.inference.objectives import elbo_for

    calls = _closed_form_spy(monkeypatch)
    model = _model().double()
    guide = LadderGuide(model).double()
    x = _data().double()
    losses = []
    for scale in (None, 3.0):
        pyro.set_rng_seed(4)
        with pyro.validation_enabled(False), poutine.scale(scale=scale) if scale else contextlib.nullcontext():
            losses.append(elbo_for(guide, lean=True).differentiable_loss(model, guide, x).item())
    assert len(calls) == 1  # the call without a handler
    assert losses[1] == pytest.approx(3 * losses[0], rel=1e-12)


def test_the_mean_field_closed_form_leaves_the_bottom_up_guide_to_pyro(monkeypatch):
    """The analytic KL is biased for the bottom-up guide: a mean-field objective given that guide
    computes what Pyro's ``TraceMeanField_ELBO`` computes, not a closed form."""
    from pyro.infer import TraceMeanField_ELBO

    from pyro_lvae.inference.objectives import ClosedFormMeanFieldELBO

    calls = _closed_form_spy(monkeypatch)
    model = _model().double()
    guide = BottomUpGuide(model).double()
    x = _data().double()
    losses = []
    for elbo in (ClosedFormMeanFieldELBO(), TraceMeanField_ELBO()):
        pyro.set_rng_seed(4)
        with pyro.validation_enabled(False):
            losses.append(elbo.differentiable_loss(model, guide, x).item())
    assert not calls and losses[0] == pytest.approx(losses[1], rel=1e-12)


@pytest.mark.parametrize("guide_cls", GUIDES.values(), ids=GUIDES.keys())
def test_the_iwae_loss_in_closed_form_is_the_traced_one_with_its_gradients(guide_cls, monkeypatch):
    """With validation off the fine-tuning loss weighs the particles in closed form: in training
    mode (batch norm over all particle-example pairs), its value, every gradient and the
    batch-norm statistics equal the traced path's on the same draws, in float64."""
    import copy

    from pyro_lvae.training.steps import model_buffers

    calls = _closed_form_spy(monkeypatch, "closed_form_particle_log_weights")
    model = _model(batch_norm=True).double()
    guide = guide_cls(model).double()
    pair_ref = copy.deepcopy((model, guide))
    x = _data().double()
    results = []
    for (m, g), validate in (((model, guide), False), (pair_ref, True)):
        pyro.set_rng_seed(8)
        with pyro.validation_enabled(validate):
            loss = importance_weighted_loss(m, g, x, mc_samples=2, iw_samples=3)
        params = trainable_parameters(m, g)
        results.append((loss.item(), torch.autograd.grad(loss, params), model_buffers(m, g)))
    (loss, grads, buffers), (loss_ref, grads_ref, buffers_ref) = results
    assert len(calls) == 1
    assert loss == pytest.approx(loss_ref, rel=1e-12)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert sum(int(b.abs().sum() > 0) for b in grads_ref) > len(grads_ref) // 2
    for a, b in zip(buffers, buffers_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
