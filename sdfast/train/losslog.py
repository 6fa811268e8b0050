"""The loss log of a run: `loss.csv` (step, loss, lr; one line appended per optimizer step)
and `loss.png` (the curve, drawn with PIL: raw losses and a running mean)."""
from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CSV_NAME = "loss.csv"
PNG_NAME = "loss.png"
CSV_HEADER = "step,loss,lr\n"


def _row(step, loss, lr):
    return f"{step},{loss:.8g},{lr:.8g}\n"


def read_loss_csv(path):
    """`[(step, loss, lr), ...]` from a loss.csv."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines()[1:]:
        step, loss, lr = line.split(",")
        rows.append((int(step), float(loss), float(lr)))
    return rows


class LossLog:
    """Rows `(step, loss, lr)` kept in memory and mirrored to `folder/loss.csv`."""

    def __init__(self, folder, rows=(), write=True):
        self.folder = Path(folder)
        self.rows = [tuple(r) for r in rows]
        self.write = write
        if write:
            self._replace(self.folder / CSV_NAME,
                          lambda f: f.write(CSV_HEADER + "".join(_row(*r) for r in self.rows)))

    def append(self, step, loss, lr):
        """Record one optimizer step (and append it to loss.csv)."""
        self.rows.append((int(step), float(loss), float(lr)))
        if self.write:
            with open(self.folder / CSV_NAME, "a", encoding="utf-8") as handle:
                handle.write(_row(step, loss, lr))

    def draw(self):
        """Write `loss.png` (atomically) from the rows so far."""
        if self.write and self.rows:
            self._replace(self.folder / PNG_NAME, lambda f: plot_losses(self.rows).save(f, "PNG"))

    @staticmethod
    def _replace(path, write):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        mode = "wb" if path.suffix == ".png" else "w"
        try:
            with open(tmp, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as handle:
                write(handle)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def running_mean(values, window):
    """Mean of the last `window` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(rows, size=(720, 420)):
    """An RGB image of loss against step: raw (light) and a running mean (dark)."""
    width, height = size
    left, right, top, bottom = 70, 20, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    steps = [r[0] for r in rows]
    # Non-finite losses (a diverged step) are left out: they have no place on the axis.
    points = [(r[0], r[1]) for r in rows if math.isfinite(r[1])]
    losses = [v for _, v in points] or [0.0]
    lo, hi = min(losses), max(losses)
    hi = hi if hi - lo > 1e-6 * max(1.0, abs(lo)) else lo + 1e-6 * max(1.0, abs(lo))
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

    def xy(step, loss):
        x = left + (step - s0) / (s1 - s0) * (width - left - right)
        y = top + (hi - loss) / (hi - lo) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        value = lo + frac * (hi - lo)
        y = xy(s0, value)[1]
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{value:.4g}", fill="black", font=font)
    for step in (s0, (s0 + s1) // 2, s1):
        x = xy(step, lo)[0]
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 10, height - bottom + 8), str(step), fill="black", font=font)
    draw.text((left, 8), f"loss (steps {steps[0]}..{steps[-1]}; running mean dark)",
              fill="black", font=font)
    if len(points) > 1:
        draw.line([xy(s, v) for s, v in points], fill=(160, 190, 230), width=1)
        smooth = running_mean([v for _, v in points], max(1, len(points) // 20))
        draw.line([xy(s, v) for (s, _), v in zip(points, smooth) if math.isfinite(v)],
                  fill=(20, 60, 160), width=2)
    elif points:
        x, y = xy(*points[0])
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(20, 60, 160))
    if len(points) < len(rows):
        draw.text((left + 4, top + 4), f"{len(rows) - len(points)} non-finite loss(es) left out",
                  fill=(200, 0, 0), font=font)
    return image


__all__ = ["CSV_NAME", "PNG_NAME", "LossLog", "read_loss_csv", "plot_losses", "running_mean"]
