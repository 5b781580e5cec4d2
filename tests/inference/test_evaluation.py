"""Per-example L_K: agreement with pyro.infer.Importance on single examples, chunking, memory."""

from __future__ import annotations

import warnings

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Importance

from pyro_lvae import BottomUpGuide, GenerativeModel, LadderGuide, ModelConfig
from pyro_lvae import precision as precision_module
from pyro_lvae.inference.evaluation import evaluate, importance_sampled_bounds, particle_chunk_size


def _model() -> GenerativeModel:
    return GenerativeModel(ModelConfig(input_dim=6, latent_sizes=(2, 2), hidden_sizes=(8, 8), batch_norm=True)).eval()


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_lk_matches_pyro_importance_on_single_examples(guide_cls):
    """On the very draws of ``Importance`` run example by example, the batched estimator
    gives the same log-weights and the same L_K for every example."""
    torch.set_default_dtype(torch.float64)
    model = _model()
    guide = guide_cls(model).eval()
    x = torch.bernoulli(torch.full((3, 6), 0.5))
    k = 200
    runs = [Importance(model, guide, num_samples=k).run(x[i : i + 1]) for i in range(len(x))]
    # Stack each run's latent draws into (k, batch, dim) and feed them to the guide.
    draws = {
        f"z{j}": torch.stack([torch.cat([tr.nodes[f"z{j}"]["value"] for tr in run.exec_traces]) for run in runs], 1)
        for j in (1, 2)
    }
    with pyro.plate("particles", k, dim=-2):
        fixed = poutine.trace(poutine.condition(guide, data=draws)).get_trace(x)
    for name in draws:
        fixed.nodes[name]["is_observed"] = False  # replay these values as ordinary draws
    ours = importance_sampled_bounds(model, poutine.replay(guide, trace=fixed), x, num_samples=k, chunk_size=k)
    for i, run in enumerate(runs):
        theirs = torch.stack([torch.as_tensor(w) for w in run.log_weights])
        torch.testing.assert_close(ours["log_weights"][:, i], theirs, rtol=1e-10, atol=1e-10)
        assert ours["log_likelihood"][i].item() == pytest.approx(run.get_log_normalizer().item(), abs=1e-9)
    # Importance on the whole batch estimates log p(batch) = the sum over examples, not a per-example bound.
    fresh = importance_sampled_bounds(model, guide, x, num_samples=3000)
    whole = Importance(model, guide, num_samples=k).run(x).get_log_normalizer().item()
    assert abs(whole - fresh["log_likelihood"].sum().item()) < 1.0
    assert abs(whole - fresh["log_likelihood"].mean().item()) > 5.0


def test_lk_bounds_are_ordered_and_shaped():
    model = _model()
    guide = LadderGuide(model).eval()
    x = torch.bernoulli(torch.full((10, 6), 0.5))
    out = importance_sampled_bounds(model, guide, x, num_samples=50, chunk_size=7)
    assert out["log_weights"].shape == (50, 10)
    assert out["layer_kl"].shape == (2, 10)
    assert (out["log_likelihood"] >= out["elbo"]).all()  # Jensen, holds for every sample set
    torch.testing.assert_close(out["elbo"], out["reconstruction"] - out["layer_kl"].sum(0))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"num_samples": 7.0}, r"^num_samples \(K\) must be a positive integer, got 7\.0\.$"),
        ({"num_samples": True}, r"^num_samples \(K\) must be a positive integer, got True\.$"),
        ({"num_samples": 0}, r"^num_samples \(K\) must be a positive integer, got 0\.$"),
        ({"chunk_size": 0}, r"^chunk_size must be a positive integer or None"),
        ({"memory_budget": 0}, r"^memory_budget must be a positive number of bytes, got 0\.$"),
        ({"x": "one row"}, r"^data must have shape \(N, input_dim\) with N > 0, got \(6,\)"),
        ({"x": "empty"}, r"^data must have shape \(N, input_dim\) with N > 0, got \(0, 6\)"),
        ({"x": "grey"}, r"^x has values other than 0 and 1, which a Bernoulli likelihood cannot score;"),
        ({"precision": "fp16"}, r"^precision must be one of fp32, bf16, got 'fp16'\.$"),
    ],
)
def test_bad_bounds_options_get_one_clear_line_before_any_draw(options, match, monkeypatch):
    model = _model()
    guide = LadderGuide(model).eval()
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    x = {"one row": x[0], "empty": x[:0], "grey": x * 0.5, None: x}[options.pop("x", None)]
    drawn = []
    monkeypatch.setattr(torch, "randn", lambda *a, **k: drawn.append(1))  # no draw may happen first
    with pytest.raises(ValueError, match=match), pyro.validation_enabled(True):
        importance_sampled_bounds(model, guide, x, **{"num_samples": 5, **options})
    assert not drawn


def test_chunk_size_respects_memory_budget():
    model = GenerativeModel(ModelConfig())
    big = particle_chunk_size(model, 500, memory_budget=4 * 2**30)
    small = particle_chunk_size(model, 500, memory_budget=2**20)
    assert big > small >= 1
    assert particle_chunk_size(model, 500, memory_budget=1) == 1


def test_evaluate_restores_training_mode_and_validates():
    model = _model()
    guide = LadderGuide(model)
    model.train()
    guide.train()
    x = torch.bernoulli(torch.full((9, 6), 0.5))
    out = evaluate(model, guide, x, num_samples=4, batch_size=4)
    assert model.training and guide.training
    assert out["num_examples"] == 9 and len(out["kl_per_layer"]) == 2
    assert out["log_likelihood_per_example"].shape == (9,)
    with pytest.raises(ValueError, match="shape"):
        evaluate(model, guide, x[0], num_samples=4)


def test_out_of_memory_in_l_k_retries_with_smaller_chunks(monkeypatch, caplog):
    """A chunk that runs out of memory is redrawn in half-size chunks from the same RNG
    state: the result equals a run that used the smaller chunk size from the start."""
    import pyro

    from pyro_lvae import evaluation

    model = _model()
    guide = LadderGuide(model).eval()
    x = torch.bernoulli(torch.full((7, 6), 0.5))
    original = evaluation.log_importance_weights
    sizes = []

    def limited(model, guide, x, k):
        sizes.append(k)
        if k > 6:
            torch.randn(3)  # a failed attempt may consume random numbers before failing
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(model, guide, x, k)

    monkeypatch.setattr(evaluation, "log_importance_weights", limited)
    pyro.set_rng_seed(5)
    retried = evaluation.importance_sampled_bounds(model, guide, x, num_samples=40, chunk_size=40)
    assert sizes[:4] == [40, 20, 10, 5] and "retrying with 20" in caplog.text
    monkeypatch.setattr(evaluation, "log_importance_weights", original)
    pyro.set_rng_seed(5)
    direct = evaluation.importance_sampled_bounds(model, guide, x, num_samples=40, chunk_size=5)
    assert torch.equal(retried["log_weights"], direct["log_weights"])
    # Other errors, and a failure at one particle per chunk, are raised.
    monkeypatch.setattr(
        evaluation, "log_importance_weights", lambda *a: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
    )
    with pytest.raises(RuntimeError, match="shape mismatch"):
        evaluation.importance_sampled_bounds(model, guide, x, num_samples=4, chunk_size=4)
    monkeypatch.setattr(
        evaluation, "log_importance_weights", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory"))
    )
    with pytest.raises(torch.OutOfMemoryError):
        evaluation.importance_sampled_bounds(model, guide, x, num_samples=4, chunk_size=4)


def test_allocation_failures_are_recognised_in_any_case_and_other_errors_are_not():
    from pyro_lvae.inference.evaluation import _is_out_of_memory

    for text in (
        "CUDA out of memory. Tried to allocate 2.00 GiB",
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 80 bytes",
        "[enforce fail at alloc_cpu.cpp:117] Failed to allocate 34359738368 bytes",
        "OUT OF MEMORY",
    ):
        assert _is_out_of_memory(RuntimeError(text)), text
    assert _is_out_of_memory(torch.OutOfMemoryError("anything"))
    for text in ("shape '[-1, 784]' is invalid", "memory format mismatch", "allocate"):
        assert not _is_out_of_memory(RuntimeError(text)), text


def test_batch_seeds_are_distinct_integers_that_fit_a_generator():
    from pyro_lvae.inference.evaluation import batch_seed

    assert batch_seed(0, 0) == 0 and batch_seed(3, 5) == 3 * 1_000_033 + 5
    big = 2**62
    assert batch_seed(big, 1) == (big * 1_000_033 + 1) % 2**63 < 2**63
    assert batch_seed(3 * big, 0) == big  # reduced modulo 2**63, not 2**64 (which would leave 3 * 2**62)
    assert isinstance(batch_seed(7, 2), int)
    torch.Generator().manual_seed(batch_seed(big, 1))  # accepted by torch
    assert len({batch_seed(s, b) for s in range(3) for b in range(50)}) == 150


def test_a_long_evaluation_logs_its_expected_duration_and_a_short_one_does_not(caplog):
    from pyro_lvae.inference.evaluation import _log_expected_duration

    with caplog.at_level("INFO", logger="pyro_lvae.inference.evaluation"):
        _log_expected_duration(9.1, 20, 2, 5000)  # 10 batches per process, 91 s: 1.52 min
        _log_expected_duration(6.0, 10, 1, 100)  # exactly 60 s: not logged
        _log_expected_duration(6.05, 10, 1, 100)  # 60.5 s
    assert [r.getMessage() for r in caplog.records] == [
        "L_5000 on 20 batches: the first took 9.1 s, so expect about 2 min in all.",
        "L_100 on 10 batches: the first took 6.0 s, so expect about 1 min in all.",
    ]


@pytest.mark.parametrize("closed_form", [True, False])
def test_evaluation_uses_the_running_statistics_and_registers_nothing(closed_form, monkeypatch):
    """A model and guide left in training mode are evaluated as in evaluation mode (batch
    norm's running statistics, not the batch's), their modes come back, and nothing enters
    the param store."""
    import pyro_lvae.inference.evaluation as evaluation

    if not closed_form:
        monkeypatch.setattr(evaluation, "closed_form_applies", lambda model, guide: False)
    model = GenerativeModel(ModelConfig(input_dim=6, latent_sizes=(3, 2), hidden_sizes=(8, 4), batch_norm=True))
    guide = LadderGuide(model)
    model.eval(), guide.eval()
    with torch.no_grad():  # running statistics that differ from any batch's
        for m in list(model.modules()) + list(guide.modules()):
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.fill_(0.7)
                m.running_var.fill_(3.0)
    x = torch.bernoulli(torch.full((8, 6), 0.5))
    reference = evaluate(model, guide, x, num_samples=4, seed=1)["log_likelihood"]
    model.train(), guide.train()
    pyro.clear_param_store()
    again = evaluate(model, guide, x, num_samples=4, seed=1)["log_likelihood"]
    assert again == reference
    assert model.training and guide.training
    assert len(pyro.get_param_store()) == 0


def test_the_progress_bar_shows_only_when_asked(capsys):
    model = GenerativeModel(ModelConfig(input_dim=6, latent_sizes=(3,), hidden_sizes=(8,)))
    guide = LadderGuide(model)
    x = torch.bernoulli(torch.full((6, 6), 0.5))
    evaluate(model, guide, x, num_samples=3, batch_size=2, progress=False)
    assert capsys.readouterr().err == ""
    evaluate(model, guide, x, num_samples=3, batch_size=2, progress=True)
    assert "L_3" in capsys.readouterr().err


def test_the_duration_is_estimated_once_after_the_first_batch(monkeypatch):
    import pyro_lvae.inference.evaluation as evaluation

    calls = []
    monkeypatch.setattr(evaluation, "_log_expected_duration", lambda *args: calls.append(args))
    model = GenerativeModel(ModelConfig(input_dim=6, latent_sizes=(3,), hidden_sizes=(8,)))
    x = torch.bernoulli(torch.full((7, 6), 0.5))
    evaluate(model, LadderGuide(model), x, num_samples=3, batch_size=2)  # 4 batches
    assert len(calls) == 1 and calls[0][1:] == (4, 1, 3) and 0 <= calls[0][0] < 60  # the first batch's seconds


def test_the_particle_chunk_follows_the_documented_activation_count():
    """Per (particle, example): 3·D + 4·ΣH + 8·ΣL floats of the parameters' dtype, times a
    safety factor of 3; the chunk is the budget over that, at least one particle."""
    cfg = ModelConfig(input_dim=784, latent_sizes=(64, 32), hidden_sizes=(512, 256))
    model = GenerativeModel(cfg)
    floats = 3 * 784 + 4 * (512 + 256) + 8 * (64 + 32)
    budget = 10 * 3 * floats * 4 * 500 + 7  # ten particles' worth, plus a little
    assert particle_chunk_size(model, 500, memory_budget=budget) == 10
    assert particle_chunk_size(model.double(), 500, memory_budget=budget) == 5  # 8-byte floats
    assert particle_chunk_size(model, 500, memory_budget=1) == 1


def test_particle_traces_broadcast_every_site_over_a_particle_plate():
    from pyro_lvae.inference.evaluation import particle_traces

    model = GenerativeModel(ModelConfig(input_dim=6, latent_sizes=(3, 2), hidden_sizes=(8, 4)))
    guide = LadderGuide(model)
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    guide_trace, model_trace = particle_traces(model, guide, x, 7)
    for name in ("z1", "z2"):
        frames = {(f.name, f.size, f.dim) for f in guide_trace.nodes[name]["cond_indep_stack"]}
        assert frames == {("particles", 7, -2), ("data", 5, -1)}
        assert model_trace.nodes[name]["value"].shape[:2] == (7, 5)
    with pytest.raises(ValueError, match=r"^num_particles must be positive, got 0\.$"):
        particle_traces(model, guide, x, 0)


def test_each_batch_draws_from_its_own_seed():
    """With a seed, batch b of the evaluation draws as importance_sampled_bounds does under
    batch_seed(seed, b), so one batch's numbers do not depend on the batches before it."""
    from pyro_lvae.inference.evaluation import batch_seed
    from pyro_lvae.rng import preserved_rng

    model = GenerativeModel(ModelConfig(input_dim=6, latent_sizes=(3,), hidden_sizes=(8,)))
    guide = LadderGuide(model)
    model.eval(), guide.eval()  # as evaluate does
    x = torch.bernoulli(torch.full((6, 6), 0.5))
    ev = evaluate(model, guide, x, num_samples=5, batch_size=3, seed=11)
    for b in range(2):
        with preserved_rng(batch_seed(11, b)):
            alone = importance_sampled_bounds(model, guide, x[3 * b : 3 * b + 3], num_samples=5)
        torch.testing.assert_close(ev["log_likelihood_per_example"][3 * b : 3 * b + 3], alone["log_likelihood"])


def test_a_bound_that_is_not_finite_is_named_with_its_cause(caplog):
    """With no variance floor, a prior variance that underflows to 0 makes L_K infinite or NaN: the
    evaluation still returns (a training run keeps going), and says why."""
    import logging

    cfg = ModelConfig(input_dim=10, latent_sizes=(4, 3), hidden_sizes=(16, 8), batch_norm=False, variance_floor=0.0)
    model = GenerativeModel(cfg)
    with torch.no_grad():
        model.top_down_heads[0].var.weight.zero_()
        model.top_down_heads[0].var.bias.fill_(-1e4)  # softplus(-1e4) == 0 in float32
    x = torch.bernoulli(torch.full((6, 10), 0.5))
    with caplog.at_level(logging.WARNING), pyro.validation_enabled(False):
        out = evaluate(model, LadderGuide(model), x, num_samples=3)
    assert not torch.isfinite(out["log_likelihood_per_example"]).all()
    assert "L_K is not finite for 6 of 6 examples" in caplog.text and "positive variance_floor" in caplog.text
    caplog.clear()
    floored = GenerativeModel(ModelConfig(input_dim=10, latent_sizes=(4, 3), hidden_sizes=(16, 8), batch_norm=False))
    with caplog.at_level(logging.WARNING):
        evaluate(floored, LadderGuide(floored), x, num_samples=3)
    assert "not finite" not in caplog.text


def _bf16_pair(guide_cls=LadderGuide) -> tuple[GenerativeModel, torch.nn.Module]:
    model = GenerativeModel(ModelConfig(input_dim=20, latent_sizes=(4, 3), hidden_sizes=(32, 16), batch_norm=True))
    return model.eval(), guide_cls(model).eval()


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_bf16_bounds_are_the_fp32_bounds_to_bfloat16_rounding_on_the_same_draws(guide_cls, device, monkeypatch):
    """precision='bf16' lowers the networks, so the bounds move off the fp32 ones, but on the same
    draws they move by less than bfloat16's unit of rounding (2^-8) relative, and come back in
    float32, on the CPU and on the GPU (whose autocast lowers another list of operations)."""
    monkeypatch.setattr(precision_module, "cpu_has_bf16_instructions", lambda: True)  # no emulation warning
    model, guide = _bf16_pair(guide_cls)
    model, guide = model.to(device), guide.to(device)
    x = torch.bernoulli(torch.full((12, 20), 0.4)).to(device)
    fp32 = evaluate(model, guide, x, num_samples=30, seed=5)
    bf16 = evaluate(model, guide, x, num_samples=30, seed=5, precision="bf16")
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert bf16["log_likelihood_per_example"].dtype == torch.float32
    reference = fp32["log_likelihood_per_example"]
    gap = (bf16["log_likelihood_per_example"] - reference).abs()
    assert gap.max() > 1e-4  # the networks ran in bf16 (measured: 1e-3 or more)
    assert (gap / reference.abs()).max() < 2**-8  # measured: 3e-4 at most


@pytest.mark.parametrize("native", [False, True])
def test_bf16_evaluation_warns_once_at_the_callers_line_where_bfloat16_is_emulated(native, monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_bf16_instructions", lambda: native)
    model, guide = _bf16_pair()
    x = torch.bernoulli(torch.full((6, 20), 0.4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(model, guide, x, num_samples=3, batch_size=2, precision="bf16")  # three batches
        importance_sampled_bounds(model, guide, x, num_samples=3, precision="bf16")
        evaluate(model, guide, x, num_samples=3, batch_size=2)  # fp32 never warns
    slow = [w for w in caught if str(w.message).startswith("precision='bf16' is 15-20x slower than fp32")]
    assert len(slow) == (0 if native else 2)
    assert all(w.filename == __file__ for w in slow)


@pytest.mark.parametrize(
    "change, match",
    [
        ("float64", r"^precision='bf16' lowers float32 networks, but the model's parameters are torch\.float64; "),
        ("subclass", r"^precision='bf16' evaluates the paper's model with its ladder or bottom-up guide only, not "),
    ],
)
def test_bf16_evaluation_refuses_what_it_cannot_lower_before_any_draw(change, match, monkeypatch):
    model, guide = _bf16_pair()
    if change == "float64":
        model, guide = model.double(), guide.double()
    else:

        class Tweaked(GenerativeModel):
            """A user's subclass: the closed forms do not cover it."""

        model = Tweaked(model.config).eval()
        guide = LadderGuide(model).eval()
    x = torch.bernoulli(torch.full((4, 20), 0.4)).to(next(model.parameters()).dtype)
    drawn = []
    monkeypatch.setattr(torch, "randn", lambda *a, **k: drawn.append(1))
    with pytest.raises(ValueError, match=match):
        evaluate(model, guide, x, num_samples=3, precision="bf16")
    with pytest.raises(ValueError, match=match):
        importance_sampled_bounds(model, guide, x, num_samples=3, precision="bf16")
    assert not drawn
