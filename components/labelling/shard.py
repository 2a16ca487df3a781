"""FMbSeg Stage 1 over a shard of images: the pipeline the label stage, and bench/label.py, run.

- :func:`list_inputs`: every image under the input folders with its id and sha256 (from the hash
  cache where a file is unchanged), and the files that cannot be used with the reason.
- :func:`label_shard`: one shard, image by image through :func:`~components.labelling.stage1.label_image`
  (the per-image sequence), images decoded on threads ahead of the models (components/prefetch.py),
  automatic masks of an earlier run reused where the plan found them (:func:`kept_masks`),
  image-level labels read from a ground truth for the semi-supervised presence
  (:func:`ground_truth_classes`); the shard's files and completion record written at the end
  (components/labelling/store.py), and a small report with the seconds of each step.

The models come in built: loading and caching them per worker is the caller's (flows/label.py).
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from components.datasets.readers import (
    UnreadableImageError,
    read_image_rgb,
    read_label_png,
    scan_image_folder,
)
from components.hashcache import HashCache
from components.io import fs_path, path_text
from components.labelling.detect import image_level_labels
from components.labelling.plan import MaskSource
from components.labelling.settings import Stage1Settings
from components.labelling.stage1 import AmgMask, Stage1Result, label_image, timed
from components.labelling.store import (
    ImageEntry,
    ShardRecord,
    detection_rows,
    labels_row,
    shard_paths,
    teacher_columns,
    write_shard,
)
from components.models.masks import MaskModel
from components.models.registry import ClipBundle
from components.prefetch import prefetch

if TYPE_CHECKING:
    from components.labelling.concepts import ConceptTeacher

__all__ = [
    "GroundTruth",
    "list_inputs",
    "ground_truth_classes",
    "kept_masks",
    "label_shard",
]

def list_inputs(
    folders: Iterable[str], workers: int, external_symlinks: str = "refuse"
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Every image file under ``folders`` with its id and sha256 ({"image_id", "path", "sha256"}),
    and the files that cannot be used ({"path", "reason"}): unreadable, an id already taken, not
    an image, a dangling link or one out of the folder (``label.external_symlinks``). Digests come
    from the project's hash cache where a file's size and mtime are unchanged; ``workers`` threads
    hash the others."""
    files, not_images = [], []
    for folder in folders:
        found, rejected = scan_image_folder(folder, external_symlinks=external_symlinks)
        files.extend((folder, path) for path in found)
        not_images.extend({"path": path_text(p.as_posix()), "reason": path_text(why)} for p, why in rejected)

    with HashCache() as hashes:  # an unchanged file is not reread (.fmbseg/hashes.sqlite)

        def digest(path: Path) -> str | OSError:
            try:
                return hashes.sha256(path)
            except OSError as err:
                return err

        with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
            digests = list(pool.map(digest, [path for _, path in files]))
    entries: list[dict[str, str]] = []
    skipped: list[dict[str, str]] = not_images
    seen: dict[str, str] = {}
    for (folder, path), sha in zip(files, digests, strict=True):
        # ids and paths as valid text (a name need not be UTF-8); fs_path() gives the file back
        image_id = path_text(path.relative_to(folder).with_suffix("").as_posix())
        text = path_text(path.as_posix())
        if isinstance(sha, OSError):
            skipped.append({"path": text, "reason": f"cannot read the file: {path_text(str(sha))}"})
        elif image_id in seen:
            skipped.append({"path": text, "reason": f"duplicate image id {image_id!r} (also {seen[image_id]})"})
        else:
            seen[image_id] = text
            entries.append({"image_id": image_id, "path": text, "sha256": sha})
    return entries, skipped


class GroundTruth(NamedTuple):
    """Image-level labels for the semi-supervised presence: a canonical layout's folder (its
    labels/<split>/<id>.png) and index_map [C] int64, dataset class -> vocabulary index
    (:func:`~components.labelling.detect.class_index_map`)."""

    root: str
    index_map: Tensor


def ground_truth_classes(gt_root: str, image_id: str, index_map: Tensor) -> list[int] | None:
    """Image-level labels (vocabulary indices) of ``image_id`` from a canonical layout's
    labels/<split>/<id>.png, or None when it has no label file."""
    matches = sorted(glob.glob(f"{glob.escape(gt_root)}/labels/*/{glob.escape(image_id)}.png"))
    if not matches:
        return None
    return image_level_labels(torch.from_numpy(read_label_png(matches[0])), index_map)


def kept_masks(root: str | Path, sources: Mapping[str, MaskSource]) -> dict[str, list[AmgMask]]:
    """Automatic masks of earlier runs, by image id: each source's row of the shard file it names
    in the store at ``root`` (one read of the ``amg_masks`` column per shard)."""
    by_shard: dict[str, list[tuple[str, int]]] = {}
    for image_id, source in sources.items():
        by_shard.setdefault(source.shard_id, []).append((image_id, int(source.row)))
    kept: dict[str, list[AmgMask]] = {}
    for shard_id, wanted in by_shard.items():
        column = pq.read_table(shard_paths(root, shard_id)["labels"], columns=["amg_masks"]).column("amg_masks")
        for image_id, row in wanted:
            kept[image_id] = [AmgMask(**m) for m in column[row].as_py()]
    return kept


class _Loaded(NamedTuple):
    """A decoded [H, W, 3] uint8 RGB image (None and the reason when it cannot be used) and its
    image-level labels (semi-supervised presence)."""

    image: np.ndarray | None
    image_classes: list[int] | None
    reason: str | None


def _load(entry: ImageEntry, ground_truth: GroundTruth | None) -> _Loaded:
    """Decode one image and read its image-level labels (on a decoding thread)."""
    try:
        image = read_image_rgb(fs_path(entry.path))
    except UnreadableImageError as err:
        return _Loaded(None, None, err.reason)
    classes = None
    if ground_truth is not None:
        classes = ground_truth_classes(ground_truth.root, entry.image_id, ground_truth.index_map)
        if classes is None:
            return _Loaded(None, None, f"no ground-truth label for image-level presence in {ground_truth.root}")
    return _Loaded(image, classes, None)


def _teach(teacher: ConceptTeacher, loaded: _Loaded, result: Stage1Result, settings: Stage1Settings, row: dict[str, Any],
           timings: dict[str, float]) -> bool:
    """The concept teacher's map and presence scores of one image, added to its labels ``row``;
    False when no class passed presence (the image is unlabelled in stage1_sam3)."""
    with timed(timings, "teacher"):
        concepts = teacher.label(loaded.image, (settings.label_size, settings.label_size),
                                 detected=result.presence.classes, image_classes=loaded.image_classes)
    row.update(teacher_columns(concepts.label, concepts.presence))
    return bool(concepts.present.any())


def label_shard(
    root: str | Path,
    shard_id: str,
    images: Sequence[ImageEntry],
    *,
    clip: ClipBundle,
    sam: MaskModel,
    prototypes: Tensor,
    settings: Stage1Settings,
    vocabulary: list[str],
    settings_hash: str,
    mask_settings_hash: str,
    mask_sources: Mapping[str, MaskSource] | None = None,
    ground_truth: GroundTruth | None = None,
    teacher: ConceptTeacher | None = None,
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
    num_workers: int = 0,
    on_image: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Label one shard and write its files and completion record into the store at ``root``.

    images: the shard's members in order; prototypes: [K, D] text prototypes of ``vocabulary``
    (K lines); mask_sources: image id -> where its automatic masks of an earlier run are (the
    plan's, same mask settings); ground_truth: image-level labels for the presence (None: CLIP
    detects it); an image without one is skipped. teacher: the concept teacher, whose map
    (stage1_sam3) and presence scores join each row; with ``prompt: detected`` it prompts the
    classes Stage 1 found present (CLIP's, or the ground truth's), and the ground truth's classes
    replace its presence in the semi-supervised form. dtype: autocast of the model forwards;
    num_workers: decoding threads (0: decode in line). on_image(1): called as each image is
    labelled or skipped (progress).

    Returns {"shard_id", "labelled", "skipped", "reused_masks", "unlabelled", "timings"}
    (unlabelled: images on which no class passed the teacher's presence; 0 without one): timings are the seconds
    of each step summed over the shard (:data:`~components.labelling.stage1.STEP_KEYS`; "io" also
    counts the wait for decoding, the kept-mask read and the writing).
    """
    timings: dict[str, float] = {}
    with timed(timings, "io"):
        kept = kept_masks(root, mask_sources or {})
    labels: list[dict[str, Any]] = []
    detections: list[dict[str, Any]] = []
    rows: dict[str, int] = {}
    skipped: list[dict[str, str]] = []
    unlabelled: list[str] = []
    decoded = prefetch(lambda entry: _load(entry, ground_truth), images, num_workers=num_workers, depth=num_workers)
    for entry in images:
        with timed(timings, "io"):  # the wait for the decoding threads, not their (overlapped) work
            loaded = next(decoded)
        if loaded.image is None:
            skipped.append({"image_id": entry.image_id, "path": entry.path, "reason": str(loaded.reason)})
            if on_image is not None:
                on_image(1)
            continue
        # the per-image sequence runs on this thread, torch resizing included: on the decoding
        # threads it would compete with the model forwards for torch's intra-op threads
        result = label_image(
            loaded.image, clip_model=clip.model, clip_mean=clip.spec.mean, clip_std=clip.spec.std,
            clip_image_size=clip.spec.image_size, sam=sam, prototypes=prototypes, settings=settings,
            image_classes=loaded.image_classes, kept_masks=kept.get(entry.image_id), dtype=dtype,
            seconds=timings,
        )
        row = labels_row(entry, result, height=loaded.image.shape[0], width=loaded.image.shape[1],
                         sam_size=settings.sam_size)
        if teacher is not None and not _teach(teacher, loaded, result, settings, row, timings):
            unlabelled.append(entry.image_id)
        with timed(timings, "io"):
            rows[entry.image_id] = len(labels)
            labels.append(row)
            detections.extend(detection_rows(entry.image_id, result, vocabulary))
        if on_image is not None:
            on_image(1)
    record = ShardRecord(
        shard_id=shard_id,
        settings_hash=settings_hash,
        mask_settings_hash=mask_settings_hash,
        images=list(images),
        rows=rows,
        skipped=skipped,
        timings=timings,
        unlabelled=unlabelled,
    )
    with timed(timings, "io"):
        write_shard(root, record, labels, detections)
    return {"shard_id": shard_id, "labelled": len(labels), "skipped": len(skipped),
            "reused_masks": sum(1 for e in images if e.image_id in kept), "unlabelled": len(unlabelled),
            "timings": timings}

