"""Frozen, validated configuration objects.

A run is described by an :class:`ExperimentConfig`, which holds a
:class:`ModelConfig` (the generative model and the guide) and a
:class:`TrainConfig` (data, optimisation, warm-up and evaluation). Both are
frozen dataclasses that validate themselves in ``__post_init__``, so an invalid
configuration fails when it is built, before any data is loaded. Checkpoints
store the configuration as a plain dictionary (:meth:`ExperimentConfig.to_dict`)
and rebuild it with :meth:`ExperimentConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

ACTIVATIONS = ("leaky_relu", "tanh", "identity")
LIKELIHOODS = ("bernoulli", "gaussian")
GUIDES = ("ladder", "vae")
FAMILIES = ("lvae", "vlae", "vqvae")
BOTTOMS = ("mlp", "conv")
FREE_BITS_MODES = ("layer", "unit")


def check_free_bits(free_bits: float, mode: str) -> None:
    """Raise :class:`ValueError` for a free-bits λ that is negative or not finite, or an unknown mode.

    :param free_bits: λ, nats per example (0 = off).
    :param mode: ``"layer"`` or ``"unit"``.
    """
    if isinstance(free_bits, bool) or not isinstance(free_bits, (int, float)) or not 0 <= free_bits < float("inf"):
        raise ValueError(f"free_bits must be a finite number ≥ 0 (nats per example; 0 = off), got {free_bits!r}.")
    if mode not in FREE_BITS_MODES:
        raise ValueError(f"free_bits_mode must be one of {', '.join(FREE_BITS_MODES)}, got {mode!r}.")


def check_skip_threshold(threshold: float | str) -> None:
    """Raise :class:`ValueError` unless ``threshold`` is ``"auto"`` or a finite number ≥ 0.

    :param threshold: The gradient-norm skip threshold (0 = off).
    """
    if threshold == "auto":
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < math.inf:
        raise ValueError(
            f"skip_threshold must be 'auto' or a finite gradient norm ≥ 0 (0 = off), got {threshold!r}; "
            "use 'auto' to follow the recent norms."
        )


def check_ema_decay(decay: float) -> None:
    """Raise :class:`ValueError` unless ``decay`` is 0 (off) or lies in (0, 1).

    :param decay: The decay of the weights' moving average.
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ValueError(f"ema must be a decay in [0, 1) (0 = off; e.g. 0.999), got {decay!r}.")


DATASETS = ("mnist", "binarized_mnist", "fashion_mnist", "omniglot28", "omniglot", "norb")
BINARIZATIONS = ("dynamic", "static", "none")
ENGINES = ("fast", "svi", "cuda-graph")
PRECISIONS = ("fp32", "bf16")

#: Default memory budget for one particle chunk of the L_K evaluation, in bytes
#: (:func:`~pyro_lvae.inference.evaluation.evaluate`).
DEFAULT_MEMORY_BUDGET = 4 * 2**30

#: The allowed words of each field that takes words, by field name (the CLI offers them as choices;
#: `skip_threshold` also takes a number).
CHOICES = {
    "activation": ACTIVATIONS,
    "likelihood": LIKELIHOODS,
    "guide": GUIDES,
    "family": FAMILIES,
    "bottom": BOTTOMS,
    "free_bits_mode": FREE_BITS_MODES,
    "dataset": DATASETS,
    "binarization": BINARIZATIONS,
    "engine": ENGINES,
    "precision": PRECISIONS,
    "skip_threshold": ("auto",),  # or a number (its annotation: float | str)
}

#: Latent and hidden sizes of the paper's deepest model (§3), bottom to top.
PAPER_LATENT_SIZES = (64, 32, 16, 8, 4)
PAPER_HIDDEN_SIZES = (512, 256, 128, 64, 32)


def _check_sizes(name: str, sizes: tuple[int, ...]) -> None:
    if not isinstance(sizes, tuple) or len(sizes) == 0:
        raise ValueError(f"{name} must be a non-empty tuple of positive integers, got {sizes!r}.")
    for s in sizes:
        if not is_count(s):
            raise ValueError(f"{name} must hold positive integers, got {sizes!r}; fix the entry {s!r}.")


def is_count(value: Any, *, least: int = 1) -> bool:
    """Whether ``value`` is an integer (``bool`` excluded) of at least ``least``.

    :param value: What was passed for a count (samples, batch size, steps…).
    :param least: The smallest count allowed.
    """
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _not_number(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, float))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(choices)}.")


@dataclass(frozen=True)
class ModelConfig:
    r"""Architecture of the generative model and of the guide.

    :param input_dim: Dimension of a flattened observation (784 for 28×28 images).
    :param latent_sizes: Units per stochastic layer, bottom (z1) to top (zL).
        Its length is the depth L.
    :param hidden_sizes: Width of the two-hidden-layer MLP below each latent layer:
        ``hidden_sizes[0]`` connects x and z1 (or d1), ``hidden_sizes[i]`` connects
        z_i and z_{i+1}. Must have the same length as ``latent_sizes``.
    :param activation: ``"leaky_relu"`` (slope 0.1, the paper's MNIST setting),
        ``"tanh"`` (its NORB setting) or ``"identity"`` (linear-Gaussian tests).
    :param batch_norm: Batch normalization after each hidden linear layer.
    :param likelihood: ``"bernoulli"`` (sigmoid mean) or ``"gaussian"`` (linear mean,
        softplus variance).
    :param guide: ``"ladder"`` (:class:`~pyro_lvae.models.guides.LadderGuide`) or ``"vae"``
        (:class:`~pyro_lvae.models.guides.BottomUpGuide`; ``"bottom-up"`` is accepted and
        stored as ``"vae"``). The VLAE and the VQ-VAE have one
        (bottom-up) inference network each and need ``"vae"``.
    :param family: The model family: ``"lvae"`` (the hierarchical model of the LVAE
        paper, with either guide), ``"vlae"`` (the Variational Ladder Autoencoder,
        :mod:`pyro_lvae.models.vlae`) or ``"vqvae"`` (:mod:`pyro_lvae.models.vqvae`, one layer of
        ``latent_sizes[0]`` code positions).
    :param codebook_size: VQ-VAE: number K of codebook vectors.
    :param code_dim: VQ-VAE: dimension D of each codebook vector.
    :param commitment_cost: VQ-VAE: weight β of the commitment term (0.25 in the paper).
    :param codebook_ema: VQ-VAE: update the codebook by exponential moving averages
        instead of by the gradient of the codebook term.
    :param ema_decay: VQ-VAE: decay γ of those moving averages.
    :param variance_floor: Smallest variance of every Gaussian head (latent layers,
        bottom-up estimates and a Gaussian likelihood): ``softplus(·).clamp_min(floor)``.
        The authors' code adds ``1e-5`` to every latent variance; without a floor the
        ladder model's top-down prior variances underflow in a full-length run. 0 gives
        the paper's text exactly (see docs/reproduce.md).
    :param leaky_slope: Negative slope of the leaky rectifier (paper §3: 0.1; the
        authors' Lasagne code: 0.01).
    :param ladder_share_params: Ladder guide: compute the top-down :math:`(\mu_{p,i},
        \sigma^2_{p,i})` it merges with the model's own networks (paper §2.2, the
        default) or, when ``False``, with networks of its own of the same shape (the
        authors' ``-ladder_share_params False``).
    :param only_mu_up: Ladder guide: the upward pass reads the bottom-up mean
        :math:`\hat\mu_{q,n-1}` of the layer below instead of :math:`d_{n-1}` (the
        authors' ``-only_mu_up True``; the paper's eq. 13 reads :math:`d_{n-1}`).
    :param bottom: The networks between x and z1 (decoder) and between x and d1 (the
        guides' first upward block): ``"mlp"`` (the paper) or ``"conv"``, two stride-2
        convolutions from the square image to a quarter of its side and the transposed
        ones back (:mod:`pyro_lvae.models.nn`); the ladder above stays as in the paper.
        The LVAE family only; ``input_dim`` must be the square of a multiple of 4.
    :param conv_channels: Channels of the first convolution (the second has twice as many).
    """

    input_dim: int = 784
    latent_sizes: tuple[int, ...] = PAPER_LATENT_SIZES
    hidden_sizes: tuple[int, ...] = PAPER_HIDDEN_SIZES
    activation: str = "leaky_relu"
    batch_norm: bool = True
    likelihood: str = "bernoulli"
    guide: str = "ladder"
    family: str = "lvae"
    codebook_size: int = 64
    code_dim: int = 16
    commitment_cost: float = 0.25
    codebook_ema: bool = False
    ema_decay: float = 0.99
    variance_floor: float = 1e-5
    leaky_slope: float = 0.1
    ladder_share_params: bool = True
    only_mu_up: bool = False
    bottom: str = "mlp"
    conv_channels: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.guide, str):  # accepted aliases (ALIASES: "bottom-up") are stored by their own name
            object.__setattr__(self, "guide", ALIASES["guide"].get(self.guide, self.guide))
        if isinstance(self.input_dim, bool) or not isinstance(self.input_dim, int) or self.input_dim <= 0:
            raise ValueError(f"input_dim must be a positive integer, got {self.input_dim!r}.")
        _check_sizes("latent_sizes", self.latent_sizes)
        _check_sizes("hidden_sizes", self.hidden_sizes)
        if len(self.latent_sizes) != len(self.hidden_sizes):
            raise ValueError(
                f"latent_sizes {self.latent_sizes} and hidden_sizes {self.hidden_sizes} must have "
                "the same length (one MLP width per stochastic layer); make them match."
            )
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("likelihood", self.likelihood, LIKELIHOODS)
        _check_choice("guide", self.guide, GUIDES)
        if not isinstance(self.batch_norm, bool):
            raise ValueError(f"batch_norm must be True or False, got {self.batch_norm!r}.")
        _check_choice("family", self.family, FAMILIES)
        if self.family != "lvae" and self.guide != "vae":
            raise ValueError(f"The {self.family} has a single bottom-up inference network; set guide='vae' for it.")
        for name in ("codebook_size", "code_dim"):
            value = getattr(self, name)
            if not is_count(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be at least 2, got {self.codebook_size}.")
        if not isinstance(self.commitment_cost, (int, float)) or not self.commitment_cost > 0:
            raise ValueError(f"commitment_cost must be a positive number, got {self.commitment_cost!r}.")
        for name in ("codebook_ema", "ladder_share_params", "only_mu_up"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if _not_number(self.variance_floor) or not 0 <= self.variance_floor < 1:
            raise ValueError(
                f"variance_floor must lie in [0, 1), got {self.variance_floor!r}; the authors' code uses 1e-5."
            )
        if _not_number(self.leaky_slope) or not 0 <= self.leaky_slope < 1:
            raise ValueError(f"leaky_slope must lie in [0, 1), got {self.leaky_slope!r}; the paper uses 0.1.")
        if not isinstance(self.ema_decay, (int, float)) or not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie strictly between 0 and 1, got {self.ema_decay!r}.")
        self._check_bottom()
        if self.family == "vqvae" and self.depth != 1:
            raise ValueError(
                f"A VQ-VAE has one latent layer: set latent_sizes to (number of code positions,) "
                f"and hidden_sizes to one width, got {self.latent_sizes} and {self.hidden_sizes}."
            )

    def _check_bottom(self) -> None:
        _check_choice("bottom", self.bottom, BOTTOMS)
        if isinstance(self.conv_channels, bool) or not isinstance(self.conv_channels, int) or self.conv_channels <= 0:
            raise ValueError(f"conv_channels must be a positive integer, got {self.conv_channels!r}.")
        if self.bottom != "conv":
            return
        if self.family != "lvae":
            raise ValueError(f"bottom='conv' is built for the LVAE family, not the {self.family}; use bottom='mlp'.")
        side = math.isqrt(self.input_dim)
        if side * side != self.input_dim or side % 4:
            raise ValueError(
                f"bottom='conv' needs square images whose side is a multiple of 4 (e.g. 784 = 28²), "
                f"got input_dim={self.input_dim}; use bottom='mlp'."
            )

    @property
    def image_side(self) -> int:
        """The side of the square image, for ``bottom='conv'``."""
        return math.isqrt(self.input_dim)

    @property
    def depth(self) -> int:
        """Number of stochastic layers L."""
        return len(self.latent_sizes)


@dataclass(frozen=True)
class TrainConfig:
    """Data, optimisation, warm-up and evaluation settings.

    :param dataset: One of ``mnist``, ``binarized_mnist``, ``fashion_mnist``,
        ``omniglot28`` (28×28 OMNIGLOT images built from Lake's originals, with their own split) or ``omniglot``
        (the IWAE ``chardata.mat`` file).
    :param binarization: ``"dynamic"`` (resample x ~ Bernoulli(grey level) every
        epoch, paper §3), ``"static"`` (data already binary) or ``"none"``
        (grey levels, for the Gaussian likelihood).
    :param epochs: Number of training epochs.
    :param batch_size: Minibatch size (paper: 256).
    :param learning_rate: Adam learning rate (paper: 1e-3).
    :param warmup_epochs: N_t of eq. 20: β rises linearly from 0 to 1 over this many
        epochs. 0 disables warm-up (β = 1 throughout).
    :param eval_every: Evaluate test ELBO and per-layer KL every this many epochs.
    :param eval_particles: Particles per example for the periodic test ELBO.
    :param num_importance_samples: K of the final importance-weighted bound L_K
        (paper: 5000).
    :param train_subset: Use only the first this many training examples (0 = all).
    :param test_subset: Use only the first this many test examples (0 = all).
    :param seed: Seed of every random number generator.
    :param engine: How a training step is taken: ``"fast"`` (one fused
        ``torch.optim.Adam``; the default) or ``"svi"``
        (``pyro.infer.SVI`` with ``pyro.optim.Adam``, the textbook loop). Both give
        the same updates; see :mod:`pyro_lvae.training.steps`. ``"cuda-graph"`` is the
        fast step recorded as a CUDA graph and replayed (GPU only, one process, fp32,
        no free bits, no fine-tuning; :mod:`pyro_lvae.training.cuda_graph`).
    :param finetune_epochs: Fine-tuning epochs after the ``epochs`` of ordinary
        training (paper §3: 2000; 0 = none). Fine-tuning trains with β = 1 on the
        importance-weighted bound (:func:`~pyro_lvae.inference.objectives.importance_weighted_loss`)
        and an annealed learning rate.
    :param finetune_mc_samples: Monte Carlo samples M of the fine-tuning objective (paper: 10).
    :param finetune_iw_samples: Importance-weighted samples K per Monte Carlo sample
        (paper: 1 for "finetuning", 10 for "finetuning + IW=10" in Table 1).
    :param finetune_lr_decay: Factor applied to the learning rate every
        ``finetune_decay_every`` fine-tuning epochs (paper: 0.75 every 200).
    :param finetune_decay_every: Fine-tuning epochs between learning-rate decays.
    :param max_consecutive_skips: A training step whose loss or gradients are not
        finite is skipped (logged, and counted in ``metrics.jsonl``); after this many
        in a row training stops with the last good checkpoint intact.
    :param adam_eps: Adam's ε (PyTorch's default 1e-8; the authors' code: 1e-4).
    :param grad_clip: Clip the global 2-norm of the gradient to this value before the
        update (0 = off; the authors' code: 4).
    :param grad_clip_value: Then clip every gradient entry to ±this value (0 = off;
        the authors' code: 0.9).
    :param dequantize: For 8-bit grey levels with a Gaussian likelihood: train and
        evaluate on y = (k + u)/256, u ~ U[0, 1), redrawn every epoch (the test set once,
        seeded), and report the bounds on the discrete images, log-density − D log 256,
        with bits per dimension (:func:`~pyro_lvae.data.dequantize`). Without it a
        continuous density on the 256 discrete values is unbounded.
    :param free_bits: λ of free bits (Kingma et al. 2016), nats per example: during
        training each layer's KL term is replaced by max(λ, KL) over the minibatch
        (:mod:`pyro_lvae.inference.free_bits`); 0 = off. The reported ELBO and L_K stay the true bounds.
    :param free_bits_mode: ``"layer"`` (λ per layer) or ``"unit"`` (λ per unit of each layer).
    :param skip_threshold: Skip an update whose global gradient norm (before clipping) exceeds this:
        a number, ``"auto"`` (twice the 99th percentile of the last 500 norms, so that it follows a lasting
        rise; :class:`~pyro_lvae.training.skipping.SkipRule`) or 0 (off; non-finite steps are always skipped).
    :param ema: Decay of an exponential moving average of the weights (0 = off; e.g. 0.999). The
        average is checkpointed and is what the periodic and final evaluations, ``evaluate``, ``report``
        and ``export`` use (:mod:`pyro_lvae.training.ema`).
    :param precision: ``"fp32"`` (the default; every reproduction number is fp32) or ``"bf16"``: the
        fast engine runs the networks under bfloat16 autocast, while the log-densities, the KL, the
        merge and the loss stay in fp32 (the Gaussian heads and the likelihood return fp32). The
        evaluations always run in fp32. On a CPU without bfloat16 instructions (AVX512-BF16 or
        AMX) the step warns: its matrix products are emulated, 15–20× slower than fp32.
    :param compile: Compile the fast engine's closed-form loss with ``torch.compile``
        (:mod:`pyro_lvae.inference.compiled`): the same loss on the same draws, to rounding, with
        the elementwise work fused. The first step compiles (about a minute on two CPU cores,
        docs/performance.md); the fast engine only, fp32 or bf16, one process, no free bits, the
        LVAE family. Fine-tuning's loss is not compiled.
    :param valid_size: Hold out this many training images (chosen with a fixed seed, the same for every
        run on the same training set, taken after ``train_subset``) for the periodic evaluation, which
        is then labelled ``valid``; the test set is used once, at the end. 0 (the paper's protocol):
        train on the whole training set, evaluate on the test set.
    """

    dataset: str = "mnist"
    binarization: str = "dynamic"
    epochs: int = 2000
    batch_size: int = 256
    learning_rate: float = 1e-3
    warmup_epochs: int = 0
    eval_every: int = 10
    eval_particles: int = 1
    num_importance_samples: int = 5000
    train_subset: int = 0
    test_subset: int = 0
    seed: int = 0
    engine: str = "fast"
    finetune_epochs: int = 0
    finetune_mc_samples: int = 10
    finetune_iw_samples: int = 1
    finetune_lr_decay: float = 0.75
    finetune_decay_every: int = 200
    max_consecutive_skips: int = 20
    adam_eps: float = 1e-8
    grad_clip: float = 0.0
    grad_clip_value: float = 0.0
    dequantize: bool = False
    free_bits: float = 0.0
    free_bits_mode: str = "layer"
    skip_threshold: float | str = 0.0
    ema: float = 0.0
    valid_size: int = 0
    precision: str = "fp32"
    compile: bool = False

    def __post_init__(self) -> None:
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("engine", self.engine, ENGINES)
        _check_choice("binarization", self.binarization, BINARIZATIONS)
        _check_choice("precision", self.precision, PRECISIONS)
        if self.precision != "fp32" and self.engine != "fast":
            raise ValueError(
                f"precision={self.precision!r} runs on the fast engine; set engine='fast' or precision='fp32'."
            )
        for name in (
            "epochs",
            "batch_size",
            "eval_every",
            "eval_particles",
            "num_importance_samples",
            "finetune_mc_samples",
            "finetune_iw_samples",
            "finetune_decay_every",
            "max_consecutive_skips",
        ):
            value = getattr(self, name)
            if not is_count(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("warmup_epochs", "train_subset", "test_subset", "seed", "finetune_epochs", "valid_size"):
            value = getattr(self, name)
            if not is_count(value, least=0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}.")
        if _not_number(self.adam_eps) or not self.adam_eps > 0:
            raise ValueError(f"adam_eps must be a positive number, got {self.adam_eps!r}.")
        for name in ("grad_clip", "grad_clip_value"):
            value = getattr(self, name)
            if _not_number(value) or not value >= 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite non-negative number (0 switches it off), got {value!r}.")
        if not isinstance(self.finetune_lr_decay, (int, float)) or not 0 < self.finetune_lr_decay <= 1:
            raise ValueError(f"finetune_lr_decay must lie in (0, 1], got {self.finetune_lr_decay!r}.")
        if not isinstance(self.dequantize, bool):
            raise ValueError(f"dequantize must be True or False, got {self.dequantize!r}.")
        if self.dequantize and self.binarization != "none":
            raise ValueError(
                "dequantize applies to grey levels; set binarization='none' (with a Gaussian likelihood) "
                "or dequantize=False for binary data."
            )
        check_free_bits(self.free_bits, self.free_bits_mode)
        check_compile(self.compile, engine=self.engine, free_bits=self.free_bits)
        if self.engine == "cuda-graph" and self.free_bits > 0:
            raise ValueError("engine 'cuda-graph' does not support free bits; set engine='fast' or free_bits=0.")
        if self.engine == "cuda-graph" and self.finetune_epochs > 0:
            raise ValueError("engine 'cuda-graph' does not record fine-tuning; set engine='fast' or finetune_epochs=0.")
        check_skip_threshold(self.skip_threshold)
        check_ema_decay(self.ema)
        if self.valid_size and self.train_subset and self.valid_size >= self.train_subset:
            raise ValueError(
                f"valid_size={self.valid_size} leaves no training data of train_subset={self.train_subset}; "
                "lower valid_size or raise train_subset."
            )
        if self.dataset == "binarized_mnist" and self.binarization != "static":
            raise ValueError("binarized_mnist is already binary; set binarization='static' for it.")


def check_compile(compile: Any, *, engine: str, free_bits: float, data_parallel: bool = False) -> None:
    """Refuse a ``compile`` (:mod:`pyro_lvae.inference.compiled`) that training could not honour,
    in one sentence naming the clash; the training step also checks the model and the guide.

    :param compile: The option, ``True`` or ``False``.
    :param engine: The training engine.
    :param free_bits: λ of free bits (0 = off).
    :param data_parallel: Whether training runs in several processes.
    :raises ValueError: if ``compile`` is not a bool, or is ``True`` with another engine than
        ``"fast"``, free bits or several processes.
    """
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}.")
    if not compile:
        return
    if engine != "fast":
        raise ValueError(f"compile runs on the fast engine, not {engine!r}; set engine='fast' or compile=False.")
    for clash, what in (
        (free_bits > 0, "without free bits (their loss goes through Pyro's traces)"),
        (data_parallel, "in one process (not data-parallel)"),
    ):
        if clash:
            raise ValueError(f"compile runs {what}; set compile=False.")


@dataclass(frozen=True)
class ExperimentConfig:
    """A complete run: model, guide and training.

    :param model: The :class:`ModelConfig`.
    :param train: The :class:`TrainConfig`.
    :param name: A label for the run (presets use their own name).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "custom"

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelConfig) or not isinstance(self.train, TrainConfig):
            raise ValueError("ExperimentConfig needs a ModelConfig and a TrainConfig.")
        if self.model.likelihood == "bernoulli" and self.train.binarization == "none":
            raise ValueError(
                "A Bernoulli likelihood needs binary data; set binarization to 'dynamic' or "
                "'static', or use likelihood='gaussian' for grey levels."
            )
        if self.model.likelihood == "gaussian" and self.train.binarization != "none":
            raise ValueError("A Gaussian likelihood models grey levels; set binarization='none' for it.")
        if self.train.engine == "cuda-graph" and (self.model.family != "lvae" or self.model.bottom != "mlp"):
            raise ValueError(
                "engine 'cuda-graph' has run recorded for the LVAE family with MLP networks only; "
                "set engine='fast' for this model."
            )
        if self.train.compile and self.model.family != "lvae":
            raise ValueError(
                f"compile applies to the closed-form loss of the LVAE family, not {self.model.family!r}; "
                "set compile=False."
            )
        if self.train.finetune_epochs and self.model.family == "vqvae":
            raise ValueError(
                "Fine-tuning with the importance-weighted bound needs a stochastic guide; the "
                "VQ-VAE's is deterministic, so set finetune_epochs=0 for it."
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python representation, for JSON and checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ValueError`."""
        try:
            model = dict(data["model"])
            for key in ("latent_sizes", "hidden_sizes"):
                if key in model:
                    model[key] = tuple(model[key])
            return cls(
                model=ModelConfig(**model),
                train=TrainConfig(**data["train"]),
                name=data.get("name", "custom"),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"Invalid stored configuration ({exc}); it was not written by this version of pyro-lvae."
            ) from exc

    def replace(self, **overrides: Any) -> ExperimentConfig:
        """Return a copy with fields of ``model`` or ``train`` replaced by name.

        Field names are unique across the two sections, so ``replace(epochs=5,
        batch_norm=False)`` needs no prefixes. An unknown name raises
        :class:`ValueError`.
        """
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        model_updates, train_updates = {}, {}
        name = overrides.pop("name", self.name)
        for key, value in overrides.items():
            if key in model_fields:
                model_updates[key] = value
            elif key in train_fields:
                train_updates[key] = value
            else:
                known = ", ".join(sorted(model_fields | train_fields))
                raise ValueError(f"Unknown configuration key {key!r}; known keys are: {known}.")
        return ExperimentConfig(
            model=dataclasses.replace(self.model, **model_updates),
            train=dataclasses.replace(self.train, **train_updates),
            name=name,
        )


#: Names accepted for a field's value besides the stored ones: the docs call the VAE guide "bottom-up".
ALIASES = {"guide": {"bottom-up": "vae"}}

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


@functools.cache
def field_types() -> types.MappingProxyType[str, Any]:
    """Every field of :class:`ModelConfig` and :class:`TrainConfig` with its resolved annotation,
    by name (resolved once: the CLI asks for each field's type while it builds its options)."""
    resolved: dict[str, Any] = {}
    for cls in (ModelConfig, TrainConfig):
        hints = typing.get_type_hints(cls)
        resolved |= {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return types.MappingProxyType(resolved)  # read-only: the cache is shared


def field_type(name: str) -> Any:
    """The annotated type of the configuration field ``name``, resolved (``int``,
    ``tuple[int, ...]``, ``float | str``, …).

    :param name: A field of :class:`ModelConfig` or :class:`TrainConfig`.
    :raises ValueError: if no section has that field.

    >>> field_type("latent_sizes"), field_type("skip_threshold")
    (tuple[int, ...], float | str)
    """
    try:
        return field_types()[name]
    except KeyError:
        raise ValueError(f"Unknown configuration key {name!r}; `pyro-lvae train --help` lists them.") from None


def type_form(kind: Any) -> str:
    """How a value of type ``kind`` is written as text, in words (for errors and ``--help``).

    :param kind: A resolved annotation.

    >>> type_form(tuple[int, ...]), type_form(float | str), type_form(int | None)
    ('comma-separated integers', 'a number or text', 'an integer or none')
    """
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_form(arm) for arm in args)
    if origin is tuple:
        return "comma-separated " + {int: "integers", float: "numbers", str: "words"}.get(args[0], "values")
    words = {bool: "true or false", int: "an integer", float: "a number", str: "text", type(None): "none"}
    return words.get(kind, getattr(kind, "__name__", str(kind)))


def _parse_as(kind: Any, text: str) -> Any:
    """``text`` as a value of the resolved annotation ``kind``; ``ValueError`` if it is not one.
    A union tries its arms in order, text (``str``) last, so ``float | str`` reads ``2.5`` as a number."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        for arm in sorted(args, key=lambda a: a is str):
            try:
                return _parse_as(arm, text)
            except ValueError:
                continue
        raise ValueError(text)
    if origin is tuple:
        parts = [part.strip() for part in text.split(",")]
        arms = [args[0]] * len(parts) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(arms) != len(parts):
            raise ValueError(text)
        return tuple(_parse_as(arm, part) for arm, part in zip(arms, parts))
    if kind is bool:
        if text.lower() not in _TRUE + _FALSE:
            raise ValueError(text)
        return text.lower() in _TRUE
    if kind is type(None):
        if text.lower() != "none":
            raise ValueError(text)
        return None
    if kind in (int, float, str):
        return kind(text)
    raise ValueError(f"no text form for {kind!r}")


def parse_field(name: str, text: str) -> Any:
    """The value of configuration field ``name`` written as ``text``, as the CLI and the
    sweep's ``--set`` read it. It follows the field's annotation, whatever it is:
    ``true``/``false`` for booleans, ``64,32`` for a tuple, ``none`` for an optional field,
    one of the choices (or an alias) for a string field with choices.

    :param name: A field of :class:`ModelConfig` or :class:`TrainConfig`.
    :param text: Its value as text.
    :raises ValueError: with one line naming the expected form.

    >>> parse_field("latent_sizes", "64,32"), parse_field("batch_norm", "no"), parse_field("guide", "bottom-up")
    ((64, 32), False, 'vae')
    """
    kind = field_type(name)
    text = text.strip()
    try:
        value = _parse_as(kind, text)
    except ValueError:
        raise ValueError(f"{name} expects {type_form(kind)}, got {text!r}.") from None
    if not isinstance(value, str):
        return value
    value = ALIASES.get(name, {}).get(value, value)
    choices = CHOICES.get(name)
    if choices and value not in choices:
        words = choices + tuple(ALIASES.get(name, {}))
        other = [type_form(arm) for arm in typing.get_args(kind) if arm is not str]  # "a number" beside "auto"
        if other:
            raise ValueError(f"{name} expects {' or '.join(other + list(words))}, got {text!r}.")
        raise ValueError(f"{name}: choose one of {', '.join(words)}, got {text!r}.")
    return value
