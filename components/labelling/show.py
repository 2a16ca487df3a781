"""Pictures of pseudo labels: one image's (the image, Stage 1.1 and Stage 1.2, with a legend) for
`fmbseg show`, and a whole store's overlays for `fmbseg label --images --overlays`."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np

from components.datasets.readers import read_image_rgb
from components.datasets.registry import display_name
from components.io import atomic_write_bytes, class_colours, decode_label_png, fs_path
from components.labelling.export import resize_nearest, store_vocabulary
from components.labelling.formats.target import fresh_folder
from components.labelling.store import PseudoLabels
from components.overlay import PANEL_HEIGHT, jpeg_bytes, overlay_picture

__all__ = ["OVERLAYS_FOLDER", "colourise", "render_pseudo_labels", "write_store_overlays"]

OVERLAYS_FOLDER = "overlays"  # `label --images --overlays`: OUT/<this>/<image id>.jpg


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


def write_store_overlays(labels: PseudoLabels, out_dir: str | os.PathLike[str], variants: Sequence[str], *,
                         panel_height: int | None = PANEL_HEIGHT) -> int:
    """Write ``out_dir/<image id>.jpg`` for every image of the store: the image | each variant's map
    at the image's size, in the class colours, with a legend (components.overlay;
    panel_height None: full resolution). The folder is written whole and swapped in, as an
    export's variant folder is. Returns the number of pictures."""
    names = [display_name(line) for line in store_vocabulary(labels)]
    count = 0
    with fresh_folder(out_dir) as partial:
        for shard in labels.iter_shards(columns=["image_id", "image_path", *variants]):
            for row in shard.itertuples(index=False):
                image = read_image_rgb(fs_path(row.image_path))
                maps = {variant: resize_nearest(decode_label_png(getattr(row, variant)), *image.shape[:2])
                        for variant in variants}
                picture = overlay_picture(image, None, maps, names, panel_height=panel_height)
                atomic_write_bytes(partial / f"{row.image_id}.jpg", jpeg_bytes(picture))
                count += 1
    return count
