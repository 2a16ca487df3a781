"""A picture of one image's pseudo labels: the image, Stage 1.1 and Stage 1.2, with a legend."""

from __future__ import annotations

import io

import numpy as np

from components.io import class_colours

__all__ = ["colourise", "render_pseudo_labels"]


def colourise(label: np.ndarray, palette: np.ndarray, ignore: int = 255) -> np.ndarray:
    """[H, W] uint8 label map -> [H, W, 3] uint8 RGB; ``ignore`` pixels mid-grey."""
    lut = np.full((256, 3), 128, dtype=np.uint8)
    lut[: len(palette)] = palette[:256]
    lut[ignore] = 128
    return lut[label]


def render_pseudo_labels(
    image_rgb: np.ndarray, stage1_1: np.ndarray, stage1_2: np.ndarray, class_names: list[str], *, title: str
) -> bytes:
    """PNG bytes: three panels (image, Stage 1.1, Stage 1.2) and a legend of the classes shown.

    image_rgb: [H, W, 3] uint8; stage1_1, stage1_2: [L, L] uint8, 255 = unlabelled (grey).
    Label maps are drawn over the image's extent, so they line up with it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    palette = class_colours(256)[: len(class_names)]
    shown = sorted((set(np.unique(stage1_1).tolist()) | set(np.unique(stage1_2).tolist())) - {255})
    unknown = [k for k in shown if k >= len(class_names)]
    if unknown:
        raise ValueError(f"label values {unknown} are beyond the {len(class_names)} vocabulary classes")
    height, width = image_rgb.shape[:2]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), dpi=100)
    panels = [("image", image_rgb), ("Stage 1.1", colourise(stage1_1, palette)), ("Stage 1.2", colourise(stage1_2, palette))]
    for ax, (name, picture) in zip(axes, panels, strict=True):
        ax.imshow(picture, extent=(0, width, height, 0), interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    handles = [Patch(color=palette[k] / 255.0, label=class_names[k].split(",")[0]) for k in shown]
    handles.append(Patch(color=(0.5, 0.5, 0.5), label="unlabelled"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=9, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
