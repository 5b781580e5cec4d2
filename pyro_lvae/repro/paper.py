"""The numbers the LVAE paper reports, keyed by this package's preset names.

Test-set log-likelihoods in nats per example: L_5000 (paper eq. 6 with 5000
importance samples) unless stated. Only numbers printed in the paper's text and
tables are here; Fig. 3's curves are not tabulated in the paper, so of its MNIST
values only those quoted in §3.1 are available.

>>> PAPER_L5000["lvae-bn-wu-5"], PAPER_L5000["omniglot-vae-bn-wu-2"]
(-82.12, -102.61)
"""

from __future__ import annotations

from ..config import PAPER_LATENT_SIZES
from .presets import VARIANT_LABELS, PresetInfo

#: Table 2's columns, in order, as preset variants.
_VARIANTS = tuple(VARIANT_LABELS)

# Table 2, OMNIGLOT and NORB rows: one tuple per depth 1-5, one value per variant
# (None where the paper has "-": the 1-layer LVAE).
_OMNIGLOT = (
    (-111.21, -105.62, -104.51, None),
    (-110.58, -105.51, -102.61, -102.63),
    (-111.26, -106.09, -102.52, -102.18),
    (-111.58, -105.66, -102.66, -102.21),
    (-110.46, -105.45, -102.48, -102.11),
)
_NORB = (
    (2741, 3198, 3338, None),
    (2792, 3224, 3483, 3272),
    (2786, 3235, 3492, 3519),
    (2689, 3201, 3482, 3449),
    (2654, 3198, 3422, 3455),
)


def _table(setting: str, rows: tuple) -> dict[str, float]:
    return {
        PresetInfo(setting, variant, depth).name: value
        for depth, row in zip(range(1, len(PAPER_LATENT_SIZES) + 1), rows)
        for variant, value in zip(_VARIANTS, row)
        if value is not None
    }


#: L_5000 by preset: MNIST (§3.1 and Table 1) and Table 2 (OMNIGLOT, NORB).
PAPER_L5000: dict[str, float] = {
    "lvae-bn-wu-5": -82.12,
    "lvae-bn-wu-5-ft": -81.84,
    "lvae-bn-wu-5-ft-iw10": -81.74,
    **_table("omniglot", _OMNIGLOT),
    **_table("norb-gauss", _NORB),
}

#: Test ELBO (L1) quoted in §3.1: the 5-layer LVAE and the best VAE (3 layers; the text
#: does not say which VAE variant, Fig. 3 shows it is VAE+BN+WU).
PAPER_L1: dict[str, float] = {"lvae-bn-wu-5": -85.23, "vae-bn-wu-3": -87.49}

#: §3.1: "the best VAE at −82.74" (L_5000, MNIST); the text does not name its depth.
PAPER_BEST_VAE_L5000 = -82.74
