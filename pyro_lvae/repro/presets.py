"""Named configurations for every setting of the paper (§3, Fig. 3, Tables 1–2).

The four variants of the paper, each at depth 1–5 (shallower models drop the
top layers of 64-32-16-8-4):

============  =========  ===========  =================  ==============
preset        guide      batch norm   warm-up N_t        paper label
============  =========  ===========  =================  ==============
vae-L         bottom-up  no           none (β = 1)       VAE
vae-bn-L      bottom-up  yes          none               VAE+BN
vae-bn-wu-L   bottom-up  yes          200 epochs         VAE+BN+WU
lvae-bn-wu-L  ladder     yes          200 epochs         LVAE+BN+WU
============  =========  ===========  =================  ==============

On MNIST (``vae-L`` … ``lvae-bn-wu-L``) they use dynamic binarization, a Bernoulli
likelihood, leaky ReLU, Adam with learning rate 1e-3, batch size 256, 2000 epochs
and L_5000. The same twenty models exist for the paper's other datasets, with a
prefix:

==================  ==================================================================
prefix              setting
==================  ==================================================================
``omniglot-``       OMNIGLOT (``omniglot28``, binarized dynamically), 1500 epochs
``norb-gauss-``     NORB 32×32 grey levels, Gaussian likelihood, tanh, 2000 epochs
``fashion-gauss-``  the NORB setting on Fashion-MNIST grey levels: the stand-in for
                    NORB where the NORB files are not at hand
==================  ==================================================================

Table 1's fine-tuning (2000 more epochs, learning rate × 0.75 every 200, 10 Monte
Carlo samples) is ``lvae-bn-wu-5-ft``, and with 10 importance-weighted samples as
well ``lvae-bn-wu-5-ft-iw10``.

Each MNIST preset also exists with the settings of the authors' public code, which
differ from the paper's text (docs/reproduce.md tabulates them): ``lvae-bn-wu-5-authors``
and so on (:data:`AUTHORS_CODE`).

Two more presets hold two related model families:
``vlae-3`` (the Variational Ladder Autoencoder, three 2-unit layers, 200 epochs)
and ``vqvae`` (an MLP VQ-VAE with 16 code positions, K = 64 codes of dimension 16,
β = 0.25, 100 epochs).

>>> from pyro_lvae.repro.presets import get_preset
>>> cfg = get_preset("lvae-bn-wu-5")
>>> cfg.model.latent_sizes, cfg.model.guide, cfg.train.warmup_epochs
((64, 32, 16, 8, 4), 'ladder', 200)
>>> get_preset("omniglot-vae-bn-3").train.epochs
1500
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..config import PAPER_HIDDEN_SIZES, PAPER_LATENT_SIZES, ExperimentConfig, ModelConfig, TrainConfig

#: The paper's four variants (its labels in :data:`VARIANT_LABELS`): guide, batch norm, warm-up.
_VARIANTS = {
    "vae": dict(guide="vae", batch_norm=False, warmup_epochs=0),
    "vae-bn": dict(guide="vae", batch_norm=True, warmup_epochs=0),
    "vae-bn-wu": dict(guide="vae", batch_norm=True, warmup_epochs=200),
    "lvae-bn-wu": dict(guide="ladder", batch_norm=True, warmup_epochs=200),
}

#: The paper's datasets (§3): data, likelihood, nonlinearity and epochs. ``norb-gauss``
#: is the paper's NORB setting; ``fashion-gauss`` is the same setting on
#: Fashion-MNIST grey levels, the stand-in used where NORB cannot be obtained.
_SETTINGS = {
    "mnist": dict(
        dataset="mnist",
        input_dim=784,
        binarization="dynamic",
        likelihood="bernoulli",
        activation="leaky_relu",
        epochs=2000,
    ),
    "omniglot": dict(
        dataset="omniglot28",
        input_dim=784,
        binarization="dynamic",
        likelihood="bernoulli",
        activation="leaky_relu",
        epochs=1500,
    ),
    "norb-gauss": dict(
        dataset="norb", input_dim=1024, binarization="none", likelihood="gaussian", activation="tanh", epochs=2000
    ),
    # Fashion-MNIST's pixels are 8-bit levels: dequantized, so that the bound is finite and
    # reported in nats and bits per dimension on the discrete images. (The NORB loader
    # averages 3×3 blocks, which leaves the 256-level grid; its preset keeps the paper's
    # continuous density.)
    "fashion-gauss": dict(
        dataset="fashion_mnist",
        input_dim=784,
        binarization="none",
        likelihood="gaussian",
        activation="tanh",
        epochs=2000,
        dequantize=True,
    ),
}


#: The paper's label of each variant.
VARIANT_LABELS = {"vae": "VAE", "vae-bn": "VAE+BN", "vae-bn-wu": "VAE+BN+WU", "lvae-bn-wu": "LVAE+BN+WU"}

#: The name prefix of each setting's presets.
SETTING_PREFIXES = {
    "mnist": "",
    "omniglot": "omniglot-",
    "norb-gauss": "norb-gauss-",
    "fashion-gauss": "fashion-gauss-",
}


def at_depth(base: str, depth: int) -> str:
    """The name of preset family ``base`` at ``depth``: the rule by which the paper's presets
    are named, and by which a sweep's grid names them (``"omniglot-vae-bn"``, 3 →
    ``"omniglot-vae-bn-3"``).

    :param base: The setting's prefix and the variant, e.g. ``"lvae-bn-wu"``.
    :param depth: The number of latent layers.
    """
    return f"{base}-{depth}"


@dataclass(frozen=True)
class PresetInfo:
    """Where a paper preset sits in the paper's grid.

    :param setting: A key of :data:`SETTING_PREFIXES` (the dataset setting).
    :param variant: A key of :data:`VARIANT_LABELS`.
    :param depth: The number of latent layers.
    :param finetune: ``""``, ``"-ft"`` or ``"-ft-iw10"`` (Table 1's fine-tuning).
    :param authors: Whether it has the settings of the authors' code (:data:`AUTHORS_CODE`).
    """

    setting: str
    variant: str
    depth: int
    finetune: str = ""
    authors: bool = False

    @property
    def name(self) -> str:
        """The preset's name (:func:`at_depth`, then the fine-tuning and authors' suffixes)."""
        suffix = self.finetune + ("-authors" if self.authors else "")
        return at_depth(SETTING_PREFIXES[self.setting] + self.variant, self.depth) + suffix


def _paper_preset(setting: str, variant: str, depth: int) -> ExperimentConfig:
    v, d = _VARIANTS[variant], _SETTINGS[setting]
    return ExperimentConfig(
        model=ModelConfig(
            input_dim=d["input_dim"],
            latent_sizes=PAPER_LATENT_SIZES[:depth],
            hidden_sizes=PAPER_HIDDEN_SIZES[:depth],
            activation=d["activation"],
            batch_norm=v["batch_norm"],
            likelihood=d["likelihood"],
            guide=v["guide"],
        ),
        train=TrainConfig(
            dataset=d["dataset"],
            binarization=d["binarization"],
            epochs=d["epochs"],
            batch_size=256,
            learning_rate=1e-3,
            warmup_epochs=v["warmup_epochs"],
            num_importance_samples=5000,
            dequantize=d.get("dequantize", False),
        ),
        name=PresetInfo(setting, variant, depth).name,
    )


#: Each paper preset's place in the paper's grid, keyed by name: the registry that the
#: paper's numbers, the sweeps and the results page read.
PRESET_INFO: dict[str, PresetInfo] = {
    info.name: info
    for info in (
        PresetInfo(setting, variant, depth)
        for setting in _SETTINGS
        for variant in _VARIANTS
        for depth in range(1, len(PAPER_LATENT_SIZES) + 1)
    )
}

#: Every named preset, keyed by name (e.g. ``"lvae-bn-wu-5"``).
PRESETS: dict[str, ExperimentConfig] = {
    name: _paper_preset(info.setting, info.variant, info.depth) for name, info in PRESET_INFO.items()
}

# Table 1: the 5-layer LVAE fine-tuned for 2000 more epochs with 10 Monte Carlo samples
# ("+ finetuning") and with 10 importance-weighted samples as well ("+ finetuning + IW=10").
for _suffix, _iw in (("-ft", 1), ("-ft-iw10", 10)):
    _info = PresetInfo("mnist", "lvae-bn-wu", 5, finetune=_suffix)
    PRESET_INFO[_info.name] = _info
    PRESETS[_info.name] = PRESETS["lvae-bn-wu-5"].replace(
        name=_info.name, finetune_epochs=2000, finetune_mc_samples=10, finetune_iw_samples=_iw
    )


#: The paper's minibatch. This library's loss is the negative ELBO *summed* over the
#: minibatch; the authors' Theano cost is, as usual in their Parmesan code, its *mean*.
#: Their gradient thresholds and Adam's ε are therefore multiplied by the batch size here,
#: which gives the same clipping and the same Adam steps.
_AUTHORS_BATCH = 256

#: Where the authors' public run commands (casperkaae/LVAE) differ from the paper's text.
#: The two ladder settings matter only for the ladder guide.
AUTHORS_CODE = dict(
    learning_rate=2e-4,  # README commands; the paper says 1e-3
    adam_eps=1e-4 * _AUTHORS_BATCH,  # their ε = 1e-4 on the mean loss
    grad_clip=4.0 * _AUTHORS_BATCH,  # total norm 4 of the mean loss's gradient, then ...
    grad_clip_value=0.9 * _AUTHORS_BATCH,  # ... each entry to ±0.9
    leaky_slope=0.01,  # Lasagne's leaky rectifier; the paper says 0.1
    variance_floor=1e-5,  # lv_eps_z, added to every latent variance
)
_AUTHORS_LADDER = dict(ladder_share_params=False, only_mu_up=True)

for _variant in _VARIANTS:
    for _depth in range(1, len(PAPER_LATENT_SIZES) + 1):
        _base = PRESETS[PresetInfo("mnist", _variant, _depth).name]
        _extra = _AUTHORS_LADDER if _base.model.guide == "ladder" else {}
        _info = PresetInfo("mnist", _variant, _depth, authors=True)
        PRESET_INFO[_info.name] = _info
        PRESETS[_info.name] = _base.replace(name=_info.name, **AUTHORS_CODE, **_extra)


#: Two related model families, the VLAE and the VQ-VAE (see :mod:`pyro_lvae.models.families`).
PRESETS["vlae-3"] = ExperimentConfig(
    # Zhao et al.'s MNIST setting: three layers of two units each, so that each
    # layer's code can be shown as a 2-D grid with the others fixed.
    model=ModelConfig(
        family="vlae",
        guide="vae",
        latent_sizes=(2, 2, 2),
        hidden_sizes=(512, 512, 512),
        activation="leaky_relu",
        batch_norm=True,
        likelihood="bernoulli",
    ),
    train=TrainConfig(
        dataset="mnist", binarization="dynamic", epochs=200, warmup_epochs=0, num_importance_samples=5000
    ),
    name="vlae-3",
)
PRESETS["vqvae"] = ExperimentConfig(
    # An MLP VQ-VAE for 28×28 images: 16 positions of 16-dimensional codes, K = 64,
    # β = 0.25 (paper). The Delta guide makes L_K equal to the ELBO for every K.
    model=ModelConfig(
        family="vqvae",
        guide="vae",
        latent_sizes=(16,),
        hidden_sizes=(512,),
        activation="leaky_relu",
        batch_norm=False,
        likelihood="bernoulli",
        codebook_size=64,
        code_dim=16,
        commitment_cost=0.25,
    ),
    train=TrainConfig(dataset="mnist", binarization="dynamic", epochs=100, warmup_epochs=0, num_importance_samples=1),
    name="vqvae",
)


def get_preset(name: str) -> ExperimentConfig:
    """Return the preset called ``name``.

    :param name: A key of :data:`PRESETS`, e.g. ``"vae-bn-wu-3"``.
    :raises ValueError: if no preset has that name.
    """
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), PRESETS, n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ValueError(
            f"Unknown preset {name!r}; {hint}`pyro-lvae presets` lists all {len(PRESETS)} of them."
        ) from None
