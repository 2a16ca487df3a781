"""The world-clip stand-in: a tiny open_clip ``CLIP`` trained on scenes of the demo world.

Training (:func:`train_clip`) draws seeded world scenes (demoworld/world.py), cuts crops
of them -- the 2×2 tiling of Stage 1.1 at grid 2 (the whole 96×128 scene resized to a 2S square, an
aspect distortion) and random boxes of several scales and aspects, each resized to S -- and optimises two terms with one learnable ``logit_scale`` (open_clip's):

- contrastive: InfoNCE between the crops' embeddings (``encode_image``) and one caption for each
  concept the step's crops show, topped up with captions of random other concepts as negatives
  ("a photo of a {}." or one of OpenAI's 80 ImageNet templates, around a random synonym of a random
  class line of the concept, over every shipped class list); a crop's positive is the caption of
  its dominant concept, both directions (a caption averages over its positive crops).
- dense: the patch features of the ``fmbseg`` mode (``clip_dense.dense_features``: the last block
  without its MLP, the features Stage 1 prompts SAM with and labels masks by) classify the concept
  at each patch centre against the same captions (cross-entropy of logit_scale · cosine).

The dense term is the honest difference from the real CLIP: its patch-level localisation emerges
from web-scale training, which a model this small trained for a couple of minutes does not get,
so the property the pipeline relies on is trained directly.

The text side is trained on every synonym of every line of every class list, so a class line of
any list embeds next to its concept (world.concept_key). The "background" lines of VOC and
COCO-object are not a visual concept (background regions of the twins are stuff concepts) and are
never trained. The token embedding has no weight decay, so the rows no name uses keep their seeded
init exactly and the trained file stores only the few hundred rows that moved (store.save_trained).

:func:`evaluate_clip` measures what Stage 1 needs on held-out scenes (a seed stream training never
draws from), per benchmark class list: crop top-1 accuracy at the 2×2 tiling, fmbseg patch top-1
accuracy, and how many of the top-5 prompt patches of each present class land on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from components.datasets.registry import class_file_path, read_class_file
from components.labelling.detect import prompt_patches
from components.models.clip_dense import dense_features, prototypes, tiled_features
from components.models.preprocess import resize_normalize
from components.models.registry import OPENAI_MEAN, OPENAI_STD, init_model
from demoworld import world

__all__ = ["NAME", "TEXT_LISTS", "EVAL_LISTS", "DEFAULT_STEPS", "train_clip", "evaluate_clip"]

log = logging.getLogger(__name__)

NAME = "world-clip"
# Every shipped class list: each synonym of each line is a caption of its concept.
TEXT_LISTS: tuple[str, ...] = (
    "cocostuff171",
    "coco_object",
    "cocostuff_stuff",
    "voc21",
    "voc20",
    "coco80",
    "context59",
    "cityscapes19",
    "ade150",
)
EVAL_LISTS: tuple[str, ...] = ("voc20", "context59", "cocostuff171", "cityscapes19", "ade150")
BACKGROUND = "background"  # a VOC / COCO-object line that no region of the world looks like
TEMPLATE = "a photo of a {}."
GRID = 2  # the tiling whose crops every scene contributes (label.grid 2; the demo labels at grid 4,
# whose smaller crops the random boxes cover)
DEFAULT_STEPS = 3000


@dataclass(frozen=True)
class TrainSettings:
    """How :func:`train_clip` trains.

    scenes / crops_per_scene: a step's batch is scenes × crops (4 tiling crops, the rest random
    boxes). negatives: captions per step (the concepts shown, topped up with random others).
    scale_lr_factor: the logit scale's learning rate over ``lr``. min_dominant: a crop enters the
    contrastive term when its dominant concept covers at least this share of it. p_plain: chance a
    caption uses ``TEMPLATE`` (else one of the 80 ImageNet templates).
    """

    steps: int = DEFAULT_STEPS
    scenes: int = 8
    crops_per_scene: int = 5
    lr: float = 3e-3
    scale_lr_factor: float = 1.0
    clip_grad: float = 1.0
    negatives: int = 64
    weight_decay: float = 0.05
    warmup: int = 40
    dense_weight: float = 1.0
    min_dominant: float = 0.5
    p_plain: float = 0.7


# ------------------------------------------------------------------------------------ captions
@dataclass(frozen=True)
class Captions:
    """Tokenised captions of the world's concepts.

    tokens: [N, T, L] int64, name n under template t (template 0 = ``TEMPLATE``, then the 80).
    names_of: per concept (index into ``concepts``), the indices of its names in ``tokens``.
    """

    concepts: tuple[str, ...]
    tokens: torch.Tensor
    names_of: tuple[np.ndarray, ...]


def _synonyms(line: str) -> list[str]:
    return [s.strip() for s in line.split(",") if s.strip()]


def build_captions(tokenizer: Callable[[list[str]], torch.Tensor]) -> Captions:
    """Every synonym of every line of :data:`TEXT_LISTS`, grouped by the line's concept
    (world.concept_key). The concepts are those some line means, in world.concepts() order,
    "background" aside."""
    names: list[str] = []
    groups: dict[str, set[int]] = {}
    for list_name in TEXT_LISTS:
        for line in read_class_file(class_file_path(list_name)):
            key = world.concept_key(line)
            if key == BACKGROUND:
                continue
            for synonym in _synonyms(line):
                if synonym not in names:
                    names.append(synonym)
                groups.setdefault(key, set()).add(names.index(synonym))
    keys = tuple(k for k in world.concepts() if k in groups)
    templates = [TEMPLATE, *(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)]
    texts = [t.format(n) for n in names for t in templates]
    tokens = tokenizer(texts).reshape(len(names), len(templates), -1)
    return Captions(keys, tokens, tuple(np.array(sorted(groups[k]), np.int64) for k in keys))


def sample_captions(captions: Captions, rng: np.random.Generator, p_plain: float) -> torch.Tensor:
    """One caption per concept: a random name of the concept under a random template.
    Returns [K, L] int64 tokens."""
    k = len(captions.concepts)
    name = np.array([rng.choice(g) for g in captions.names_of])
    plain = rng.random(k) < p_plain
    template = np.where(plain, 0, rng.integers(1, captions.tokens.shape[1], size=k))
    return captions.tokens[torch.from_numpy(name), torch.from_numpy(template)]


# ---------------------------------------------------------------------------------------- crops
def _normalise(image: np.ndarray, size: int) -> torch.Tensor:
    """[H, W, 3] uint8 -> [1, 3, size, size] CLIP pixels."""
    return resize_normalize(np.ascontiguousarray(image), size, OPENAI_MEAN, OPENAI_STD)


def _patch_labels(concept_map: np.ndarray, box: tuple[int, int, int, int], grid: int) -> np.ndarray:
    """Concept at the centre of each patch of a crop: [grid, grid] int64. box: (y0, x0, h, w)."""
    y0, x0, h, w = box
    centres = (np.arange(grid) + 0.5) / grid
    ys = np.minimum(y0 + (centres * h).astype(np.int64), concept_map.shape[0] - 1)
    xs = np.minimum(x0 + (centres * w).astype(np.int64), concept_map.shape[1] - 1)
    return concept_map[np.ix_(ys, xs)]


def _dominant(
    concept_map: np.ndarray, box: tuple[int, int, int, int], num_concepts: int
) -> tuple[int, float]:
    """(dominant concept, its share) of a crop."""
    y0, x0, h, w = box
    counts = np.bincount(concept_map[y0 : y0 + h, x0 : x0 + w].ravel(), minlength=num_concepts)
    top = int(counts.argmax())
    return top, float(counts[top]) / (h * w)


def _tiling_boxes(shape: tuple[int, int], grid: int) -> list[tuple[int, int, int, int]]:
    """Source boxes (y0, x0, h, w) of the G×G tiling of a whole image (row-major)."""
    h, w = shape
    return [
        (
            r * h // grid,
            c * w // grid,
            (r + 1) * h // grid - r * h // grid,
            (c + 1) * w // grid - c * w // grid,
        )
        for r in range(grid)
        for c in range(grid)
    ]


def scene_crops(
    scene: world.WorldScene,
    rng: np.random.Generator,
    count: int,
    size: int,
    patch_grid: int,
    num_concepts: int,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """``count`` crops of one scene: the 2×2 tiling (cut from the scene resized to a 2·size square,
    as Stage 1.1 does), then random boxes (side 25-100 % of the scene's, height and width drawn
    apart: any scale and aspect).

    Returns pixels [count, 3, size, size], patch concepts [count, g, g], dominant concept [count]
    and its share [count].
    """
    concept_map = scene.concept_map
    shape = concept_map.shape
    tiles = _normalise(scene.image, GRID * size)[0]
    tiles = (
        tiles.reshape(3, GRID, size, GRID, size).permute(1, 3, 0, 2, 4).reshape(GRID * GRID, 3, size, size)
    )
    boxes = _tiling_boxes(shape, GRID)
    pixels = [tiles]
    while len(boxes) < count:
        h = int(rng.integers(shape[0] // 4, shape[0] + 1))
        w = int(rng.integers(shape[1] // 4, shape[1] + 1))
        y0, x0 = int(rng.integers(0, shape[0] - h + 1)), int(rng.integers(0, shape[1] - w + 1))
        boxes.append((y0, x0, h, w))
        pixels.append(_normalise(scene.image[y0 : y0 + h, x0 : x0 + w], size))
    dominant = [_dominant(concept_map, b, num_concepts) for b in boxes[:count]]
    labels = np.stack([_patch_labels(concept_map, b, patch_grid) for b in boxes[:count]])
    return (
        torch.cat(pixels)[:count],
        labels,
        np.array([d[0] for d in dominant], np.int64),
        np.array([d[1] for d in dominant], np.float32),
    )


# ------------------------------------------------------------------------------------- training
def _param_groups(model: open_clip.CLIP, weight_decay: float, scale_lr_factor: float) -> list[dict]:
    """Weight decay on matrices only; none on the token embedding (unused rows stay their init),
    embeddings, norms, biases and the logit scale, which learns ``scale_lr_factor`` × faster (it has
    a few hundred steps to find its temperature)."""
    decay, plain, scale = [], [], []
    for name, p in model.named_parameters():
        if name == "logit_scale":
            scale.append(p)
            continue
        is_matrix = p.ndim >= 2 and "embedding" not in name and name not in ("visual.proj", "text_projection")
        (decay if is_matrix else plain).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_factor": 1.0},
        {"params": plain, "weight_decay": 0.0, "lr_factor": 1.0},
        {"params": scale, "weight_decay": 0.0, "lr_factor": scale_lr_factor},
    ]


def _losses(
    model: open_clip.CLIP,
    pixels: torch.Tensor,
    tokens: torch.Tensor,
    patch_labels: torch.Tensor,
    dominant: torch.Tensor,
    keep: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(contrastive, dense) losses of one batch. pixels [B, 3, S, S]; tokens [K, L] one caption per
    concept of the step; patch_labels [B, g, g] and dominant [B] index those K captions; keep [B]
    bool (crops with a dominant concept)."""
    feats = dense_features(model, pixels, "fmbseg")
    text = F.normalize(model.encode_text(tokens), dim=-1)
    scale = model.logit_scale.exp().clamp(max=100.0)
    image = F.normalize(feats.cls[keep], dim=-1)
    logits = scale * image @ text.T  # [B', K]
    targets = dominant[keep]
    present = torch.unique(targets)
    # text -> image: each present concept's caption against all kept crops, its crops positive.
    positive = (targets[None] == present[:, None]).float()
    t2i = -(F.log_softmax(logits.T[present], dim=1) * positive).sum(1) / positive.sum(1)
    contrastive = 0.5 * (F.cross_entropy(logits, targets) + t2i.mean()) if len(targets) else logits.sum()
    patches = F.normalize(feats.patches.reshape(-1, text.shape[1]), dim=-1)
    dense = F.cross_entropy(scale * patches @ text.T, patch_labels.reshape(-1))
    return contrastive, dense


def _step_concepts(
    rng: np.random.Generator, seen: np.ndarray, num_concepts: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """The concepts whose captions a step encodes: those its crops show, topped up with random
    others to ``count`` (more negatives). Returns (concepts [K] ascending, index of each concept
    in them [num_concepts], -1 for the rest)."""
    shown = np.unique(seen)
    others = np.setdiff1d(np.arange(num_concepts), shown)
    extra = rng.choice(others, size=min(len(others), max(0, count - len(shown))), replace=False)
    chosen = np.sort(np.concatenate([shown, extra]))
    where = np.full(num_concepts, -1, np.int64)
    where[chosen] = np.arange(len(chosen))
    return chosen, where


def _schedule(step: int, settings: TrainSettings) -> float:
    """Learning-rate factor: linear warm-up, then cosine to zero."""
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.5 * (1.0 + np.cos(np.pi * progress))


def _train(model: open_clip.CLIP, captions: Captions, settings: TrainSettings, seed: int) -> dict:
    """Train ``model`` in place; returns the mean losses of the last 20 steps."""
    rng = np.random.default_rng([0, seed])  # the training stream; evaluation draws from [1, seed]
    size = model.visual.image_size[0]
    patch_grid = model.visual.grid_size[0]
    k = len(captions.concepts)
    optimizer = torch.optim.AdamW(
        _param_groups(model, settings.weight_decay, settings.scale_lr_factor),
        lr=settings.lr,
        betas=(0.9, 0.98),
    )
    model.train()
    history: list[tuple[float, float]] = []
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * group["lr_factor"] * _schedule(step, settings)
        parts = [
            scene_crops(
                world.world_scene(rng, captions.concepts), rng, settings.crops_per_scene, size, patch_grid, k
            )
            for _ in range(settings.scenes)
        ]
        pixels = torch.cat([p[0] for p in parts])
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        dominant = torch.from_numpy(np.concatenate([p[2] for p in parts]))
        keep = torch.from_numpy(np.concatenate([p[3] for p in parts]) >= settings.min_dominant)
        chosen, where = _step_concepts(
            rng, np.concatenate([dominant.numpy(), labels.numpy().ravel()]), k, settings.negatives
        )
        tokens = sample_captions(captions, rng, settings.p_plain)[torch.from_numpy(chosen)]
        where = torch.from_numpy(where)
        contrastive, dense = _losses(model, pixels, tokens, where[labels], where[dominant], keep)
        loss = contrastive + settings.dense_weight * dense
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
        optimizer.step()
        history.append((contrastive.item(), dense.item()))
        if step % 50 == 0 or step == settings.steps - 1:
            log.info(
                "step %d: contrastive %.3f dense %.3f scale %.1f",
                step,
                *history[-1],
                model.logit_scale.exp().item(),
            )
    tail = np.array(history[-20:])
    return {"contrastive_loss": float(tail[:, 0].mean()), "dense_loss": float(tail[:, 1].mean())}


def train_clip(
    *, seed: int = 0, steps: int | None = None, eval_scenes: int = 150
) -> tuple[open_clip.CLIP, dict]:
    """Train world-clip from its seeded init (registry.init_model) on CPU with one thread.

    Returns the model (eval mode, frozen) and its metrics: the settings, the final losses, the
    training seconds and :func:`evaluate_clip` on ``eval_scenes`` held-out scenes per list.
    """
    settings = TrainSettings(steps=DEFAULT_STEPS if steps is None else steps)
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.set_num_threads(1)
            torch.manual_seed(seed)
            model = init_model(NAME)
            tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)
            losses = _train(model, build_captions(tokenizer), settings, seed)
            seconds = time.perf_counter() - start
            model.eval().requires_grad_(False)
            metrics = {
                "seed": seed,
                "steps": settings.steps,
                "batch": settings.scenes * settings.crops_per_scene,
                "train_seconds": round(seconds, 1),
                **losses,
                **evaluate_clip(model, tokenizer, seed=seed, scenes=eval_scenes),
            }
    finally:
        torch.set_num_threads(threads)
    return model, metrics


# ----------------------------------------------------------------------------------- evaluation
def _list_vocabulary(list_name: str) -> list[str]:
    """A benchmark's class lines that a scene can show (all but "background")."""
    return [
        line for line in read_class_file(class_file_path(list_name)) if world.concept_key(line) != BACKGROUND
    ]


@torch.no_grad()
def _evaluate_list(
    model: open_clip.CLIP,
    tokenizer: Callable[[list[str]], torch.Tensor],
    lines: Sequence[str],
    rng: np.random.Generator,
    scenes: int,
    min_share: float,
) -> dict[str, float]:
    """Crop, patch and prompt accuracy over ``scenes`` held-out scenes drawn from ``lines``."""
    size = model.visual.image_size[0]
    protos = prototypes(model, tokenizer, list(lines), (TEMPLATE,))
    crop_hits = crop_total = patch_hits = patch_total = prompt_hits = prompt_total = 0
    for _ in range(scenes):
        scene = world.world_scene(rng, lines)
        concept_map = scene.concept_map
        feats = tiled_features(model, _normalise(scene.image, GRID * size)[0], GRID, "fmbseg")
        guess = (F.normalize(feats.cls, dim=-1) @ protos.T).argmax(1)
        for crop, box in enumerate(_tiling_boxes(concept_map.shape, GRID)):
            top, share = _dominant(concept_map, box, len(lines))
            if share >= min_share:
                crop_total += 1
                crop_hits += int(guess[crop]) == top
        h = feats.patches.shape[0]
        truth = torch.from_numpy(_patch_labels(concept_map, (0, 0, *concept_map.shape), h))
        patch_guess = (F.normalize(feats.patches, dim=-1) @ protos.T).argmax(-1)
        patch_hits += int((patch_guess == truth).sum())
        patch_total += truth.numel()
        present = torch.unique(truth)  # classes seen at patch centres: the prompts can reach them
        points = prompt_patches(feats.patches, protos[present], 5)  # [K', 5, 2]
        landed = truth[points[..., 0], points[..., 1]] == present[:, None]
        prompt_hits += int(landed.sum())
        prompt_total += landed.numel()
    return {
        "crop_acc": crop_hits / max(1, crop_total),
        "patch_acc": patch_hits / patch_total,
        "top5_on_class": prompt_hits / prompt_total,
    }


def evaluate_clip(
    model: open_clip.CLIP,
    tokenizer: Callable[[list[str]], torch.Tensor],
    *,
    seed: int,
    scenes: int = 150,
    min_share: float = 0.6,
) -> dict[str, float]:
    """Stage-1 accuracies of a CLIP on held-out world scenes, per list of :data:`EVAL_LISTS`.

    Per list (its lines, "background" aside, are the scenes' vocabulary and the prototypes'
    classes, template ``TEMPLATE``), over ``scenes`` scenes tiled 2×2 like Stage 1.1:
    ``crop_acc/<list>``: top-1 of the crops whose dominant class covers >= ``min_share`` of them;
    ``patch_acc/<list>``: fmbseg patch top-1 (label: the class at the patch centre);
    ``top5_on_class/<list>``: share of the top-5 prompt patches of each present class that lie on it.
    Scenes come from the evaluation stream [1, seed], never drawn in training.
    """
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        for i, list_name in enumerate(EVAL_LISTS):
            rng = np.random.default_rng([1, seed, i])
            scores = _evaluate_list(model, tokenizer, _list_vocabulary(list_name), rng, scenes, min_share)
            out.update({f"{metric}/{list_name}": round(value, 4) for metric, value in scores.items()})
    finally:
        model.train(was_training)
    return out
