"""Loss logs of the training scripts: ``losses.csv`` written (:class:`LossLog`, resume-aware) and drawn
to PNG (:func:`plot_losses`: matplotlib when installed, else a plain Pillow drawing)."""

from __future__ import annotations

import csv
from pathlib import Path

SKIP = ("step", "lr", "elapsed_s", "grad_norm", "t_mean")
SIZE, MARGIN = (900, 300), 40
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


class LossLog:
    """``losses.csv`` (one row per logged step) on the main process; rows after ``resume_step`` (written
    by a run that was killed before its next checkpoint) are dropped on resume."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled, self.fields = path, enabled, None
        if not (enabled and path.is_file()):
            return
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            kept = [r for r in reader if int(r["step"]) <= resume_step]
            fields = reader.fieldnames
        path.unlink()
        if kept:
            self.fields = list(fields)
            self._write(kept, header=True)

    def _write(self, rows: list[dict], header: bool) -> None:
        with self.path.open("w" if header else "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.fields, extrasaction="ignore")
            if header:
                writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict) -> None:
        if not self.enabled:
            return
        header = self.fields is None
        if header:
            self.fields = list(row)
        self._write([row], header)


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
