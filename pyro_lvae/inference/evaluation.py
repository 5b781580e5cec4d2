r"""Per-example ELBO and importance-weighted bound :math:`\mathcal{L}_K` (paper eq. 6).

For each example x and K draws :math:`z^{(k)} \sim q(z|x)` the log-weights are
:math:`\log w_k = \log p(x, z^{(k)}) - \log q(z^{(k)}|x)`, and

.. math::

    \mathcal{L}_1 \approx \frac{1}{K}\sum_k \log w_k, \qquad
    \mathcal{L}_K = \log \frac{1}{K} \sum_k w_k .

``pyro.infer.Importance`` and ``vectorized_importance_weights`` sum the log-weights
over every site of a trace, the batch plate included, so on a minibatch they
estimate log p(batch), not a bound per example. Here the guide and model run
inside a ``pyro.plate("particles", k, dim=-2)`` and the per-site log-densities
are summed over sites only, giving a ``(k, batch)`` array of log-weights. The K
particles are drawn in chunks whose size is set by a memory budget, so K = 5000
on the full test set runs in bounded memory. For a single example the result
estimates the same quantity as
``Importance(model, guide, num_samples=K).run(x).get_log_normalizer()``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from torch import nn

from ..config import DEFAULT_MEMORY_BUDGET, is_count
from ..models.model import GenerativeModel
from ..models.protocol import (  # noqa: F401 - check_examples and eval_mode are also importable from here
    check_examples,
    check_input_width,
    check_pair,
    eval_mode,
    parameter_dtype,
)
from ..models.registration import registered_once
from ..precision import autocast_for, check_precision, warn_if_bf16_is_emulated
from ..rng import preserved_rng, rng_state, set_rng_state
from .closed_form import closed_form_applies, closed_form_log_weights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogWeights:
    """Log importance weights and their per-layer split for one chunk of particles.

    :param total: ``log p(x, z) - log q(z|x)``, shape ``(particles, batch)``.
    :param reconstruction: ``log p(x | z1)``, shape ``(particles, batch)``.
    :param layer_kl: ``log q(z_i|·) - log p(z_i|·)`` per layer, shape
        ``(depth, particles, batch)``; row 0 is z1. Its mean over particles
        estimates that layer's KL term of the ELBO.
    """

    total: torch.Tensor
    reconstruction: torch.Tensor
    layer_kl: torch.Tensor


def _is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA's OutOfMemoryError, or the CPU
    allocator's RuntimeError)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "failed to allocate" in text


def _site_log_prob(site: dict, shape: torch.Size) -> torch.Tensor:
    return site["fn"].log_prob(site["value"]).expand(shape)


def particle_traces(model: GenerativeModel, guide: nn.Module, x: torch.Tensor, num_particles: int):
    """Trace ``guide`` and the replayed ``model`` with ``num_particles`` draws per example.

    Every site is broadcast to ``(num_particles, batch)`` by a
    ``pyro.plate("particles", num_particles, dim=-2)``; ``poutine.block`` keeps these
    internal traces from any handler the caller has installed. The ladder guide's
    top-down priors are computed once and reused by the model
    (:meth:`~pyro_lvae.models.model.GenerativeModel.shared_priors`).

    :param model: The generative model.
    :param guide: A guide for it.
    :param x: Data, shape ``(batch, input_dim)``.
    :param num_particles: Draws per example.
    :returns: ``(guide_trace, model_trace)``.
    """
    if num_particles <= 0:
        raise ValueError(f"num_particles must be positive, got {num_particles}.")
    with poutine.block(), model.shared_priors(), pyro.plate("particles", num_particles, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    return guide_trace, model_trace


def particle_log_weights(model: GenerativeModel, guide: nn.Module, x: torch.Tensor, num_particles: int) -> LogWeights:
    """Draw ``num_particles`` samples per example from ``guide`` and weight them,
    keeping the autograd graph (the training objective of fine-tuning differentiates
    these; :func:`log_importance_weights` is the no-grad version for evaluation).

    No warm-up scaling is applied: these are the weights of the true bound.

    :param model: The generative model.
    :param guide: A guide for it.
    :param x: Data, shape ``(batch, input_dim)``.
    :param num_particles: Particles per example.
    """
    guide_trace, model_trace = particle_traces(model, guide, x, num_particles)
    shape = torch.Size((num_particles, x.shape[0]))
    depth = model.config.depth
    recon = _site_log_prob(model_trace.nodes["x"], shape)
    layer_kl = torch.stack(
        [
            _site_log_prob(guide_trace.nodes[f"z{i}"], shape) - _site_log_prob(model_trace.nodes[f"z{i}"], shape)
            for i in range(1, depth + 1)
        ]
    )
    return LogWeights(total=recon - layer_kl.sum(0), reconstruction=recon, layer_kl=layer_kl)


@torch.no_grad()
def log_importance_weights(model: GenerativeModel, guide: nn.Module, x: torch.Tensor, num_particles: int) -> LogWeights:
    """:func:`particle_log_weights` without autograd, for evaluation.

    :param model: The generative model.
    :param guide: A guide for it.
    :param x: Data, shape ``(batch, input_dim)``.
    :param num_particles: Particles per example.
    """
    if closed_form_applies(model, guide):
        # The same weights on the same draws, without traces or distribution objects
        # (docs/performance.md has the speed-up; tests/inference/test_closed_form.py the equality).
        check_input_width(x, model.config.input_dim)  # the model's own check, which this path skips
        return LogWeights(*closed_form_log_weights(model, guide, x, num_particles))
    return particle_log_weights(model, guide, x, num_particles)


def particle_chunk_size(model: GenerativeModel, batch_size: int, *, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """How many particles per chunk keep one evaluation chunk under ``memory_budget`` bytes.

    The estimate counts, per (particle, example) pair, every activation of the
    model and guide networks that is alive during a no-grad forward pass (all
    hidden layers, latent means/variances/samples and the observation
    parameters), times a safety factor of 3 for temporaries.

    :param model: The generative model (its configuration and dtype set the sizes).
    :param batch_size: Examples per evaluation batch.
    :param memory_budget: Bytes one chunk may use.
    """
    cfg = model.config
    floats = 3 * cfg.input_dim + 4 * sum(cfg.hidden_sizes) + 8 * sum(cfg.latent_sizes)
    itemsize = next(model.parameters()).element_size()
    per_particle = 3 * floats * itemsize * batch_size
    return max(1, int(memory_budget // per_particle))


@torch.no_grad()
def importance_sampled_bounds(
    model: GenerativeModel,
    guide: nn.Module,
    x: torch.Tensor,
    *,
    num_samples: int,
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    precision: str = "fp32",
) -> dict[str, torch.Tensor]:
    """Per-example ELBO and L_K for one batch of examples.

    :param model: The generative model.
    :param guide: A guide for it.
    :param x: Data, shape ``(batch, input_dim)``.
    :param num_samples: K.
    :param chunk_size: Particles per chunk; by default from ``memory_budget``
        (see :func:`particle_chunk_size`). When a chunk runs out of memory it is
        drawn again in chunks of half the size, with the same random draws.
    :param memory_budget: Bytes one chunk may use (see :func:`particle_chunk_size`).
    :param precision: ``"fp32"`` (the default, and every number the library reports) or ``"bf16"``:
        the networks' matrix products under bfloat16 autocast, the densities in fp32, as
        training's ``precision="bf16"``. For a quicker look, not for reported numbers: with the
        shipped ``lvae-bn-wu-5`` on a 2-core CPU with AMX, L_5000 of the test set took 370 s
        against 576 s in fp32 back to back (1.6× in interleaved runs), 0.004 nats from it, while
        each example's L_K moved by 0.07–0.08 nats (standard deviation) on the same draws
        (docs/performance.md). The paper's model with its ladder or bottom-up guide, in float32.
    :returns: A dict of per-example tensors: ``elbo`` (mean of the K log-weights),
        ``log_likelihood`` (L_K), ``reconstruction`` (mean log p(x|z1)) and
        ``layer_kl`` (shape ``(depth, batch)``), plus ``log_weights`` of shape
        ``(num_samples, batch)``.
    """
    options = {"chunk_size": chunk_size, "memory_budget": memory_budget, "precision": precision}
    _check_bounds_options(model, guide, x, num_samples=num_samples, **options)
    if precision == "bf16":
        warn_if_bf16_is_emulated(model, stacklevel=4)  # 4: past torch.no_grad's wrapper, to the caller
    return _bounds(model, guide, x, num_samples=num_samples, **options)


def _bounds(
    model: GenerativeModel,
    guide: nn.Module,
    x: torch.Tensor,
    *,
    num_samples: int,
    chunk_size: int | None,
    memory_budget: int,
    precision: str,
) -> dict[str, torch.Tensor]:
    """:func:`importance_sampled_bounds` once its options are checked."""
    if chunk_size is None:
        chunk_size = particle_chunk_size(model, x.shape[0], memory_budget=memory_budget)
    chunks = []
    recon_sum = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    kl_sum = torch.zeros(model.config.depth, x.shape[0], dtype=x.dtype, device=x.device)
    done = 0
    while done < num_samples:
        k = min(chunk_size, num_samples - done)
        rng = rng_state()
        try:
            with autocast_for(precision, x.device):
                lw = log_importance_weights(model, guide, x, k)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_out_of_memory(exc) or k == 1:
                raise
            # Retry the same draws in half-size chunks: the RNG is rewound, so the result
            # equals that of a run started with the smaller chunk size.
            set_rng_state(rng)
            chunk_size = max(1, k // 2)
            logger.warning("Out of memory with %d particles per chunk; retrying with %d.", k, chunk_size)
            if x.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        chunks.append(lw.total)
        recon_sum += lw.reconstruction.sum(0)
        kl_sum += lw.layer_kl.sum(1)
        done += k
    log_w = torch.cat(chunks)
    return {
        "elbo": log_w.mean(0),
        "log_likelihood": torch.logsumexp(log_w, 0) - math.log(num_samples),
        "reconstruction": recon_sum / num_samples,
        "layer_kl": kl_sum / num_samples,
        "log_weights": log_w,
    }


def _check_bounds_options(
    model: GenerativeModel,
    guide: Any,
    x: torch.Tensor,
    *,
    num_samples: Any,
    chunk_size: Any,
    memory_budget: Any,
    precision: Any,
) -> None:
    """Refuse, before any draw, what :func:`importance_sampled_bounds` cannot use."""
    if not is_count(num_samples):
        raise ValueError(f"num_samples (K) must be a positive integer, got {num_samples!r}.")
    if chunk_size is not None and not is_count(chunk_size):
        raise ValueError(f"chunk_size must be a positive integer or None (sized from the budget), got {chunk_size!r}.")
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not memory_budget > 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}.")
    check_pair(model, guide)
    check_examples(x)
    check_input_width(x, model.config.input_dim, dtype=parameter_dtype(model))
    _check_precision(model, guide, precision)
    # Pyro's Bernoulli checks its support under validation; the closed form has no distribution
    # object to do it, so the check is made here, for both paths alike.
    if is_validation_enabled() and model.config.likelihood == "bernoulli" and not ((x == 0) | (x == 1)).all():
        raise ValueError(
            "x has values other than 0 and 1, which a Bernoulli likelihood cannot score; binarize the data "
            "first (pyro_lvae.data.binarize)."
        )


def _check_precision(model: GenerativeModel, guide: nn.Module, precision: Any) -> None:
    """Refuse a precision the evaluation cannot honour."""
    check_precision(precision)
    if precision == "fp32":
        return
    if not closed_form_applies(model, guide):
        raise ValueError(
            f"precision={precision!r} evaluates the paper's model with its ladder or bottom-up guide only, "
            f"not {type(model).__name__} with {type(guide).__name__}; use precision='fp32'."
        )
    if parameter_dtype(model) != torch.float32:
        raise ValueError(
            f"precision={precision!r} lowers float32 networks, but the model's parameters are "
            f"{parameter_dtype(model)}; use precision='fp32', or model.float() first."
        )


def _warn_if_not_finite(log_likelihood: torch.Tensor) -> None:
    """Say so when some examples' bounds are not finite, with the usual cause (a training run's
    periodic evaluation goes on: the numbers are written, and the checkpoint is kept)."""
    bad = int((~torch.isfinite(log_likelihood)).sum())
    if bad:
        logger.warning(
            "L_K is not finite for %d of %d examples: a variance of the model or guide underflowed to 0 "
            "(config.variance_floor = 0?) or the parameters hold NaN; train with a positive variance_floor.",
            bad,
            log_likelihood.numel(),
        )


def batch_seed(seed: int, batch: int) -> int:
    """Seed of evaluation batch ``batch`` when :func:`evaluate` is given ``seed``.

    :param seed: The evaluation's seed.
    :param batch: The batch's index.
    """
    return (seed * 1_000_033 + batch) % 2**63


def _log_expected_duration(first_batch: float, batches: int, world_size: int, num_samples: int) -> None:
    """Log the expected duration of an evaluation from its first batch, when it is long."""
    expected = first_batch * math.ceil(batches / world_size)
    if expected > 60:
        logger.info(
            "L_%d on %d batches: the first took %.1f s, so expect about %.0f min in all.",
            num_samples,
            batches,
            first_batch,
            expected / 60,
        )


@torch.no_grad()
def evaluate(
    model: GenerativeModel,
    guide: nn.Module,
    data: torch.Tensor,
    *,
    num_samples: int = 5000,
    batch_size: int = 500,
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
    return_log_weights: bool = False,
    seed: int | None = None,
    precision: str = "fp32",
) -> dict[str, object]:
    """Test ELBO (L1) and L_K over a dataset, in nats per example.

    Puts model and guide in evaluation mode (batch norm uses running statistics)
    and restores their previous mode afterwards.

    In a distributed run (an initialized ``torch.distributed`` process group) the
    evaluation batches are divided among the processes and the per-example results
    gathered, so every process returns the whole result.

    :param model: The generative model.
    :param guide: A guide for it.
    :param data: Binary (or grey-level, for the Gaussian likelihood) data,
        shape ``(N, input_dim)``, on the model's device.
    :param num_samples: K of L_K (paper: 5000).
    :param batch_size: Examples per evaluation batch.
    :param chunk_size: Particles per chunk (default: from ``memory_budget``).
    :param memory_budget: Bytes one particle chunk may use.
    :param progress: Show a tqdm progress bar.
    :param return_log_weights: Also return the ``(num_samples, N)`` log-weights
        (on the CPU) under ``log_weights``, e.g. for PSIS diagnostics.
    :param seed: Draw each batch's particles from a generator seeded by (``seed``,
        batch index) (:func:`batch_seed`), leaving the global random state as it was:
        the result is then reproducible and independent of how the batches are
        divided among processes. ``None`` draws from the global random state.
    :param precision: ``"fp32"`` (the default) or ``"bf16"``, a quicker look in bfloat16 (see
        :func:`importance_sampled_bounds`); the result records it under ``precision``.
    :returns: ``elbo`` and ``log_likelihood`` (means, floats), ``kl_per_layer``
        (list of floats, z1 first), ``reconstruction`` (float), ``num_samples``,
        ``num_examples`` and ``precision``, and the per-example tensors ``elbo_per_example``
        and ``log_likelihood_per_example``.
    """
    from ..training.distributed import current_context, gather_batches

    check_examples(data)
    if not is_count(batch_size):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    _check_precision(model, guide, precision)
    if precision == "bf16":
        warn_if_bf16_is_emulated(model, stacklevel=4)  # 4: past torch.no_grad's wrapper, to the caller
    ctx = current_context()
    batches = data.split(batch_size)
    keys = ("elbo", "log_likelihood", "reconstruction", "layer_kl") + (("log_weights",) if return_log_weights else ())
    options = {
        "num_samples": num_samples,
        "chunk_size": chunk_size,
        "memory_budget": memory_budget,
        "precision": precision,
    }
    mine = _evaluate_my_batches(model, guide, batches, ctx, keys, seed=seed, progress=progress, **options)
    results = gather_batches(mine, ctx)
    ordered = [results[b] for b in range(len(batches))]
    elbo_t = torch.cat([r["elbo"] for r in ordered])
    ll_t = torch.cat([r["log_likelihood"] for r in ordered])
    _warn_if_not_finite(ll_t)
    result: dict[str, object] = {
        "elbo": elbo_t.mean().item(),
        "log_likelihood": ll_t.mean().item(),
        "reconstruction": torch.cat([r["reconstruction"] for r in ordered]).mean().item(),
        "kl_per_layer": torch.cat([r["layer_kl"] for r in ordered], dim=1).mean(1).tolist(),
        "num_samples": num_samples,
        "num_examples": data.shape[0],
        "precision": precision,
        "elbo_per_example": elbo_t.cpu(),
        "log_likelihood_per_example": ll_t.cpu(),
    }
    if return_log_weights:
        result["log_weights"] = torch.cat([r["log_weights"] for r in ordered], dim=1)
    return result


def _evaluate_my_batches(
    model: GenerativeModel,
    guide: nn.Module,
    batches: tuple[torch.Tensor, ...],
    ctx: Any,
    keys: tuple[str, ...],
    *,
    num_samples: int,
    seed: int | None,
    progress: bool,
    **options: Any,
) -> dict[int, dict[str, torch.Tensor]]:
    """The bounds of this process's share of ``batches`` (every ``world_size``-th one)."""
    from tqdm.auto import tqdm

    mine: dict[int, dict[str, torch.Tensor]] = {}
    start = time.perf_counter()
    # Evaluation needs no param store: without registration, a second model of the same
    # name evaluated in one session is not renamed.
    with eval_mode(model, guide), registered_once(model, guide):
        for b in tqdm(range(len(batches)), disable=not progress, desc=f"L_{num_samples}", leave=False):
            if b % ctx.world_size != ctx.rank:
                continue
            if b == ctx.world_size:  # one batch done here: say how long the rest will take
                _log_expected_duration(time.perf_counter() - start, len(batches), ctx.world_size, num_samples)
            with preserved_rng(batch_seed(seed, b)) if seed is not None else contextlib.nullcontext():
                # Checked batch by batch; the bf16 warning was given once, by evaluate.
                _check_bounds_options(model, guide, batches[b], num_samples=num_samples, **options)
                out = _bounds(model, guide, batches[b], num_samples=num_samples, **options)
            mine[b] = {k: out[k].cpu() if ctx.enabled or k == "log_weights" else out[k] for k in keys}
    return mine
