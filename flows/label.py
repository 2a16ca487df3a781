"""`fmbseg label` and `fmbseg show`: FMbSeg Stage 1 as a Prefect flow (the DVC stage `label`).

The flow lists and hashes the images (``paths.images`` and, when present, ``paths.incoming``),
plans shards against the completion records already on disk (components/labelling/plan.py: only
new or changed images, or all of them after a settings change), maps ``label_shard`` over the
pending shards on the configured task runner, then merges the finished shards and writes the
summary. A shard's work is components/labelling/shard.py's ``label_shard``, on the models this
worker process built once (flows.common's caches): every image goes through the per-image
sequence as plain calls, not tasks, so a shard costs one task run whatever its size and tensors
never leave the worker; each step's seconds are summed into the shard's timings (the summary's
seconds per image). The shard task takes and returns plain records. ``label --images`` (one-off
work) runs the same flow as plain calls unless a Prefect server is configured (flows.runmode);
the DVC stage ``fmbseg label`` is always a flow run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from components.config import ConfigError, Params, check_vocabulary
from components.datasets.readers import list_images, read_image_rgb
from components.datasets.registry import class_list_path, read_class_file, read_class_list
from components.io import atomic_write_bytes, atomic_write_json, fs_path
from components.labelling.settings import TEACHER_VARIANT
from flows import runmode
from flows.common import (
    PARAMS_FILE,
    STAGE_DIR,
    cached_clip,
    cached_sam,
    cached_teacher,
    output_root,
    stage1_settings,
    stage_params,
    table_artifact,
    worker_cache,
)
from flows.deferred import NO_CACHE, flow, task
from flows.runners import make_task_runner
from flows.shards import map_shards

if TYPE_CHECKING:
    from components.labelling.concepts import ConceptSettings
    from components.labelling.plan import PlannedShard
    from components.labelling.settings import Stage1Settings

__all__ = [
    "STAGE_DIR",
    "output_root",
    "stage1_settings",
    "vocabulary_lines",
    "settings_hashes",
    "image_folders",
    "list_inputs",
    "LabelContext",
    "run_shard",
    "label_shard",
    "label_flow",
    "run_label",
    "show_image",
    "own_folder_settings",
    "register",
]


def vocabulary_lines(spec: str) -> list[str]:
    """``label.vocabulary``: a shipped class list's name or a class file's path -> its class lines
    (checked: UTF-8, not empty, no name twice, at most 65535 classes)."""
    try:
        lines = read_class_list(spec, source="label.vocabulary")
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    except ValueError as err:
        raise ConfigError(f"label.vocabulary: {err}") from None
    return check_vocabulary(lines, source=f"label.vocabulary {class_list_path(spec)}")


def settings_hashes(params: Params, vocabulary: list[str]) -> tuple[str, str]:
    """(settings hash, mask settings hash) of a run: what its labels and its SAM masks depend on.

    Both include ``models.dtype`` (bf16 and fp32 forwards give different masks); neither includes
    what cannot change a label: device, shard size, crop batch, worker counts, the task runner.
    """
    from components.labelling.plan import settings_hash

    settings = stage1_settings(params.label)
    masks = {"sam": params.models.selected.sam, "dtype": params.models.dtype, **settings.mask_side()}
    labels = {
        "clip": params.models.selected.clip,
        "vocabulary": vocabulary,
        "templates": list(params.label.templates),
        "presence": params.label.presence,
        "ground_truth_dir": params.label.ground_truth_dir,
        **settings.label_side(),
    }
    if params.models.teacher is not None:  # absent without a teacher: a paper run keeps its hash (and its shards)
        labels["teacher"] = {"spec": params.models.teacher, **params.label.concepts.model_dump()}
    return settings_hash({"masks": masks, "labels": labels}), settings_hash(masks)


def image_folders(params: Params) -> list[str]:
    """Folders Stage 1 labels: ``paths.images``, plus ``paths.incoming`` once the sync stage made it."""
    images = Path(params.paths.images)
    if not images.is_dir():
        raise FileNotFoundError(f"paths.images {images} is not a folder of images (run `fmbseg download` first?)")
    folders = [images.as_posix()]
    if Path(params.paths.incoming).is_dir():
        folders.append(Path(params.paths.incoming).as_posix())
    if not any(_holds_a_file(Path(f)) for f in folders):
        raise ConfigError(f"paths.images {images} holds no files (nor does paths.incoming): nothing to label")
    return folders


def _holds_a_file(folder: Path) -> bool:
    """Whether ``folder`` holds a file that is not hidden, at any depth (stops at the first)."""
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir(follow_symlinks=False) or _holds_a_file(Path(entry.path)):
            return True
    return False


@task(name="list-images", cache_policy=NO_CACHE)
def list_inputs(
    folders: list[str], workers: int, external_symlinks: str = "refuse"
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The images under ``folders`` with id and sha256, and the files that cannot be used
    (components.labelling.shard.list_inputs)."""
    from components.labelling import shard

    return shard.list_inputs(folders, workers, external_symlinks)


# ------------------------------------------------------------------------------ inside one shard
@worker_cache(maxsize=None)
def _cached_prototypes(clip: str, device: str, weights_dir: str | None, vocabulary: tuple[str, ...],
                       templates: tuple[str, ...], dtype: str) -> Any:
    """Text prototypes [K, D] of the vocabulary, computed once per worker process."""
    from components.models.clip_dense import prototypes
    from components.models.registry import autocast_context

    bundle = cached_clip(clip, device, weights_dir)
    with autocast_context(device, dtype):
        return prototypes(bundle.model, bundle.tokenizer, list(vocabulary), templates).float()


def check_teacher(params: Params) -> None:
    """``models.teacher``: a teacher spec of the registry whose weights are on disk (gated ones: a
    one-line MissingWeightsError naming the licence page, HF_TOKEN and the fetch command), checked
    before any model loads. Nothing to check without a teacher."""
    from components.models.registry import get_spec, list_specs, teacher_weights

    name = params.models.teacher
    if name is None:
        return
    try:
        spec = get_spec(name)
    except KeyError:
        spec = None
    if spec is None or spec.family != "teacher":
        raise ConfigError(f"models.teacher {name!r} is not a teacher spec; known: {', '.join(list_specs('teacher'))}")
    teacher_weights(name, params.models.weights_dir)


@dataclass(frozen=True)
class LabelContext:
    """What every shard task of a run shares: the store, the models, the vocabulary and the
    settings (typed, as params.yaml's validation built them), and the run's settings hashes.
    ``ground_truth_map``: the ground truth's class index -> the vocabulary's (presence from the
    ground truth; None: by CLIP); ``teacher`` / ``concepts``: the concept teacher (None: none)."""

    root: str
    clip: str
    sam: str
    device: str
    dtype: str
    weights_dir: str | None
    vocabulary: tuple[str, ...]
    templates: tuple[str, ...]
    settings: Stage1Settings
    settings_hash: str
    mask_settings_hash: str
    num_workers: int
    ground_truth_dir: str | None
    ground_truth_map: tuple[int, ...] | None
    teacher: str | None
    concepts: ConceptSettings


def run_shard(context: LabelContext, shard: PlannedShard, tally: str | None = None) -> dict[str, Any]:
    """Label one shard with the worker's cached models (components.labelling.shard.label_shard),
    ticking the tally file ``tally`` (components.progress.counter) per image; returns its report
    ({"shard_id", "labelled", "skipped", "reused_masks", "timings"})."""
    import torch

    from components.labelling import shard as shards
    from components.models.registry import resolve_device
    from components.progress import counter

    device = str(resolve_device(context.device))
    clip = cached_clip(context.clip, device, context.weights_dir)
    sam = cached_sam(context.sam, device, context.weights_dir)
    prototypes = _cached_prototypes(context.clip, device, context.weights_dir, context.vocabulary, context.templates,
                                    context.dtype)
    ground_truth = None
    if context.ground_truth_dir:
        ground_truth = shards.GroundTruth(context.ground_truth_dir, torch.tensor(context.ground_truth_map))
    teacher = None
    if context.teacher:
        from components.labelling.concepts import ConceptTeacher

        teacher = ConceptTeacher.for_vocabulary(cached_teacher(context.teacher, device, context.weights_dir),
                                                context.concepts, list(context.vocabulary))
    return shards.label_shard(
        context.root, shard.shard_id, list(shard.images),
        clip=clip, sam=sam, prototypes=prototypes,
        settings=context.settings,
        vocabulary=list(context.vocabulary),
        settings_hash=context.settings_hash,
        mask_settings_hash=context.mask_settings_hash,
        mask_sources=shard.mask_sources,
        ground_truth=ground_truth,
        teacher=teacher,
        dtype=context.dtype,
        num_workers=context.num_workers,
        on_image=counter(tally),
    )


@task(name="label-shard", cache_policy=NO_CACHE, task_run_name="label-shard-{shard.shard_id}")
def label_shard(context: LabelContext, shard: PlannedShard, tally: str | None = None) -> dict[str, Any]:
    """Stage 1 for one shard of images, written atomically with its completion record; each image
    done ticks the flow's progress tally (the file ``tally``, when given)."""
    return run_shard(context, shard, tally)


# ------------------------------------------------------------------------------------- the flow
def _summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"quantity": key, "value": summary[key]}
        for key in ("images_found", "images_labelled", "images_labelled_this_run", "images_skipped",
                    "shards", "shards_this_run", "shards_removed", "masks_reused_this_run", "wall_seconds",
                    "images_unlabelled_stage1_sam3")
        if key in summary
    ]
    rows += [{"quantity": f"seconds/image {k}", "value": round(v, 4)} for k, v in summary["seconds_per_image"].items()]
    rows += [{"quantity": f"detections {k}", "value": v} for k, v in summary["detections_per_class"].items()]
    return rows


@flow(name="label", flow_run_name="label", log_prints=True)
def label_flow(params_path: str = PARAMS_FILE) -> dict[str, Any]:
    """FMbSeg Stage 1 over the image folder: pseudo labels under ``${paths.pseudo}/stage1``."""
    from components.labelling.concepts import ConceptSettings
    from components.labelling.detect import class_index_map
    from components.labelling.plan import plan_shards
    from components.labelling.store import SUMMARY_FILE, ImageEntry, merge_outputs, read_records, summarise

    start = time.perf_counter()
    log = runmode.logger()
    params = stage_params(params_path)
    root = output_root(params)
    vocabulary = vocabulary_lines(params.label.vocabulary)
    full_hash, mask_hash = settings_hashes(params, vocabulary)
    gt_dir = params.label.ground_truth_dir if params.label.presence == "ground_truth" else None
    gt_map = tuple(class_index_map(read_class_file(Path(gt_dir) / "classes.txt"), vocabulary).tolist()) if gt_dir else None

    raw_entries, pre_skipped = runmode.call(list_inputs, image_folders(params), params.label.num_workers,
                                            params.label.external_symlinks)
    entries = [ImageEntry(**e) for e in raw_entries]
    plan = plan_shards(entries, read_records(root), settings_hash=full_hash, mask_settings_hash=mask_hash,
                       shard_size=params.label.shard_size)
    todo = sum(len(s.images) for s in plan.pending)
    log.info("%d images: %d already labelled in %d shards, %d to label in %d shards (settings %s)",
             len(entries), len(entries) - todo, len(plan.done), todo, len(plan.pending), full_hash)

    context = LabelContext(
        root=root.as_posix(),
        clip=params.models.selected.clip,
        sam=params.models.selected.sam,
        device=params.models.device,
        dtype=params.models.dtype,
        weights_dir=params.models.weights_dir,
        vocabulary=tuple(vocabulary),
        templates=params.label.templates,
        settings=stage1_settings(params.label),
        settings_hash=full_hash,
        mask_settings_hash=mask_hash,
        num_workers=params.label.num_workers,
        ground_truth_dir=gt_dir,
        ground_truth_map=gt_map,
        teacher=params.models.teacher,
        concepts=ConceptSettings(**params.label.concepts.model_dump()),
    )
    reports = map_shards(label_shard, context, plan.pending, name=lambda shard: shard.shard_id,
                         size=lambda shard: len(shard.images), out=root, orchestration=params.orchestration,
                         desc="label", key="label-progress")

    final = plan_shards(entries, read_records(root), settings_hash=full_hash, mask_settings_hash=mask_hash,
                        shard_size=params.label.shard_size)
    if final.pending:
        raise RuntimeError(f"{len(final.pending)} shards are still unfinished after the run: {final.pending[0].shard_id} ...")
    merged = merge_outputs(root, entries=entries, done=final.done, skipped=pre_skipped, vocabulary=vocabulary)
    summary = summarise(merged, images_found=len(entries) + len(pre_skipped), reports=reports,
                        settings_hash=full_hash, wall_seconds=time.perf_counter() - start)
    if params.models.teacher is not None:  # images on which no class passed the teacher's presence
        current = set(merged.index["image_id"])
        summary["images_unlabelled_stage1_sam3"] = len({i for r in final.done for i in r.unlabelled if i in current})
    atomic_write_json(root / SUMMARY_FILE, summary)
    rows = _summary_rows(summary)
    print("\n".join(f"{r['quantity']:>32}  {r['value']}" for r in rows))
    table_artifact(rows, key="label-summary", description="Stage 1 pseudo labels: counts and seconds per image")
    return summary


def run_label(params_path: str = PARAMS_FILE, *, one_off: bool = False) -> dict[str, Any]:
    """Run :func:`label_flow` on the task runner params.yaml's ``orchestration`` names, holding the
    lock on its output: a second run fails at once (OutputBusyError) instead of deleting the
    first one's shards in its merge, which removes every unclaimed shard and temporary file.
    ``one_off`` (``label --images``): on the ``threads`` runner, a flow run only with a Prefect
    server configured (flows.runmode), else the flow's function on ``max_workers`` threads; Dask
    and Ray are Prefect task runners, so with them it is always a flow run."""
    from components.io import output_lock

    params = stage_params(params_path)
    check_teacher(params)  # before the flow starts: a wrong name or absent gated weights is one line
    with output_lock(output_root(params), stage="label"):
        labelling = label_flow.with_options(task_runner=make_task_runner(params.orchestration))
        if one_off and params.orchestration.task_runner == "threads":
            return runmode.run(labelling, params_path)
        return labelling(params_path)


def show_image(image_id: str, params_path: str = PARAMS_FILE, out: str | None = None) -> Path:
    """Write a picture of one image's pseudo labels (image, Stage 1.1, Stage 1.2, legend); returns its
    path. ValueError for an image id that is not a relative path inside the image folder (it names
    the default picture's path)."""
    from components.labelling.show import render_pseudo_labels
    from components.labelling.store import PseudoLabels
    from components.outputs import safe_relative

    safe_relative(image_id, what="image id")
    params = stage_params(params_path)
    labels = PseudoLabels(output_root(params))
    row = labels.index.loc[labels.index["image_id"] == image_id]
    if row.empty:
        raise KeyError(f"no pseudo labels for image id {image_id!r}; e.g. {labels.image_ids[:3]}")
    picture = render_pseudo_labels(
        read_image_rgb(fs_path(row["image_path"].iloc[0])),
        labels.read(image_id, "stage1_1"),
        labels.read(image_id, "stage1_2"),
        labels.vocabulary,
        title=image_id,
    )
    path = Path(out) if out else Path(params.paths.reports) / "show" / f"{image_id}.png"
    atomic_write_bytes(path, picture)
    return path


OWN_FOLDER_PARAMS = "label_params.yaml"
PROFILES = ("demo", "paper")


def own_folder_settings(images: str, out: str, *, classes: str | None, vocabulary: str | None,
                        profile: str | None, params_path: str | None, variants: list[str] | None = None,
                        overwrite: bool = False, overlays: bool = False) -> Path:
    """Check every option of ``fmbseg label --images`` (and that ``out`` may take the run's files,
    those of the export of ``variants`` and, with ``overlays``, its overlays folder included:
    components.outputs), then write the run's settings file
    ``<out>/label_params.yaml``: the base settings (``--params``, ./params.yaml, or the project's own
    profile: ``paper`` = its params.yaml, ``demo`` = that with configs/demo.yaml on top) with the image
    folder, the class list (``<out>/classes.txt``) and the store (``<out>/stage1``) set, and
    presence by CLIP. Loads no model; nothing is written before every check passed. Raises
    FileNotFoundError / ValueError with a message for the user.
    """
    import yaml

    from components.config import deep_merge, parse_params
    from components.io import MAX_LABEL_CLASSES, atomic_write_text
    from components.labelling.export import CLASSES_FILE
    from components.labelling.show import OVERLAYS_FOLDER
    from components.outputs import check_apart, check_output_folder, claim_outputs
    from flows.common import PROJECT_ROOT, class_lines, profile_settings

    folder, dest = Path(images).resolve(), Path(out).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {images} is not a folder")
    if not list_images(folder):
        raise ValueError(f"--images {images} holds no image")
    check_apart(out, [images], what="--images")
    lines = check_vocabulary(class_lines(classes, vocabulary), source="--classes" if classes else f"--vocabulary {vocabulary}")
    if len(lines) > MAX_LABEL_CLASSES:
        raise ValueError(f"Stage 1 label maps are at most 16-bit (65535 = none): at most {MAX_LABEL_CLASSES} classes, got {len(lines)}")
    if profile is not None and params_path is not None:
        raise ValueError("give at most one of --profile and --params")
    if profile is not None and profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; supported: {', '.join(PROFILES)}")
    base = Path(params_path or PARAMS_FILE) if profile is None else PROJECT_ROOT / PARAMS_FILE
    if not base.is_file():
        raise FileNotFoundError(f"settings file {base} does not exist: pass --params FILE or --profile demo|paper")
    raw = deep_merge(profile_settings(profile, base), {
        # the label flow also labels paths.incoming when that folder exists: point it at one that never does
        "paths": {"images": folder.as_posix(), "pseudo": dest.as_posix(), "stage1": (dest / STAGE_DIR).as_posix(),
                  "incoming": (dest / STAGE_DIR / "no-incoming").as_posix()},
        "label": {"vocabulary": (dest / "classes.txt").as_posix(), "presence": "clip", "ground_truth_dir": None},
    })
    parsed = parse_params(raw, f"{base} with the --images options")
    variants = variants or []
    if TEACHER_VARIANT in variants and parsed.models.teacher is None:
        raise ValueError("--variant stage1_sam3 needs a concept teacher: models.teacher (e.g. sam3) in the --params file")
    check_teacher(parsed)  # a teacher spec, its (gated) weights on disk
    trees = [*variants, *([OVERLAYS_FOLDER] if overlays else [])]
    planned = [CLASSES_FILE, OWN_FOLDER_PARAMS, f"{STAGE_DIR}/", *(f"{v}.json" for v in variants),
               *(f"{tree}/" for tree in trees[len(variants):])]
    check_output_folder(dest, planned, overwrite=overwrite, trees=trees)
    claim_outputs(dest, planned)  # the first write
    atomic_write_text(dest / CLASSES_FILE, "".join(f"{line}\n" for line in lines))
    settings = dest / OWN_FOLDER_PARAMS
    atomic_write_text(settings, yaml.safe_dump(raw, sort_keys=False))
    return settings


def _run_label_cli(params_path: str, *, one_off: bool = False) -> None:
    """:func:`run_label` for the command line: an output another run holds is one message, exit 75."""
    from components.io import OutputBusyError
    from components.models.weights import MissingWeightsError

    try:
        check_teacher(stage_params(params_path))
    except (MissingWeightsError, ConfigError) as err:  # a wrong teacher name, or its gated weights absent
        typer.echo(f"fmbseg label: {err}", err=True)
        raise typer.Exit(2) from None
    try:
        run_label(params_path, one_off=one_off)
    except OutputBusyError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None


def register(app: typer.Typer) -> None:
    @app.command("label")
    def label_cmd(
        params: Path = typer.Option(None, show_default="params.yaml", help="settings file"),
        images: Path = typer.Option(None, "--images", help="label this folder (recursive) instead of paths.images"),
        classes: str = typer.Option(None, "--classes", help='with --images: class names, comma-separated: "sky,grass,car"'),
        vocabulary: str = typer.Option(None, "--vocabulary",
                                       help="with --images: a shipped class list (e.g. cocostuff171) or a class file, "
                                            "one class per line, comma-separated synonyms"),
        out: Path = typer.Option(None, "--out", help="with --images: output folder (Stage 1 store + export)"),
        variant: str = typer.Option(None, "--variant", help="with --images: the maps to export: stage1_1, stage1_2, "
                                                             "both (default), or stage1_sam3 (needs models.teacher)"),
        profile: str = typer.Option(None, "--profile", help="with --images: the project's settings of this profile "
                                                             "(demo | paper) instead of --params"),
        overwrite: bool = typer.Option(False, "--overwrite",
                                       help="with --images: write into a non-empty --out fmbseg did not create (its "
                                            "files are never replaced)"),
        overlays: bool = typer.Option(False, "--overlays", help="with --images: also write overlays/<id>.jpg, the "
                                                                 "image and each exported map with a legend"),
        overlay_size: str = typer.Option(None, "--overlay-size",
                                         help="with --overlays: full (the image's own size) or a panel height in "
                                              "pixels (default 320)"),
    ) -> None:
        """Stage 1: pseudo labels from CLIP + SAM for every new or changed image (resumable).

        With --images DIR --out DIR2: any folder, any class names; PNG + COCO export in DIR2.
        """
        own = {"--classes": classes, "--vocabulary": vocabulary, "--out": out, "--variant": variant,
               "--profile": profile, "--overwrite": overwrite or None, "--overlays": overlays or None,
               "--overlay-size": overlay_size}
        if images is None:
            given = [name for name, value in own.items() if value is not None]
            if given:
                typer.echo(f"fmbseg label: {', '.join(given)} go with --images DIR", err=True)
                raise typer.Exit(2)
            _run_label_cli(str(params or PARAMS_FILE))
            return
        import json

        from components.labelling.export import check_variants
        from components.overlay import PANEL_HEIGHT, overlay_height
        from flows.export import export_flow

        variant = variant or "both"
        try:
            if out is None:
                raise ValueError("--images needs --out DIR (where the labels go)")
            if overlay_size is not None and not overlays:
                raise ValueError("--overlay-size goes with --overlays")
            height = PANEL_HEIGHT if overlay_size is None else overlay_height(overlay_size)
            variants = check_variants([variant])
            settings = own_folder_settings(str(images), str(out), classes=classes, vocabulary=vocabulary,
                                           profile=profile, params_path=str(params) if params else None,
                                           variants=variants, overwrite=overwrite, overlays=overlays)
        except (FileNotFoundError, ValueError) as err:  # ConfigError is a ValueError
            typer.echo(f"fmbseg label: {err}", err=True)
            raise typer.Exit(2) from None
        _run_label_cli(settings.as_posix(), one_off=True)
        store = Path(stage_params(settings.as_posix()).paths.stage1).resolve()
        result = runmode.run(export_flow, store.as_posix(), str(out), variant, overwrite)
        if overlays:
            from components.labelling.show import OVERLAYS_FOLDER, write_store_overlays
            from components.labelling.store import PseudoLabels

            folder = Path(out) / OVERLAYS_FOLDER
            count = write_store_overlays(PseudoLabels(store), folder, variants, panel_height=height)
            result["overlays"] = {"images": count, "out": folder.as_posix()}
        typer.echo(json.dumps(result, indent=2))

    @app.command("show")
    def show_cmd(
        image_id: str = typer.Argument(..., help="image id (its path in the image folder, without extension)"),
        out: Path | None = typer.Option(None, show_default="<paths.reports>/show/<id>.png", help="picture to write"),
        params: Path = typer.Option(Path(PARAMS_FILE), help="settings file"),
    ) -> None:
        """Write a picture of one image's pseudo labels: the image, Stage 1.1, Stage 1.2, a legend."""
        try:
            path = show_image(image_id, str(params), str(out) if out else None)
        except (FileNotFoundError, KeyError, ValueError) as err:
            typer.echo(f"fmbseg show: {err.args[0] if isinstance(err, KeyError) else err}", err=True)
            raise typer.Exit(2) from None
        typer.echo(path)
