r"""How one training step is taken: the textbook ``SVI`` loop or the fast path.

Both engines minimize the same Pyro ELBO (:func:`~pyro_lvae.objectives.elbo_for`)
of the same model and guide with Adam, and take the same update on the same
random draws (``tests/test_engine.py`` checks loss, gradients and parameters in
float64).

``"svi"`` is the loop of Pyro's tutorials::

    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss=elbo)
    loss = svi.step(x, beta)

``pyro.optim.Adam`` keeps one ``torch.optim.Adam`` per parameter tensor (118 of
them for the paper's 5-layer ladder model), ``svi.step`` traces the parameters
it touched and converts the loss to a Python float, a host synchronization on a GPU.

``"fast"`` (the default) is the same objective written as Pyro's
"custom objectives" pattern::

    loss = elbo.differentiable_loss(model, guide, x, beta)
    loss.backward(); optimizer.step(); optimizer.zero_grad()

with these changes, each measured in ``docs/performance.md``:

* one ``torch.optim.Adam`` over every parameter, with the fused kernel where
  PyTorch has one for the device and dtype;
* Pyro's argument validation is switched off inside the step, because the data
  were checked once before training (:func:`~pyro_lvae.data.check_data`) and the
  distributions' parameters are positive by construction (softplus variances);
* the parameters are registered in Pyro's param store once, when the step is
  built, instead of by ``pyro.module`` on every call of the model and the guide
  (``register_params`` is switched off inside the step and restored after it;
  ``SVI`` needs the per-call registration to find the parameters, this engine
  optimizes the modules' parameters directly);
* the model's top-down priors are shared with the ladder guide
  (:meth:`~pyro_lvae.model.GenerativeModel.shared_priors`);
* the loss stays a tensor: no ``.item()`` per step, the caller sums it on the device.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pyro
import torch
from pyro.infer import SVI
from pyro.optim import Adam as PyroAdam
from torch import nn

from .config import ENGINES
from .model import GenerativeModel
from .objectives import elbo_for


def trainable_parameters(model: GenerativeModel, guide: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` and ``guide``, each once (the ladder guide holds the model).

    :param model: The generative model.
    :param guide: A guide for it.
    """
    seen: dict[int, nn.Parameter] = {}
    for p in list(model.parameters()) + list(guide.parameters()):
        seen.setdefault(id(p), p)
    return list(seen.values())


@contextlib.contextmanager
def registered_once(*modules: nn.Module) -> Iterator[None]:
    """Switch off the per-call ``pyro.module`` registration of ``modules`` (objects
    with a ``register_params`` attribute) and restore each one's setting on exit.

    :param modules: Models and guides; objects without ``register_params`` are ignored.
    """
    saved = [(m, m.register_params) for m in modules if hasattr(m, "register_params")]
    for m, _ in saved:
        m.register_params = False
    try:
        yield
    finally:
        for m, value in saved:
            m.register_params = value


def _fused_available(params: list[nn.Parameter]) -> bool:
    # torch ships fused Adam kernels for CPU and CUDA floating-point tensors.
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


class TrainingStep:
    """One optimization step on a minibatch, with either engine.

    :param model: The generative model.
    :param guide: A guide for it.
    :param learning_rate: Adam's learning rate.
    :param engine: ``"fast"`` or ``"svi"`` (see the module docstring).

    Call it as ``step(x, beta)``; it returns the minibatch loss (the negative
    β-weighted ELBO summed over the batch) as a 0-dim tensor on the
    parameters' device.

    >>> import torch
    >>> from pyro_lvae import GenerativeModel, LadderGuide, ModelConfig
    >>> model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    >>> step = TrainingStep(model, LadderGuide(model), learning_rate=1e-3)
    >>> step(torch.ones(3, 4), torch.tensor(1.0)).shape
    torch.Size([])
    """

    def __init__(
        self,
        model: GenerativeModel,
        guide: nn.Module,
        *,
        learning_rate: float,
        engine: str = "fast",
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"Unknown engine {engine!r}; choose one of {', '.join(ENGINES)}.")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate!r}.")
        self.model = model
        self.guide = guide
        self.engine = engine
        self.elbo = elbo_for(guide)
        if engine == "svi":
            self.optimizer: Any = PyroAdam({"lr": learning_rate})
            self.svi = SVI(model, guide, self.optimizer, loss=self.elbo)
        else:
            # Register every parameter in Pyro's param store once, under the names the
            # per-call registration of model and guide uses.
            model.register()
            if hasattr(guide, "register"):
                guide.register()
            params = trainable_parameters(model, guide)
            self.optimizer = torch.optim.Adam(params, lr=learning_rate, fused=_fused_available(params) or None)

    def __call__(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Take one step on ``x`` with warm-up weight ``beta`` (a 0-dim tensor)."""
        if self.engine == "svi":
            return torch.tensor(self.svi.step(x, beta), dtype=x.dtype, device=x.device)
        loss = self.loss(x, beta)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def loss(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """The differentiable loss the fast engine minimizes, without a step.

        It is ``elbo.differentiable_loss(model, guide, x, beta)`` with validation off,
        the parameters registered once and the top-down priors shared; its value and gradients equal the reference
        ELBO's on the same random draws.

        :param x: A minibatch, shape ``(batch, input_dim)``.
        :param beta: The warm-up weight, a 0-dim tensor.
        """
        with pyro.validation_enabled(False), self.model.shared_priors(), registered_once(self.model, self.guide):
            return self.elbo.differentiable_loss(self.model, self.guide, x, beta)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state, for checkpoints."""
        if self.engine == "svi":
            return {"engine": "svi", "optimizer": self.optimizer.get_state()}
        return {"engine": "fast", "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the engines' states are not interchangeable.

        :param state: A dict from :meth:`state_dict`.
        :raises ValueError: if it was written by the other engine.
        """
        if state.get("engine") != self.engine:
            raise ValueError(
                f"The checkpoint's optimizer state is for engine {state.get('engine')!r}, not "
                f"{self.engine!r}; resume with the engine the run was started with."
            )
        if self.engine == "svi":
            self.optimizer.set_state(state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
