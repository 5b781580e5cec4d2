"""The CUDA-graph engine replays the fast step's updates; what it cannot do is refused."""

from __future__ import annotations

import copy
import gc
import math

import pyro
import pyro.infer.trace_elbo
import pyro.infer.trace_mean_field_elbo
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch.utils._python_dispatch import TorchDispatchMode

from pyro_lvae import BottomUpGuide, GenerativeModel, LadderGuide, ModelConfig
from pyro_lvae.config import ExperimentConfig, TrainConfig
from pyro_lvae.inference import warmup
from pyro_lvae.inference.closed_form import closed_form_applies
from pyro_lvae.models.families import make_guide, make_model
from pyro_lvae.training import train
from pyro_lvae.training.cuda_graph import GraphStep, host_reads_deferred, update_on_device
from pyro_lvae.training.distributed import DistributedContext
from pyro_lvae.training.skipping import SkipRule
from pyro_lvae.training.steps import FastStep, TrainingStep, model_buffers, trainable_parameters

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GUIDES = [LadderGuide, BottomUpGuide]
CFG = ModelConfig(input_dim=12, latent_sizes=(5, 4, 3), hidden_sizes=(16, 12, 8), batch_norm=True)


def _pair(guide_cls, dtype=torch.float64, device="cuda"):
    """Two identical (model, guide) pairs, on the GPU unless said otherwise."""
    model = GenerativeModel(CFG, name="a").to(device, dtype)
    guide = guide_cls(model).to(device, dtype)
    model_b = copy.deepcopy(model)
    model_b.name = "b"
    guide_b = guide_cls(model_b).to(device, dtype)
    guide_b.load_state_dict(guide.state_dict())
    return (model, guide), (model_b, guide_b)


def _graphed_and_eager(guide_cls=LadderGuide, *, learning_rate: float, warmup_steps: int = 1):
    """A recording step and one that never records, on identical copies of one model."""
    (model, guide), (model_e, guide_e) = _pair(guide_cls)
    graphed = GraphStep(model, guide, learning_rate=learning_rate, warmup_steps=warmup_steps)
    return graphed, GraphStep(model_e, guide_e, learning_rate=learning_rate, warmup_steps=10**9)


def _assert_same_state(a: GraphStep, b: GraphStep) -> None:
    for x, y in zip(_state(a), _state(b), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def _batch(seed: int, dtype=torch.float64, device="cuda") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((9, 12), 0.4, dtype=dtype), generator=g).to(device)


def _state(step: TrainingStep) -> list[torch.Tensor]:
    """Copies of everything an update writes: parameters, Adam's state, batch-norm buffers."""
    params = trainable_parameters(step.model, step.guide)
    tensors = list(params) + [v for p in params for v in step.optimizer.state[p].values() if torch.is_tensor(v)]
    return [t.detach().clone() for t in tensors + model_buffers(step.model, step.guide)]


def _run(step, seeds, beta=0.5):
    losses = []
    for s in seeds:
        pyro.set_rng_seed(s)
        losses.append(step(_batch(s), torch.tensor(beta, dtype=torch.float64, device="cuda")).item())
    return losses


@cuda
@pytest.mark.parametrize("guide_cls", GUIDES)
def test_replayed_steps_equal_eager_steps_on_the_same_draws(guide_cls):
    graphed, eager = _graphed_and_eager(guide_cls, learning_rate=1e-2, warmup_steps=2)
    seeds = range(20, 26)
    assert _run(graphed, seeds) == pytest.approx(_run(eager, seeds), rel=1e-12)
    assert len(graphed._graphs) == 1 and not eager._graphs  # four of the six steps were replays
    _assert_same_state(graphed, eager)


@cuda
@pytest.mark.parametrize("guide_cls", GUIDES)
def test_the_graph_engine_takes_the_fast_engines_updates(guide_cls):
    (model, guide), (model_f, guide_f) = _pair(guide_cls)
    graphed = GraphStep(model, guide, learning_rate=1e-2, warmup_steps=1)
    fast = TrainingStep(model_f, guide_f, learning_rate=1e-2, engine="fast")
    seeds = range(30, 35)
    # Capturable Adam forms its bias correction on the device, the fused one on the host:
    # they round differently (a relative 1.4e-9 in the loss after four steps, seen on an H100).
    assert _run(graphed, seeds) == pytest.approx(_run(fast, seeds), rel=1e-7)
    # Where a gradient is near zero, m / (sqrt(v) + eps) amplifies that rounding (as between the
    # fused and the per-parameter Adam in test_steps): 3.5e-9 absolute was seen on an H100.
    for p, q in zip(trainable_parameters(model, guide), trainable_parameters(model_f, guide_f)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for a, b in zip(model_buffers(model, guide), model_buffers(model_f, guide_f)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@cuda
@pytest.mark.parametrize("guide_cls", GUIDES)
def test_a_replayed_step_skips_a_non_finite_batch_and_touches_nothing(guide_cls):
    (model, guide), _ = _pair(guide_cls)
    step = GraphStep(model, guide, learning_rate=1e-2, warmup_steps=1)
    _run(step, range(3))
    before = _state(step)
    x = _batch(9)
    x[0, 0] = float("nan")
    step(x, torch.tensor(1.0, dtype=torch.float64, device="cuda"))
    assert step._graphs and step.skip_cause == "non_finite"
    for a, b in zip(before, _state(step)):
        assert torch.equal(a, b)
    _run(step, [10])
    assert not step.skipped
    assert not all(torch.equal(a, b) for a, b in zip(before, _state(step)))


@cuda
def test_a_replayed_step_skips_above_a_threshold_set_after_the_capture():
    (model, guide), _ = _pair(LadderGuide)
    step = GraphStep(model, guide, learning_rate=1e-2, warmup_steps=1)
    _run(step, range(3))
    before = _state(step)
    step.skip_rule = SkipRule(1e-9)  # below any gradient norm here
    _run(step, [4])
    assert step.skip_cause == "threshold" and step.grad_norm > 1e-9
    for a, b in zip(before, _state(step)):
        assert torch.equal(a, b)


@cuda
def test_a_learning_rate_set_after_the_capture_reaches_the_graph():
    graphed, eager = _graphed_and_eager(learning_rate=1e-3)
    _run(graphed, range(3)), _run(eager, range(3))
    for step in (graphed, eager):
        step.set_learning_rate(0.05)
    _run(graphed, range(3, 6)), _run(eager, range(3, 6))
    assert graphed._graphs
    _assert_same_state(graphed, eager)


@cuda
def test_a_restored_optimizer_state_is_recaptured_and_continues_the_same():
    graphed, eager = _graphed_and_eager(learning_rate=1e-2)
    _run(graphed, range(3)), _run(eager, range(3))
    graphed.load_state_dict(copy.deepcopy(graphed.state_dict()))
    assert not graphed._graphs  # the old graph held the replaced state tensors
    gc.collect()  # the old graph and its memory pool are gone before the recapture
    _run(graphed, range(3, 7)), _run(eager, range(3, 7))
    assert graphed._graphs
    _assert_same_state(graphed, eager)


@cuda
def test_a_learning_rate_set_after_restoring_a_saved_state_reaches_the_graph(tmp_path):
    # Not yet run on a GPU (written after the lease): a checkpoint is loaded to the CPU.
    graphed, eager = _graphed_and_eager(learning_rate=1e-3)
    _run(graphed, range(3)), _run(eager, range(3))
    torch.save(graphed.state_dict(), tmp_path / "state.pt")
    graphed.load_state_dict(torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=False))
    assert all(group["lr"].is_cuda for group in graphed.optimizer.param_groups)
    _run(graphed, range(3, 5)), _run(eager, range(3, 5))
    for step in (graphed, eager):
        step.set_learning_rate(0.05)
    _run(graphed, range(5, 8)), _run(eager, range(5, 8))
    assert graphed._graphs
    _assert_same_state(graphed, eager)


@cuda
def test_each_shape_and_mode_has_its_own_graph_and_new_storage_drops_them():
    # Not yet run on a GPU (written after the lease).
    graphed, eager = _graphed_and_eager(learning_rate=1e-2)
    beta = torch.tensor(0.5, dtype=torch.float64, device="cuda")
    for i in range(8):  # minibatches of 9 and 5 in turn, as at the end of each epoch
        for step in (graphed, eager):
            pyro.set_rng_seed(40 + i)
            step(_batch(40 + i)[: 9 if i % 2 else 5], beta)
    assert {key[0] for key in graphed._graphs} == {torch.Size([9, 12]), torch.Size([5, 12])}
    _assert_same_state(graphed, eager)
    model = graphed.model
    model.eval()  # the model's batch norm now uses its running statistics: another graph
    graphed(_batch(50), beta), graphed(_batch(51), beta)  # one eager call, then the capture
    eval_key = (torch.Size([9, 12]), torch.float64, _batch(0).device, False, True)
    assert eval_key in graphed._graphs and len(graphed._graphs) == 3
    model.train()
    eager_calls = dict(graphed._eager_calls)
    graphed(_batch(52), beta)
    assert len(graphed._graphs) == 3 and graphed._eager_calls == eager_calls  # a replay of the training graph
    model.to(torch.float32).to(torch.float64)  # new storage for every parameter of the model
    graphed(_batch(53), beta)
    assert not graphed._graphs


def _config(engine: str, epochs: int) -> ExperimentConfig:
    return ExperimentConfig(
        model=ModelConfig(input_dim=12, latent_sizes=(3, 2), hidden_sizes=(16, 8), batch_norm=True),
        train=TrainConfig(epochs=epochs, batch_size=16, warmup_epochs=2, num_importance_samples=3, engine=engine),
    )


@cuda
def test_training_on_the_graph_engine_follows_the_fast_engine(make_synthetic, monkeypatch):
    replays = []
    replay = GraphStep._replay
    monkeypatch.setattr(GraphStep, "_replay", lambda self, *a: replays.append(1) or replay(self, *a))
    data = make_synthetic()
    fast = train(_config("fast", 4), dataset=data, device="cuda", progress=False)
    graphed = train(_config("cuda-graph", 4), dataset=data, device="cuda", progress=False)
    assert len(replays) == 4 * 4 - 3  # 4 steps an epoch, the first 3 eager
    for a, b in zip(fast.metrics, graphed.metrics):
        assert b["train_objective"] == pytest.approx(a["train_objective"], rel=1e-4)
    for p, q in zip(trainable_parameters(fast.model, fast.guide), trainable_parameters(graphed.model, graphed.guide)):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@cuda
def test_a_resumed_graph_run_ends_where_the_straight_run_does(tmp_path, make_synthetic):
    data = make_synthetic()
    straight = train(_config("cuda-graph", 3), out_dir=tmp_path / "a", dataset=data, device="cuda", progress=False)
    train(_config("cuda-graph", 1), out_dir=tmp_path / "b", dataset=data, device="cuda", progress=False)
    resumed = train(
        _config("cuda-graph", 3), out_dir=tmp_path / "b", dataset=data, device="cuda", progress=False, resume=True
    )
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_host_reads_deferred_keeps_the_loss_without_reading_the_device_and_restores_pyro(monkeypatch):
    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)), name="h")
    guide = BottomUpGuide(model)
    x = torch.ones(3, 4)
    pyro.set_rng_seed(1)
    plain = Trace_ELBO().differentiable_loss(model, guide, x)
    modules = (pyro.infer.trace_elbo, pyro.infer.trace_mean_field_elbo)
    originals = [(m.torch_item, m.warn_if_nan) for m in modules]

    def refuse(*args):
        raise AssertionError("read on the host")

    pyro.set_rng_seed(1)
    with monkeypatch.context() as patch, host_reads_deferred(), pyro.validation_enabled(False):
        # What a capture forbids: a float or a truth value read from a tensor (validation,
        # which reads them, is off in the training step).
        patch.setattr(torch.Tensor, "item", refuse)
        patch.setattr(torch.Tensor, "__bool__", refuse)
        deferred = Trace_ELBO().differentiable_loss(model, guide, x)
    assert deferred.item() == pytest.approx(plain.item(), rel=1e-6)
    assert deferred.requires_grad
    with pytest.raises(RuntimeError), host_reads_deferred():
        raise RuntimeError("inside")
    assert [(m.torch_item, m.warn_if_nan) for m in modules] == originals


def test_what_the_graph_engine_cannot_do_is_refused_before_any_work():
    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)), name="r")
    guide = LadderGuide(model)
    with pytest.raises(ValueError, match=r"^engine 'cuda-graph' records CUDA graphs, but the model is on cpu;"):
        GraphStep(model, guide, learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"^engine 'cuda-graph' does not support free bits"):
        GraphStep(model, guide, learning_rate=1e-3, free_bits=0.5)
    with pytest.raises(ValueError, match=r"^engine 'cuda-graph' runs in fp32"):
        GraphStep(model, guide, learning_rate=1e-3, precision="bf16")
    with pytest.raises(ValueError, match=r"^precision='bf16' runs on the fast engine"):
        TrainConfig(engine="cuda-graph", precision="bf16")
    with pytest.raises(ValueError, match=r"^engine 'cuda-graph' does not support free bits; set engine='fast'"):
        TrainConfig(engine="cuda-graph", free_bits=0.5)
    with pytest.raises(ValueError, match=r"^engine 'cuda-graph' does not record fine-tuning; set engine='fast'"):
        TrainConfig(engine="cuda-graph", finetune_epochs=2)
    with pytest.raises(ValueError, match=r"^engine 'cuda-graph' runs in one process; use engine 'fast'"):
        GraphStep(model, guide, learning_rate=1e-3, distributed=DistributedContext(rank=0, world_size=2))
    config = ExperimentConfig(model=CFG, train=TrainConfig(engine="cuda-graph", epochs=1))
    with pytest.raises(ValueError, match=r"^engine 'cuda-graph' needs a CUDA device, not cpu; use --engine fast"):
        train(config, device="cpu", progress=False)


@pytest.mark.parametrize("family, bottom", [("vlae", "mlp"), ("vqvae", "mlp"), ("lvae", "conv")])
def test_the_graph_engine_refuses_the_models_that_have_not_run_recorded(family, bottom):
    guide = "vae" if family != "lvae" else "ladder"
    model_config = ModelConfig(
        input_dim=16, latent_sizes=(2,), hidden_sizes=(8,), family=family, guide=guide, bottom=bottom
    )
    model = make_model(model_config, name=family)
    with pytest.raises(ValueError, match=r"^engine 'cuda-graph' has run recorded for the LVAE family with MLP"):
        GraphStep(model, make_guide(model), learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"^engine 'cuda-graph' has run recorded for the LVAE family with MLP"):
        ExperimentConfig(model=model_config, train=TrainConfig(engine="cuda-graph"))


def _bare_step(model, guide, optimizer) -> GraphStep:
    """A GraphStep without its constructor, which refuses a model on the CPU: enough for the
    pieces that do not touch the GPU."""
    step = GraphStep.__new__(GraphStep)
    step.model, step.guide, step._buffer_slots, step.optimizer = model, guide, None, optimizer
    return step


def test_a_saved_state_holds_the_learning_rate_as_a_number_not_the_live_tensor():
    model = GenerativeModel(CFG, name="sd")
    guide = LadderGuide(model)
    step = _bare_step(model, guide, torch.optim.Adam(trainable_parameters(model, guide), lr=torch.tensor(0.01)))
    saved = step._optimizer_state()
    step.optimizer.param_groups[0]["lr"].fill_(0.5)  # set_learning_rate writes the tensor in place
    assert saved["param_groups"][0]["lr"] == pytest.approx(0.01) and isinstance(saved["param_groups"][0]["lr"], float)


def test_the_storage_fingerprint_changes_with_new_storage_only():
    model = GenerativeModel(CFG, name="fp")
    guide = LadderGuide(model)
    step = _bare_step(model, guide, torch.optim.Adam(trainable_parameters(model, guide), lr=torch.tensor(0.01)))
    before = step._storage_fingerprint()
    # Adam's state, every parameter and buffer, and the learning rate.
    assert len(before) == 1 + len(trainable_parameters(model, guide)) + len(model_buffers(model, guide)) + 1
    step.optimizer.load_state_dict(step.optimizer.state_dict())  # new state and rate objects
    assert step._storage_fingerprint() != before
    before = step._storage_fingerprint()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # in place: the same storage
    assert step._storage_fingerprint() == before
    model.double()
    assert step._storage_fingerprint() != before


# The recorded body on the CPU. update_on_device is what a capture records; it names nothing
# specific to CUDA, so its logic runs here with the graph engine's own Adam: it must take the
# fast step's update, skip as the fast step does, and read no value on the host (a capture
# forbids that, and fails on the GPU only when it happens).


class _CapturableFastStep(FastStep):
    """The fast step with the graph engine's Adam (fused, capturable, a tensor learning rate),
    which runs on the CPU too."""

    _adam = GraphStep._adam


class _HostReads(TorchDispatchMode):
    """Records each operation that reads a tensor's value on the host: ``item``, ``float``
    and ``bool`` of a tensor (``_local_scalar_dense``) and the data-dependent shapes."""

    READS = (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.masked_select)

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _cpu_pair(guide_cls, **options):
    """A graph engine's step on the CPU (float64), after one eager update so that Adam's state
    exists, and the plain fast step on an identical copy of the same model."""
    (model, guide), (model_f, guide_f) = _pair(guide_cls, device="cpu")
    # The graph engine's Adam reads its learning rate as a float32 tensor: both take that value.
    learning_rate = float(torch.tensor(1e-2, dtype=torch.float32))
    recorded = _CapturableFastStep(model, guide, learning_rate=learning_rate, **options)
    fast = TrainingStep(model_f, guide_f, learning_rate=learning_rate, engine="fast", **options)
    for step in (recorded, fast):
        pyro.set_rng_seed(0)
        step(_batch(0, device="cpu"), torch.tensor(0.5, dtype=torch.float64))
    recorded.optimizer.zero_grad(set_to_none=True)
    return recorded, fast


def _recorded_update(step, x, beta, threshold=math.inf) -> tuple[float, float]:
    loss, norm = update_on_device(step, x, beta, threshold=torch.tensor(threshold, dtype=torch.float64)).tolist()
    step.optimizer.zero_grad(set_to_none=True)  # a capture starts with no gradients, as the next call must
    return loss, norm


@pytest.mark.parametrize("guide_cls", GUIDES)
@pytest.mark.parametrize("objective", ["closed form", "traced"])
def test_the_recorded_update_reads_no_value_on_the_host(guide_cls, objective, monkeypatch):
    recorded, _ = _cpu_pair(guide_cls, grad_clip=1.0, grad_clip_value=0.1)  # the clips record too
    if objective == "traced":  # a forward hook keeps Pyro's traced ELBO (see closed_form_applies)
        recorded.guide.register_forward_hook(lambda module, args, out: None)
    assert closed_form_applies(recorded.model, recorded.guide) == (objective == "closed form")
    x, beta = _batch(1, device="cpu"), torch.tensor(0.5, dtype=torch.float64)
    with _HostReads() as reads, host_reads_deferred():
        recorded.loss(x, beta)
    # β's sign, checked as on an eager step: once by the closed form, or by the model and the guide.
    assert reads.seen == ["aten._local_scalar_dense.default"] * (1 if objective == "closed form" else 2)
    # While recording on β's device the check is left out, and then nothing reads the host.
    monkeypatch.setattr(warmup, "_sign_readable", lambda beta: False)
    with _HostReads() as reads, host_reads_deferred():
        update_on_device(recorded, x, beta, threshold=torch.tensor(math.inf, dtype=torch.float64))
    assert reads.seen == []


@pytest.mark.parametrize("guide_cls", GUIDES)
@pytest.mark.parametrize("clip", [{}, {"grad_clip": 1.0, "grad_clip_value": 0.1}])
def test_the_recorded_update_takes_the_fast_steps_update(guide_cls, clip):
    recorded, fast = _cpu_pair(guide_cls, skip_threshold=1e6, **clip)  # a threshold: the fast step's norm
    for seed, beta in [(1, 0.5), (2, 0.75), (3, 0.0), (4, 1.0)]:
        x, beta = _batch(seed, device="cpu"), torch.tensor(beta, dtype=torch.float64)
        pyro.set_rng_seed(seed)
        loss, norm = _recorded_update(recorded, x, beta, threshold=1e6)
        pyro.set_rng_seed(seed)
        assert loss == pytest.approx(fast(x, beta).item(), rel=1e-12)
        # The fast step reads its norm back as a float32 number.
        assert norm == pytest.approx(fast.grad_norm, rel=1e-7) and not fast.skipped
    # Capturable Adam forms its bias correction as a tensor, the fused one as a number.
    for a, b in zip(_state(recorded), _state(fast), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("guide_cls", GUIDES)
@pytest.mark.parametrize("cause", ["non_finite", "threshold"])
def test_a_skipped_recorded_update_leaves_everything_as_it_was(guide_cls, cause):
    recorded, _ = _cpu_pair(guide_cls)
    x = _batch(1, device="cpu")
    if cause == "non_finite":
        x[0, 0] = math.nan  # NaN through the batch-norm statistics, the loss and every gradient
    before = _state(recorded)
    loss, norm = _recorded_update(recorded, x, torch.tensor(1.0, dtype=torch.float64), threshold=1e-9)
    assert math.isnan(loss) if cause == "non_finite" else 1e-9 < norm < math.inf
    for a, b in zip(before, _state(recorded), strict=True):
        assert torch.equal(a, b)
    _recorded_update(recorded, _batch(2, device="cpu"), torch.tensor(1.0, dtype=torch.float64))
    assert not any(torch.equal(a, b) for a, b in zip(before, _state(recorded)) if a.is_floating_point())
