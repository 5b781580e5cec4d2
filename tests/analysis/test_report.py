"""``pyro-lvae report`` on tiny runs writes every figure and a report table."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from pyro_lvae.analysis.plots import DPI
from pyro_lvae.cli import main
from pyro_lvae.inference.comparison import khat_threshold

# figsize of each figure, in inches (see pyro_lvae.analysis.plots)
EXPECTED = {
    "kl_units": (3 * 2, 3),
    "pca": (3 * 2, 3),
    "samples": (5, 5),
    "reconstructions": (8, 4),
}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def two_runs(tmp_path, shared_data_root):
    common = [
        "--epochs",
        "1",
        "--train-subset",
        "500",
        "--test-subset",
        "60",
        "--num-importance-samples",
        "5",
        "--latent-sizes",
        "8,4",
        "--hidden-sizes",
        "32,16",
        "--data-root",
        str(shared_data_root),
        "--no-progress",
    ]
    main(["train", "--preset", "lvae-bn-wu-2", *common, "--out", str(tmp_path / "lvae")])
    main(["train", "--preset", "vae-bn-wu-2", *common, "--out", str(tmp_path / "vae")])
    return tmp_path


def test_report_writes_every_figure(two_runs, shared_data_root, capsys):
    out = two_runs / "report"
    code = main(
        [
            "report",
            str(two_runs / "lvae"),
            str(two_runs / "vae"),
            "--out",
            str(out),
            "--num-samples",
            "30",
            "--data-root",
            str(shared_data_root),
            "--no-progress",
        ]
    )
    assert code == 0
    for run in ("lvae", "vae"):
        for kind, (w, h) in EXPECTED.items():
            path = out / f"{run}_{kind}.png"
            assert path.stat().st_size > 2000, path
            assert _png_size(path) == (w * DPI, h * DPI), path
        assert (out / f"{run}_importance.nc").stat().st_size > 0
    for name in ("layer_kl.png", "elbo_curves.png"):
        assert _png_size(out / name) == (6 * DPI, int(3.5 * DPI))
    report = (out / "report.md").read_text()
    assert "| lvae | ladder | 1 |" in report and "| vae | vae | 1 |" in report
    # The PSIS threshold depends on K: min(1 − 1/log10 30, 0.7) = 0.32.
    assert "share k̂ > 0.32 | share k̂ > 1 |" in report and "L_30" in report and "units with KL > 0.01" in report
    for png in out.glob("*.png"):
        assert f"({png.name})" in report
    assert "written:" in capsys.readouterr().out
    # The numbers of each row: ELBO ≤ L_K, L_K the mean of the stored per-example values, shares
    # in [0, 1], unit counts out of the layers' sizes (8 and 4), and positive KLs.
    import arviz as az

    for run in ("lvae", "vae"):
        cells = [
            c.strip() for c in next(line for line in report.splitlines() if line.startswith(f"| {run} |")).split("|")
        ]
        elbo, lk, share, share_inf, median = (float(c) for c in cells[4:9])
        observed = az.from_netcdf(str(out / f"{run}_importance.nc")).observed_data
        assert elbo <= lk and lk == pytest.approx(observed["log_likelihood"].values.mean(), abs=0.006)
        # The k̂ columns are the stored k̂'s shares above the K-dependent threshold and above 1.
        khat = observed["khat"].values
        assert share == pytest.approx((khat > khat_threshold(30)).mean(), abs=5e-4)
        assert share_inf == pytest.approx((khat > 1).mean(), abs=5e-4)
        assert median == pytest.approx(np.median(khat), abs=5e-3)
        for counts in (cells[9], cells[10]):
            pairs = [tuple(int(n) for n in c.split("/")) for c in counts.split(" / ")]
            assert [total for _, total in pairs] == [8, 4] and all(0 <= k <= total for k, total in pairs)
        assert all(float(kl) > 0 for kl in cells[11].split(" / "))
