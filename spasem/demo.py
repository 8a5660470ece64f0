"""The offline demo (``spasem demo``): a CT-like support and an MR-like query of two different
phantom subjects, segmented organ by organ with the default (``classical``) configuration.

Writes into the output folder (every file atomically):

* ``support_ct.nii.gz`` / ``support_ct_label.nii.gz`` and ``query_mr.nii.gz`` /
  ``query_mr_label.nii.gz``: the phantoms (so ``spasem run`` can be tried on them);
* ``prediction.nii.gz``: the predicted organs on the query's grid, with the phantom label ids;
* ``priors/<organ>_{p_reg,p_sim,entropy}.nii.gz``: the priors on the query's grid;
* ``demo_<organ>.png``: support + mask and query with P_reg, P_sim, entropy, prediction and truth
  on the three orthogonal planes through the organ (radiological convention, labelled).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from spasem.core.volume import Grid, Volume
from spasem.errors import InputError

#: the stages reported by the demo, in pipeline order
STAGES = ("resample", "register", "warp", "spatial_prior", "encode", "query_regions", "realign", "semantic_prior",
          "fuse", "decode", "paste")


@dataclass
class OrganResult:
    """Dice and timings of one organ."""

    organ: str
    dice: float
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    figure: Path | None = None


@dataclass
class DemoResult:
    out_dir: Path
    organs: list[OrganResult]
    files: list[Path]
    seconds: float


def parse_organs(organs: str | Sequence[str] | None) -> list[str]:
    """'liver,spleen' (or a list; None = all) -> validated organ names of the phantoms."""
    from spasem.data.phantoms import LABELS

    if organs is None:
        return list(LABELS)
    items = organs.split(",") if isinstance(organs, str) else list(organs)
    names = [o.strip().lower() for o in items if o.strip()]
    unknown = [o for o in names if o not in LABELS]
    if unknown or not names:
        raise InputError(f"--organs '{organs}': unknown organ(s) {', '.join(unknown) or '(none given)'}; "
                         f"expected a comma-separated list of {', '.join(LABELS)}")
    return names


def run_demo(
    out_dir: str | os.PathLike,
    organs: Sequence[str] | None = None,
    support_subject: int = 0,
    query_subject: int = 1,
    support_modality: str = "ct",
    query_modality: str = "mr",
    seed: int = 0,
    config=None,
    progress=None,
) -> DemoResult:
    """Generate the phantoms, segment each organ, write volumes, priors and figures."""
    from spasem.core.io import save_all
    from spasem.core.metrics import dice
    from spasem.core.pipeline import Engine, Support
    from spasem.core.config import build_config
    from spasem.core.progress import Progress
    from spasem.data.phantoms import LABELS, generate_case

    if support_subject == query_subject:
        raise InputError(f"support and query subjects must differ (both {support_subject}): the demo is inter-subject")
    names = parse_organs(organs)
    progress = progress or Progress(enabled=False)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}': exists and is not a folder")
    (out / "priors").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with progress.stage(f"generating phantoms ({support_modality.upper()} subject {support_subject}, "
                        f"{query_modality.upper()} subject {query_subject})"):
        support, support_label = generate_case(support_subject, support_modality, seed)
        query, query_label = generate_case(query_subject, query_modality, seed)
    files = {
        out / f"support_{support_modality}.nii.gz": support,
        out / f"support_{support_modality}_label.nii.gz": support_label,
        out / f"query_{query_modality}.nii.gz": query,
        out / f"query_{query_modality}_label.nii.gz": query_label,
    }
    engine = Engine(build_config(config or {}), progress=progress)
    prediction = np.zeros(query.shape, np.uint8)
    results: list[OrganResult] = []
    for organ in names:
        label = LABELS[organ]
        engine.config = build_config(config or {}, {"label": label})
        with progress.stage(f"segmenting {organ}"):
            t = time.perf_counter()
            result = engine.run([Support(support, support_label)], query)
            seconds = time.perf_counter() - t
        prediction[(result.mask.array > 0) & (prediction == 0)] = label
        score = dice(result.mask.array, query_label.array == label)
        on_query = result.maps_on_query_grid(["p_reg", "p_sim", "entropy"])
        for name, volume in on_query.items():
            files[out / "priors" / f"{organ}_{name}.nii.gz"] = volume
        figure = out / f"demo_{organ}.png"
        support_mask = support_label.with_array((support_label.array == label).astype(np.uint8))
        truth = query_label.with_array((query_label.array == label).astype(np.uint8))
        organ_figure(figure, organ, support, support_mask, query, truth, result, score)
        results.append(OrganResult(organ, score, seconds, dict(result.timings), figure))
    files[out / "prediction.nii.gz"] = Volume(prediction, query.grid, is_label=True, name="prediction", modality=query.modality)
    written = save_all(files)
    return DemoResult(out, results, written + [r.figure for r in results if r.figure], time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------
# figure
# ------------------------------------------------------------------------------------------
def _display_window(image: np.ndarray, modality: str | None) -> tuple[float, float]:
    if modality == "CT":
        return -160.0, 240.0
    body = image[image > np.percentile(image, 30)]
    body = body if body.size else image.ravel()
    return float(np.percentile(body, 1)), float(np.percentile(body, 99.5))


#: per plane of a canonical RAS array: how to cut it, how to orient it for display
#: (radiological: patient right on the image's left), and the letters at left/right/top/bottom
_PLANES = {
    "axial": (2, lambda a: a[::-1, ::-1].T, ("R", "L", "A", "P")),
    "coronal": (1, lambda a: a[::-1, ::-1].T, ("R", "L", "S", "I")),
    "sagittal": (0, lambda a: a[::-1, ::-1].T, ("A", "P", "S", "I")),
}


def _plane(array: np.ndarray, axis: int, index: int, box: tuple[slice, slice, slice]) -> np.ndarray:
    cut = [box[0], box[1], box[2]]
    cut[axis] = index
    return array[tuple(cut)]


def _crop_box(mask: np.ndarray, grid: Grid, margin_mm: float = 35.0) -> tuple[slice, slice, slice]:
    nz = np.argwhere(mask)
    if nz.size == 0:
        return (slice(None),) * 3  # type: ignore[return-value]
    margin = np.ceil(margin_mm / grid.spacing).astype(int)
    lo = np.maximum(nz.min(axis=0) - margin, 0)
    hi = np.minimum(nz.max(axis=0) + margin + 1, np.asarray(grid.shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def organ_figure(path: Path, organ: str, support: Volume, support_mask: Volume, query: Volume, truth: Volume,
                 result, score: float) -> Path:
    """One PNG: rows = axial, coronal, sagittal planes through the organ's centre; columns =
    support + mask, query + P_reg, query + P_sim, entropy, query + prediction and truth."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from spasem.core.resample import resample

    sgrid = support.grid.canonical(1.5)
    s_img = resample(support, sgrid, fill="min").array
    s_mask = resample(support_mask, sgrid).array > 0
    wgrid = result.work_grid
    q_img = resample(query, wgrid, fill="min").array
    q_truth = resample(truth, wgrid).array > 0
    q_pred = resample(result.mask, wgrid).array > 0
    maps = {name: result.maps[name].array for name in ("p_reg", "p_sim", "entropy")}
    s_box = _crop_box(s_mask, sgrid)
    q_box = _crop_box(q_truth | q_pred | (maps["p_reg"] > 0.5), wgrid)
    s_centre = np.round(np.argwhere(s_mask).mean(axis=0)).astype(int) if s_mask.any() else np.asarray(sgrid.shape) // 2
    q_ref = q_truth if q_truth.any() else q_pred
    q_centre = np.round(np.argwhere(q_ref).mean(axis=0)).astype(int) if q_ref.any() else np.asarray(wgrid.shape) // 2
    s_win = _display_window(s_img, support.modality)
    q_win = _display_window(q_img, query.modality)

    columns = [f"support ({support.modality}) + mask", f"query ({query.modality}) + P_reg", "query + P_sim",
               "entropy H", f"prediction vs truth (Dice {score:.3f})"]
    fig, axes = plt.subplots(3, 5, figsize=(17, 10.5), squeeze=False)
    for row, (plane, (axis, orient, letters)) in enumerate(_PLANES.items()):
        s_sl = lambda a: orient(_plane(a, axis, int(s_centre[axis]), s_box))  # noqa: E731
        q_sl = lambda a: orient(_plane(a, axis, int(q_centre[axis]), q_box))  # noqa: E731
        panels = axes[row]
        panels[0].imshow(s_sl(s_img), cmap="gray", vmin=s_win[0], vmax=s_win[1])
        if s_sl(s_mask).any():
            panels[0].contour(s_sl(s_mask), levels=[0.5], colors="yellow", linewidths=1.0)
        for col, name, cmap in ((1, "p_reg", "magma"), (2, "p_sim", "viridis")):
            panels[col].imshow(q_sl(q_img), cmap="gray", vmin=q_win[0], vmax=q_win[1])
            overlay = panels[col].imshow(q_sl(maps[name]), cmap=cmap, vmin=0, vmax=1, alpha=0.55)
            fig.colorbar(overlay, ax=panels[col], fraction=0.046, pad=0.02)
        ent = panels[3].imshow(q_sl(maps["entropy"]), cmap="cividis", vmin=0, vmax=1)
        fig.colorbar(ent, ax=panels[3], fraction=0.046, pad=0.02)
        panels[4].imshow(q_sl(q_img), cmap="gray", vmin=q_win[0], vmax=q_win[1])
        for mask, colour in ((q_truth, "lime"), (q_pred, "red")):
            if q_sl(mask).any():
                panels[4].contour(q_sl(mask), levels=[0.5], colors=colour, linewidths=1.0)
        for col in (1, 2, 3):
            if q_sl(q_truth).any():
                panels[col].contour(q_sl(q_truth), levels=[0.5], colors="lime", linewidths=0.7)
        for col, ax in enumerate(panels):
            ax.set_xticks([])
            ax.set_yticks([])
            left, right, top, bottom = letters
            for text, xy, ha, va in ((left, (0.01, 0.5), "left", "center"), (right, (0.99, 0.5), "right", "center"),
                                     (top, (0.5, 0.99), "center", "top"), (bottom, (0.5, 0.01), "center", "bottom")):
                ax.text(*xy, text, transform=ax.transAxes, ha=ha, va=va, color="white", fontsize=9, fontweight="bold")
            if row == 0:
                ax.set_title(columns[col], fontsize=10)
        panels[0].set_ylabel(plane, fontsize=11)
    legend = [Line2D([0], [0], color="yellow", lw=1.5, label="support mask"),
              Line2D([0], [0], color="lime", lw=1.5, label="query truth"),
              Line2D([0], [0], color="red", lw=1.5, label="prediction")]
    fig.legend(handles=legend, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"spasem demo: {organ}, one-shot {support.modality} -> {query.modality}, "
                 f"planes through the organ's centre (radiological view, 1.5 mm)", fontsize=12)
    fig.tight_layout(rect=(0, 0.03, 1, 0.96))
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
