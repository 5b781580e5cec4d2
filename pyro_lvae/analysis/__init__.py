"""Looking inside a trained hierarchy: the paper's §3.2 studies (:mod:`.latents`), the
figures (:mod:`.plots`, which needs the ``analysis`` extra) and run reports (:mod:`.report`).

The studies of :mod:`pyro_lvae.analysis.latents` are importable from here, as before the
package had subpackages (``from pyro_lvae.analysis import kl_per_unit``).
"""

from .latents import (
    ACTIVE_THRESHOLD,
    KHAT_THRESHOLD,
    active_units,
    importance_inference_data,
    kl_per_layer,
    kl_per_unit,
    latent_codes,
    psis_khat,
    training_curves,
)

__all__ = [
    "ACTIVE_THRESHOLD",
    "KHAT_THRESHOLD",
    "active_units",
    "importance_inference_data",
    "kl_per_layer",
    "kl_per_unit",
    "latent_codes",
    "psis_khat",
    "training_curves",
]
