"""Loss curves from ``losses.csv`` to PNG: matplotlib when installed, else a plain Pillow drawing."""

from __future__ import annotations

import csv
from pathlib import Path

SKIP = ("step", "lr", "elapsed_s", "grad_norm", "t_mean")
SIZE, MARGIN = (900, 300), 40
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


def read_curves(csv_path: Path) -> tuple[list[int], dict[str, list[float]]]:
    rows = list(csv.DictReader(Path(csv_path).open()))
    steps = [int(r["step"]) for r in rows]
    names = [k for k in (rows[0] if rows else {}) if k not in SKIP]
    return steps, {k: [float(r[k]) if r[k] not in ("", None) else float("nan") for r in rows] for k in names}


def plot_losses(csv_path: Path, png_path: Path) -> str | None:
    """Draw every logged curve (one panel per curve); returns a note if no PNG could be written."""
    if not Path(csv_path).is_file():
        return f"no {csv_path}; loss curve skipped"
    steps, curves = read_curves(csv_path)
    if len(steps) < 2:
        return "fewer than two logged steps; loss curve skipped"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(curves), 1, figsize=(8, 2.2 * len(curves)), sharex=True)
        for ax, (name, ys) in zip(axes if len(curves) > 1 else [axes], curves.items()):
            ax.plot(steps, ys)
            ax.set_ylabel(name)
        fig.savefig(png_path, dpi=80)
        plt.close(fig)
        return None
    except ImportError:
        return _pillow_plot(steps, curves, png_path)


def _pillow_plot(steps, curves, png_path: Path) -> str | None:
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return "neither matplotlib nor Pillow installed; loss curve PNG skipped (CSV written)"
    w, h = SIZE
    img = Image.new("RGB", (w, h * len(curves)), "white")
    draw = ImageDraw.Draw(img)
    for i, (name, ys) in enumerate(curves.items()):
        top = i * h
        finite = [y for y in ys if y == y]
        if not finite:
            continue
        lo, hi = min(finite), max(finite)
        span, x_span = (hi - lo) or 1.0, (steps[-1] - steps[0]) or 1
        pts = [(MARGIN + (s - steps[0]) / x_span * (w - 2 * MARGIN), top + h - MARGIN - (y - lo) / span * (h - 2 * MARGIN))
               for s, y in zip(steps, ys) if y == y]
        draw.rectangle([MARGIN, top + MARGIN, w - MARGIN, top + h - MARGIN], outline="#999999")
        draw.line(pts, fill=COLOURS[i % len(COLOURS)], width=2)
        draw.text((MARGIN, top + 8), f"{name}: {finite[0]:.4g} -> {finite[-1]:.4g} (min {lo:.4g}, max {hi:.4g}), "
                  f"steps {steps[0]}..{steps[-1]}", fill="black")
    img.save(png_path)
    return "matplotlib not installed; drew the loss curve with Pillow"
