"""The SAM stand-in: segment_anything's ``Sam`` trained from scratch on the demo world.

Training follows SAM's recipe, simplified to foreground point prompts (what the pipeline sends):
each step draws a batch of world scenes (demoworld/world.py), brought to SAM's input
frame the way the pipeline brings its images there (the demo's bicubic resize to a square, or
segment_anything's ``ResizeLongestSide`` of a scene of random size and aspect); the image encoder
runs once per image and the prompt encoder + mask decoder answer many prompts of it:

- a 1-point prompt is a pixel of a visible region; its target is that region's visible pixels
  (the automatic mask generator's single-point prompts);
- an n-point prompt (n = 2..5) is n pixels of one concept; its target is all that concept's
  pixels (Stage 1.1's class prompts).

The mask loss is SAM's -- the minimum over the 3 multimask outputs of focal + dice, on the
low-resolution logits against the area-averaged target -- with three changes that a model trained
for two CPU minutes needs (each a setting of :class:`TrainSettings`): focal : dice is 2 : 1, not
SAM's 20 : 1, with no alpha weighting (20 : 1 and alpha 0.25 drove every output to empty masks);
the mean over the outputs is added at half weight (with the minimum alone two outputs never won
and stayed dead); and a supervised contrastive loss on the image embedding (a patch's most
similar patches should be of its own region) gives the encoder a dense signal from the first
step. The IoU head regresses (MSE) every output's actual IoU with the target.

Held-out evaluation (:func:`evaluate_sam`) draws scenes from another seed stream and measures
what the pipeline uses: the best-predicted-IoU mask of 1- and 5-point prompts, the predicted
IoU's agreement with the true IoU, and the automatic masks of an 8x8 point grid.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops import sigmoid_focal_loss

from components.models.registry import STANDIN_DIR, init_model
from components.models.sam import SamImage
from demoworld.world import concepts, world_scene

__all__ = [
    "SPEC",
    "STANDIN_FILE",
    "TrainSettings",
    "FrameScene",
    "frame_scene",
    "Prompter",
    "decode",
    "train_sam",
    "evaluate_sam",
]

log = logging.getLogger(__name__)

SPEC = "world-sam"
STANDIN_FILE = STANDIN_DIR / f"{SPEC}.safetensors"  # the bundled trained file
DEMO_SIZE = (96, 128)  # world scenes as the demo paints them
_TRAIN, _EVAL = 0, 1  # seed streams: SeedSequence(seed, spawn_key=(stream,))


@dataclass(frozen=True)
class TrainSettings:
    """steps: optimiser steps (the default: about 10 minutes on one CPU thread; 760 steps gave a 1-point
    mIoU of 0.40, 3000 steps 0.62);
    images: scenes per step; single / multi: 1-point and n-point prompts per scene;
    square_frac: share of scenes resized to the demo's square, the rest of random size and aspect."""

    steps: int = 3000
    images: int = 8
    single: int = 12
    multi: int = 4
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 50
    focal_weight: float = 2.0
    focal_alpha: float = -1.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    all_outputs_weight: float = 0.5
    embed_weight: float = 1.0
    embed_temperature: float = 0.1
    square_frac: float = 0.6


class FrameScene(NamedTuple):
    """A world scene in SAM's input frame (long side = ``img_size``, before padding).

    image: [h, w, 3] uint8; regions: [h, w] int64 region id; region_concepts: [R] concept index.
    """

    image: np.ndarray
    regions: np.ndarray
    region_concepts: np.ndarray


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


def frame_scene(rng: np.random.Generator, side: int, *, square: bool) -> FrameScene:
    """A world scene brought to the input frame: the demo's 96x128 scene bicubic-resized to a
    ``side`` square (``square``), or a scene of random size (80..160 px a side) resized by
    ``ResizeLongestSide`` as ``SamPredictor`` does. Region ids follow by nearest resizing."""
    if square:
        scene = world_scene(rng, concepts(), size=DEMO_SIZE)
        image = np.asarray(Image.fromarray(scene.image).resize((side, side), Image.Resampling.BICUBIC))
    else:
        size = (int(rng.integers(80, 161)), int(rng.integers(80, 161)))
        scene = world_scene(rng, concepts(), size=size)
        image = ResizeLongestSide(side).apply_image(scene.image)
    h, w = image.shape[:2]
    regions = np.asarray(
        Image.fromarray(scene.regions.astype(np.int32)).resize((w, h), Image.Resampling.NEAREST)
    )
    return FrameScene(image, regions.astype(np.int64), scene.region_concepts)


class Prompter:
    """Prompts of one scene: its visible regions and concepts, each as a target mask and the
    pixels to draw points from."""

    def __init__(self, scene: FrameScene) -> None:
        ids = np.unique(scene.regions)
        self.regions = [scene.regions == r for r in ids]
        visible = scene.region_concepts[ids]
        self.concepts = [np.isin(scene.regions, ids[visible == c]) for c in np.unique(visible)]
        self._pixels = {id(m): np.nonzero(m) for m in self.regions + self.concepts}

    def _points(self, rng: np.random.Generator, mask: np.ndarray, n: int) -> np.ndarray:
        """[n, 2] float xy of n distinct random pixels of ``mask`` (with repeats if it has fewer)."""
        ys, xs = self._pixels[id(mask)]
        pick = rng.choice(len(ys), size=n, replace=len(ys) < n)
        return np.stack([xs[pick], ys[pick]], axis=1).astype(np.float64)

    def single(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A pixel of a random visible region -> ([1, 2] xy, [h, w] bool target: that region)."""
        target = self.regions[int(rng.integers(len(self.regions)))]
        return self._points(rng, target, 1), target

    def concept(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n pixels of a random visible concept -> ([n, 2] xy, [h, w] bool target: all its pixels)."""
        target = self.concepts[int(rng.integers(len(self.concepts)))]
        return self._points(rng, target, n), target


def _frame_batch(sam: Sam, scenes: list[FrameScene]) -> torch.Tensor:
    """[B, 3, S, S] normalised, padded input of ``scenes`` (``Sam.preprocess``)."""
    images = [torch.from_numpy(np.array(s.image)).permute(2, 0, 1)[None].float() for s in scenes]
    return torch.cat([sam.preprocess(x) for x in images])


def _padded(masks: list[np.ndarray], side: int) -> torch.Tensor:
    """[N, side, side] float of [h, w] bool masks, zero-padded bottom and right."""
    out = torch.zeros(len(masks), side, side)
    for i, m in enumerate(masks):
        out[i, : m.shape[0], : m.shape[1]] = torch.from_numpy(m)
    return out


def decode(
    sam: Sam, embeddings: torch.Tensor, image_index: torch.Tensor, points: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimask decoding of foreground prompts of several images in one pass: what
    ``sam.mask_decoder(..., multimask_output=True)`` gives each image's prompts.

    embeddings: [B, C, h, w] image embeddings; image_index: [N] long, the image of each prompt;
    points: [N, P, 2] xy in the input frame. Returns low-resolution logits [N, 3, 4·h, 4·w] (the
    padded input frame) and predicted IoUs [N, 3].
    """
    dec = sam.mask_decoder
    labels = torch.ones(points.shape[:2], dtype=torch.int)
    sparse, dense = sam.prompt_encoder(points=(points, labels), boxes=None, masks=None)
    outputs = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight]).expand(len(points), -1, -1)
    tokens = torch.cat([outputs, sparse], dim=1)
    src = embeddings[image_index] + dense
    n, c, h, w = src.shape
    pos = sam.prompt_encoder.get_dense_pe().expand(n, -1, -1, -1)
    hs, src = dec.transformer(src, pos, tokens)
    upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))
    hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
    masks = (hyper @ upscaled.flatten(2)).view(n, -1, *upscaled.shape[-2:])
    return masks[:, 1:], dec.iou_prediction_head(hs[:, 0])[:, 1:]


def _dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N, K, S, S] logits, [N, 1, S, S] targets -> [N, K] soft dice loss."""
    prob = logits.sigmoid().flatten(2)
    t = target.flatten(2)
    return 1 - (2 * (prob * t).sum(-1) + 1) / (prob.sum(-1) + t.sum(-1) + 1)


def _iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N, K, ...] bool predictions, [N, 1, ...] bool targets -> [N, K] IoU (empty union: 1)."""
    inter = (pred & target).flatten(2).sum(-1).float()
    union = (pred | target).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _prompt_loss(
    logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, cfg: TrainSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's loss of N prompts: low-resolution logits [N, 3, s, s], iou_pred [N, 3], target
    [N, S, S] float in the padded input frame (area-averaged to s x s: a soft target at the
    boundaries). Returns (summed loss over prompts, [N, 3] actual IoUs at s x s)."""
    target = F.adaptive_avg_pool2d(target[:, None], logits.shape[-2:])
    focal = (
        sigmoid_focal_loss(logits, target.expand_as(logits), alpha=cfg.focal_alpha, reduction="none")
        .flatten(2)
        .mean(-1)
    )
    mask_loss = cfg.focal_weight * focal + cfg.dice_weight * _dice(logits, target)
    actual = _iou(logits.detach() > 0, target > 0.5)
    iou_loss = F.mse_loss(iou_pred, actual, reduction="none").sum(-1)
    mask_loss = mask_loss.min(dim=1).values + cfg.all_outputs_weight * mask_loss.mean(dim=1)
    return (mask_loss + cfg.iou_weight * iou_loss).sum(), actual


def _patch_labels(scenes: list[FrameScene], side: int, grid: int) -> torch.Tensor:
    """[B, grid·grid] region id at each patch centre of the padded input frame (-1: padding)."""
    step = side // grid
    labels = torch.full((len(scenes), grid, grid), -1, dtype=torch.long)
    for b, scene in enumerate(scenes):
        centres = torch.as_tensor(scene.regions[step // 2 :: step, step // 2 :: step])
        labels[b, : centres.shape[0], : centres.shape[1]] = centres
    return labels.flatten(1)


def _embedding_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss of the image embedding: within each image, a patch's nearest
    patches (cosine similarity) should be those of its own region.

    embeddings: [B, C, h, w]; labels: [B, h·w] region id (-1: padding, ignored). Returns a scalar.
    """
    feats = F.normalize(embeddings.flatten(2).transpose(1, 2), dim=-1)  # [B, hw, C]
    sim = feats @ feats.transpose(1, 2) / temperature
    valid = labels >= 0
    eye = torch.eye(labels.shape[1], dtype=torch.bool)
    others = valid[:, None, :] & ~eye
    log_prob = sim - torch.logsumexp(sim.masked_fill(~others, -torch.inf), dim=-1, keepdim=True)
    positive = others & (labels[:, :, None] == labels[:, None, :])
    count = positive.sum(-1)
    anchor = valid & (count > 0)
    per_anchor = -(log_prob * positive).sum(-1) / count.clamp(min=1)
    return per_anchor[anchor].mean()


def _step_prompts(
    rng: np.random.Generator, scenes: list[FrameScene], cfg: TrainSettings, side: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A step's prompts, one group per point count (1, and one n in 2..5 drawn per step):
    [(image index [N], points [N, P, 2] xy jittered within the pixel, targets [N, S, S])]."""
    n = int(rng.integers(2, 6))
    prompters = [Prompter(scene) for scene in scenes]
    groups = []
    for count, per_image in ((1, cfg.single), (n, cfg.multi)):
        made = [
            (b, *(prompter.single(rng) if count == 1 else prompter.concept(rng, count)))
            for b, prompter in enumerate(prompters)
            for _ in range(per_image)
        ]
        index = torch.as_tensor([b for b, _, _ in made])
        points = np.stack([p for _, p, _ in made]) + rng.uniform(-0.5, 0.5, size=(len(made), count, 2))
        groups.append(
            (index, torch.as_tensor(points, dtype=torch.float32), _padded([t for _, _, t in made], side))
        )
    return groups


def _lr(step: int, cfg: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_sam(
    *, seed: int = 0, steps: int | None = None, settings: TrainSettings | None = None, eval_scenes: int = 60
) -> tuple[Sam, dict[str, Any]]:
    """Train ``world-sam`` from its seeded init on world scenes; returns (frozen Sam, metrics).

    Deterministic for a seed (one CPU thread, torch RNG forked; the caller's thread count is
    restored). ``steps`` overrides ``settings.steps``. metrics: the settings, the training wall
    time, the last steps' losses and, for ``eval_scenes`` > 0, :func:`evaluate_sam` on that many
    held-out scenes (``eval/*``).
    """
    cfg = settings or TrainSettings()
    if steps is not None:
        cfg = TrainSettings(**{**asdict(cfg), "steps": steps})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sam, metrics = _train(cfg, _rng(seed, _TRAIN))
        sam.eval().requires_grad_(False)
        if eval_scenes > 0:
            held_out = evaluate_sam(sam, seed=seed, scenes=eval_scenes)
            metrics.update({f"eval/{k}": v for k, v in held_out.items()})
    finally:
        torch.set_num_threads(threads)
    return sam, {"seed": seed, **asdict(cfg), **metrics}


def _train(cfg: TrainSettings, rng: np.random.Generator) -> tuple[Sam, dict[str, Any]]:
    sam: Sam = init_model(SPEC)  # type: ignore[assignment]
    sam.train()
    side = sam.image_encoder.img_size
    optim = torch.optim.AdamW(sam.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = time.perf_counter()
    recent: list[tuple[float, float]] = []
    for step in range(cfg.steps):
        for group in optim.param_groups:
            group["lr"] = _lr(step, cfg)
        scenes = [
            frame_scene(rng, side, square=bool(rng.random() < cfg.square_frac)) for _ in range(cfg.images)
        ]
        embeddings = sam.image_encoder(_frame_batch(sam, scenes))
        total, count, ious = torch.zeros(()), 0, []
        if cfg.embed_weight > 0:
            labels = _patch_labels(scenes, side, embeddings.shape[-1])
            embed_loss = cfg.embed_weight * _embedding_loss(embeddings, labels, cfg.embed_temperature)
        for index, points, targets in _step_prompts(rng, scenes, cfg, side):
            logits, iou_pred = decode(sam, embeddings, index, points)
            loss, actual = _prompt_loss(logits, iou_pred, targets, cfg)
            total, count = total + loss, count + len(points)
            ious.append(actual.gather(1, iou_pred.detach().argmax(1, keepdim=True)))
        loss = total / count + (embed_loss if cfg.embed_weight > 0 else 0.0)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        optim.step()
        recent = (recent + [(loss.item(), torch.cat(ious).mean().item())])[-50:]
        if step % 100 == 0 or step == cfg.steps - 1:
            log.info("world-sam step %d/%d loss %.4f train mIoU %.3f", step, cfg.steps, *recent[-1])
    loss_avg, iou_avg = np.mean(recent, axis=0).tolist() if recent else (float("nan"), float("nan"))
    return sam, {
        "train_seconds": time.perf_counter() - start,
        "final_loss": loss_avg,
        "final_train_miou": iou_avg,
    }


def _best_iou(mask: np.ndarray, truths: list[np.ndarray]) -> float:
    """The highest IoU of ``mask`` with any of ``truths`` (all [H, W] bool)."""
    return max((float((mask & t).sum()) / max(1, int((mask | t).sum())) for t in truths), default=0.0)


@torch.no_grad()
def evaluate_sam(sam: Sam, *, seed: int, scenes: int = 60, prompts: int = 8) -> dict[str, Any]:
    """Held-out scores of a SAM on ``scenes`` world scenes of ``seed``'s evaluation stream, in
    the demo's setting (96x128 scenes bicubic-resized to the ``img_size`` square):

    - miou_1pt / miou_5pt: mean IoU of the best-predicted-IoU mask of 1-point prompts (target: the
      region under the point) and of 5-point prompts (target: the concept's pixels);
    - miou_1pt_aspect: 1-point mIoU on scenes of random size and aspect (``ResizeLongestSide``);
    - iou_corr: Pearson correlation of predicted and true IoU over all 3 outputs of every prompt;
    - amg_*: automatic masks (8x8 grid, no IoU or stability filter): masks per image, the share
      matching a true region with IoU >= 0.5 (precision), the share of regions covering >= 1% of
      the image so matched (recall), and the precision and count kept under a few
      (pred_iou_thresh, stability_score_thresh) pairs.
    """
    rng = _rng(seed, _EVAL)
    side = sam.image_encoder.img_size
    scores: dict[str, list[float]] = {"1pt": [], "5pt": [], "1pt_aspect": []}
    pred_all, true_all = [], []
    amg_records: list[tuple[float, float, float]] = []  # (predicted IoU, stability, best IoU)
    recall: list[float] = []
    for _ in range(scenes):
        for square, key in ((True, "1pt"), (False, "1pt_aspect")):
            scene = frame_scene(rng, side, square=square)
            embedded = SamImage(sam, scene.image)
            prompter = Prompter(scene)
            sets = [prompter.single(rng) for _ in range(prompts)]
            if square:
                sets5 = [prompter.concept(rng, 5) for _ in range(prompts)]
                result = embedded.masks_from_point_sets(np.stack([p for p, _ in sets5]))
                scores["5pt"] += [
                    _best_iou(m, [t]) for m, (_, t) in zip(result.masks.numpy(), sets5, strict=True)
                ]
            result = embedded.masks_from_point_sets(np.stack([p for p, _ in sets]))
            scores[key] += [_best_iou(m, [t]) for m, (_, t) in zip(result.masks.numpy(), sets, strict=True)]
            if not square:
                continue
            predictor = embedded.predictor
            coords = predictor.transform.apply_coords(np.stack([p for p, _ in sets]), embedded.size)
            coords_t = torch.as_tensor(coords, dtype=torch.float32)
            masks, iou_pred, _ = predictor.predict_torch(
                coords_t, torch.ones(coords_t.shape[:2]), multimask_output=True
            )
            truth = torch.as_tensor(np.stack([t for _, t in sets]))[:, None]
            pred_all.append(iou_pred.flatten())
            true_all.append(_iou(masks, truth).flatten())
            regions = prompter.regions
            records = embedded.automatic_masks(
                points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0
            )
            amg_records += [
                (r["predicted_iou"], r["stability_score"], _best_iou(r["segmentation"], regions))
                for r in records
            ]
            big = [t for t in regions if t.mean() >= 0.01]
            recall += [float(_best_iou(t, [r["segmentation"] for r in records]) >= 0.5) for t in big]
    pred, true = torch.cat(pred_all).numpy(), torch.cat(true_all).numpy()
    amg = np.asarray(amg_records, dtype=np.float64).reshape(-1, 3)
    metrics: dict[str, Any] = {f"miou_{k}": float(np.mean(v)) for k, v in scores.items()}
    metrics["iou_corr"] = float(np.corrcoef(pred, true)[0, 1])
    metrics["iou_mae"] = float(np.abs(pred - true).mean())
    metrics["amg_masks_per_image"] = len(amg) / scenes
    metrics["amg_precision"] = float((amg[:, 2] >= 0.5).mean()) if len(amg) else 0.0
    metrics["amg_recall"] = float(np.mean(recall)) if recall else 0.0
    for iou_t, stab_t in ((0.3, 0.0), (0.4, 0.0), (0.7, 0.7), (0.9, 0.9)):
        kept = amg[(amg[:, 0] > iou_t) & (amg[:, 1] >= stab_t)]
        name = f"amg_{iou_t:.1f}_{stab_t:.1f}"
        metrics[f"{name}_precision"] = float((kept[:, 2] >= 0.5).mean()) if len(kept) else 0.0
        metrics[f"{name}_per_image"] = len(kept) / scenes
    return metrics
