"""Contact sheets: grids of images with captions, rendered to PNG bytes with matplotlib."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

#: Caption and row-label sizes in points: at 100 dpi a 9 pt caption is ~12 px high, readable
#: when a browser scales a 10-column sheet to the page width.
_CAPTION_PT = 9
_LABEL_PT = 10


def _text_inches(chars: int, points: float) -> float:
    """Width of ``chars`` characters of ``points``-point text, at ~0.6 em per character."""
    return 0.6 * points / 72 * chars


def render_sheet(
    images: Sequence[np.ndarray],
    captions: Sequence[str] | None = None,
    columns: int = 10,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
    cell_inches: float = 1.1,
    dpi: int = 100,
) -> bytes:
    """Render images in a grid and return PNG bytes.

    Args:
        images: uint8 arrays (H, W) or (H, W, C) in RGB(A) order; gray is drawn gray, never
            false-coloured. ``None`` entries leave an empty cell.
        captions: one caption per image, drawn under it.
        columns: cells per row.
        title: drawn above the grid.
        row_labels: one label per row, drawn at the left (e.g. the class of a per-class sheet).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if columns < 1:
        raise ValueError(f"columns must be >= 1. Received: columns={columns}")
    if captions is not None and len(captions) != len(images):
        raise ValueError(
            f"captions must match images. Received: {len(captions)} captions, "
            f"{len(images)} images"
        )
    n = max(len(images), 1)
    rows = math.ceil(n / columns)
    caption_lines = max((c.count("\n") + 1 for c in captions or [""]), default=1)
    # Room at the left for the longest row label; the saved figure is also cropped to what
    # was drawn, so no label is ever cut.
    label_inches = _text_inches(max((len(s) for s in row_labels or []), default=0), _LABEL_PT)
    # Cells as wide as the longest caption line, so neighbouring captions never overlap
    # (and as high: the images stay square).
    longest = max((len(line) for c in captions or [] for line in c.split("\n")), default=0)
    cell_w = max(cell_inches, _text_inches(longest, _CAPTION_PT) + 0.15)
    fig_w = columns * cell_w + (label_inches + 0.3 if row_labels else 0)
    fig_h = rows * (cell_w + 0.22 * caption_lines) + (0.5 if title else 0.1)  # square images
    fig, axes = plt.subplots(rows, columns, figsize=(fig_w, fig_h), squeeze=False)
    try:
        for idx, ax in enumerate(axes.flat):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if idx >= len(images) or images[idx] is None:
                continue
            img = np.asarray(images[idx])
            if img.ndim == 3 and img.shape[2] == 1:
                img = img[:, :, 0]
            if img.ndim == 2:
                ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
            if captions is not None:
                ax.set_xlabel(captions[idx], fontsize=_CAPTION_PT, labelpad=2)
        if row_labels:
            for r, label in enumerate(row_labels[:rows]):
                axes[r][0].set_ylabel(label, fontsize=_LABEL_PT, rotation=0, ha="right",
                                      va="center", labelpad=6)
        if title:
            fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)
        return buf.getvalue()
    finally:
        plt.close(fig)
