"""Matplotlib figures of the analysis toolkit (paper Figs. 2, 4, 5, 6, 9).

Each function returns a :class:`matplotlib.figure.Figure` and, given ``path``, saves
it as a PNG of exactly ``figsize × dpi`` pixels (no tight bounding box, so sizes are
predictable). The functions only draw: the numbers come from
:mod:`pyro_lvae.analysis.latents`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import torch
import xarray as xr
from matplotlib.figure import Figure

from ..inference.evaluation import eval_mode

DPI = 100


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return fig


def kl_heatmap(curves: xr.Dataset, *, title: str = "", path: str | os.PathLike | None = None) -> Figure:
    """log KL per unit over training epochs, one panel per layer (Fig. 4).

    Units are sorted by their final KL; white is an inactive unit.

    :param curves: From :func:`~pyro_lvae.analysis.latents.training_curves`; needs ``test_kl_z{i}``
        (or ``valid_kl_z{i}`` for a run with a validation split).
    :param title: The figure's title.
    :param path: Also save the figure there.
    """
    prefix = "test_kl_z" if any(v.startswith("test_kl_z") for v in curves.data_vars) else "valid_kl_z"
    layers = sorted((v for v in curves.data_vars if v.startswith(prefix)), key=lambda v: int(v[len(prefix) :]))
    if not layers:
        raise ValueError("The run has no per-unit KL in its metrics; train it with this version of pyro-lvae.")
    fig, axes = plt.subplots(1, len(layers), figsize=(3 * len(layers), 3), squeeze=False)
    for ax, name in zip(axes[0], layers):
        arr = curves[name].dropna("epoch", how="all")
        values = np.log10(np.clip(arr.values, 1e-4, None))
        order = np.argsort(-values[-1])
        im = ax.imshow(
            values[:, order].T,
            aspect="auto",
            cmap="Greys",
            vmin=-4,
            vmax=1,
            origin="lower",
            extent=(arr.epoch.values[0] - 0.5, arr.epoch.values[-1] + 0.5, -0.5, values.shape[1] - 0.5),
        )
        ax.set(title=name[len(prefix) - 1 :], xlabel="epoch", ylabel="unit (sorted)")
    fig.subplots_adjust(left=0.08, right=0.85, bottom=0.18, top=0.82, wspace=0.4)
    fig.colorbar(im, cax=fig.add_axes((0.88, 0.18, 0.02, 0.64)), label="log10 KL (nats)")
    fig.suptitle(title or "KL per unit")
    return _finish(fig, path)


def layer_kl_bars(kl_by_run: Mapping[str, np.ndarray], *, path: str | os.PathLike | None = None) -> Figure:
    """Layer-wise KL of several runs side by side (Fig. 5).

    :param kl_by_run: KL per layer (z1 first) for each run, keyed by the run's label.
    :param path: Save the figure here as a PNG, if given.
    """
    fig, ax = plt.subplots(figsize=(6, 3.5))
    depth = max(len(v) for v in kl_by_run.values())
    width = 0.8 / max(1, len(kl_by_run))
    for j, (name, kl) in enumerate(kl_by_run.items()):
        ax.bar(np.arange(len(kl)) + j * width, kl, width=width, label=name)
    ax.set_xticks(np.arange(depth) + 0.4 - width / 2, [f"z{i + 1}" for i in range(depth)])
    ax.set(ylabel="KL[q_i | p_i] (nats)", title="Layer-wise KL")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _finish(fig, path)


def pca_scatter(codes: xr.Dataset, *, title: str = "", path: str | os.PathLike | None = None) -> Figure:
    """First two principal components of each layer's posterior samples, coloured by class (Fig. 6).

    :param codes: From :func:`~pyro_lvae.analysis.latents.latent_codes` (with labels, for the colours).
    :param title: Figure title.
    :param path: Save the figure here as a PNG, if given.
    """
    layers = sorted((v[7:] for v in codes.data_vars if v.startswith("sample_")), key=lambda n: int(n[1:]))
    fig, axes = plt.subplots(1, len(layers), figsize=(3 * len(layers), 3), squeeze=False)
    labels = codes["label"].values if "label" in codes.coords else np.zeros(codes.sizes["example"])
    for ax, name in zip(axes[0], layers):
        z = codes[f"sample_{name}"].values.astype(np.float64)
        z = z - z.mean(0)
        _, _, vt = np.linalg.svd(z, full_matrices=False)
        pc = z @ vt[:2].T
        if pc.shape[1] == 1:
            pc = np.concatenate([pc, np.zeros_like(pc)], 1)
        ax.scatter(pc[:, 0], pc[:, 1], c=labels, cmap="tab10", s=3)
        ax.set(title=name, xticks=[], yticks=[])
    fig.subplots_adjust(left=0.03, right=0.97, bottom=0.05, top=0.8, wspace=0.1)
    fig.suptitle(title or "PCA of q(z_i | ·) samples")
    return _finish(fig, path)


def _image_grid(images: torch.Tensor, rows: int, cols: int, ax) -> None:
    side = int(round(images.shape[-1] ** 0.5))
    imgs = images[: rows * cols].reshape(-1, side, side).cpu().numpy()
    grid = np.ones((rows * (side + 1), cols * (side + 1)))
    for k, img in enumerate(imgs):
        r, c = divmod(k, cols)
        grid[r * (side + 1) : r * (side + 1) + side, c * (side + 1) : c * (side + 1) + side] = img
    ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1)
    ax.axis("off")


def samples_grid(model, *, num: int = 100, title: str = "", path: str | os.PathLike | None = None) -> Figure:
    """A grid of means of p(x | z1) for z drawn from the prior (Fig. 9c).

    :param model: The generative model (put in evaluation mode while sampling).
    :param num: Number of samples.
    :param title: Figure title.
    :param path: Save the figure here as a PNG, if given.
    """
    with eval_mode(model):
        images = model.sample(num)
    cols = int(np.ceil(np.sqrt(num)))
    fig, ax = plt.subplots(figsize=(5, 5))
    _image_grid(images, int(np.ceil(num / cols)), cols, ax)
    ax.set_title(title or "Samples from the prior")
    return _finish(fig, path)


def reconstructions(model, guide, x: torch.Tensor, *, title: str = "", path: str | os.PathLike | None = None) -> Figure:
    """Data (top rows) beside its reconstructions (bottom rows) (Fig. 9a–b).

    :param model: The generative model.
    :param guide: Its guide.
    :param x: Examples to reconstruct, shape ``(N, 784)``.
    :param title: Figure title.
    :param path: Save the figure here as a PNG, if given.
    """
    with eval_mode(model, guide):
        recon = model.reconstruct(x, guide)
    fig, axes = plt.subplots(2, 1, figsize=(8, 4))
    cols = min(len(x), 20)
    rows = max(1, len(x) // cols)
    _image_grid(x, rows, cols, axes[0])
    _image_grid(recon, rows, cols, axes[1])
    axes[0].set_title("data")
    axes[1].set_title("reconstruction")
    fig.suptitle(title)
    return _finish(fig, path)


def elbo_curves(curves_by_run: Mapping[str, xr.Dataset], *, path: str | os.PathLike | None = None) -> Figure:
    """Train (solid), validation (dotted) and test (dashed) ELBO over epochs for several runs (Fig. 2).

    :param curves_by_run: :func:`~pyro_lvae.analysis.latents.training_curves` of each run, keyed by label.
    :param path: Save the figure here as a PNG, if given.
    """
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for j, (name, curves) in enumerate(curves_by_run.items()):
        color = f"C{j}"
        for key, style in (("train_elbo", "-"), ("valid_elbo", ":"), ("test_elbo", "--")):
            series = curves[key].dropna("epoch")
            if series.size:
                ax.plot(series.epoch, series, style, color=color, marker="o", ms=3, label=f"{name} {key[:-5]}")
    ax.set(xlabel="epoch", ylabel="ELBO L1 (nats)", title="Train and test ELBO")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _finish(fig, path)


def vlae_traversals(
    model: torch.nn.Module,
    *,
    steps: int = 7,
    span: float = 2.0,
    image_shape: tuple[int, int] = (28, 28),
    seed: int = 0,
    path: str | os.PathLike | None = None,
) -> Figure:
    """One panel per VLAE layer: a grid over that layer's code, the other layers fixed.

    The other layers keep one draw from the prior (the same for every panel, set by
    ``seed``), so each panel shows what its layer alone changes in x: in Zhao et
    al.'s MNIST figure, stroke width for z1, width and tilt for z2, digit identity for z3.

    :param model: A trained :class:`~pyro_lvae.models.vlae.VLAEModel`.
    :param steps: Grid points per axis (each layer's first two units).
    :param span: The grid covers ``[-span, span]`` in prior standard deviations.
    :param image_shape: Height and width of one image.
    :param seed: Seed of the other layers' draw from the prior.
    :param path: Also save the figure there.
    """
    depth = model.config.depth
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    fixed = [torch.randn(s, generator=gen).to(param) for s in model.config.latent_sizes]
    fig, axes = plt.subplots(1, depth, figsize=(3.2 * depth, 3.5), squeeze=False)
    with eval_mode(model):
        for layer, ax in zip(range(1, depth + 1), axes[0]):
            grid = model.traverse(layer, steps=steps, span=span, fixed=fixed).cpu()
            rows, cols = grid.shape[:2]
            h, w = image_shape
            mosaic = grid.reshape(rows, cols, h, w).permute(0, 2, 1, 3).reshape(rows * h, cols * w)
            ax.imshow(mosaic.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set(title=f"vary z{layer}, others fixed", xticks=[], yticks=[])
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.88, wspace=0.08)
    return _finish(fig, path)
