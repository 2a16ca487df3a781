"""Train the alignment module M (paper §3.3, §4.1): SGD + cosine annealing over frozen patch features.

Each step takes ``batch_size`` images, maps their patch features through M ([B, N, C] -> [B, N, D];
the transformer attends within each image), flattens the B·N patches and applies the chosen loss
(TSupCon, Eq. 1, by default) against the frozen text prototypes. Pseudo labels at the patch grid
come from the dataset (majority vote per patch, ``ignore_index`` where no pixel is labelled).

Resumable: after every epoch the model, optimizer, scheduler, shuffling generator and epoch summaries
go atomically to ``state_path``; a later call with the same settings, data and prototypes (the
resume key) continues after the last finished epoch and ends with the same weights as an
uninterrupted run. Nothing here logs: per-step losses and epoch summaries go to the callbacks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from components.aligner.losses import get_loss
from components.aligner.model import Aligner
from components.aligner.settings import TrainSettings
from components.io import atomic_write_bytes

__all__ = ["TrainSettings", "TrainResult", "Encoder", "resume_key", "pending_resume", "train_aligner"]

# pixels [B, 3, S, S] float on the training device -> patch features [B, h, w, C] float
Encoder = Callable[[torch.Tensor], torch.Tensor]


class TrainResult(NamedTuple):
    """The trained aligner (on the training device, eval mode) and what happened."""

    model: Aligner
    epochs: list[dict[str, float]]  # one summary per epoch (including epochs restored from the state)
    start_epoch: int  # 0 for a fresh run; the first epoch this call ran when it resumed
    steps: int  # optimizer steps over all epochs


def _sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def resume_key(settings: TrainSettings, prototypes: torch.Tensor, data_fingerprint: str) -> str:
    """Hex sha256 identifying a training run: settings, prototypes [K, D] and the caller's
    fingerprint of the data (e.g. the hashes of the train index and the feature cache)."""
    blob = json.dumps(
        {"settings": asdict(settings), "prototypes": _sha256_tensor(prototypes), "data": data_fingerprint},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _load_state(state_path: Path, key: str) -> dict[str, Any] | None:
    if not state_path.exists():
        return None
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    return state if state.get("resume_key") == key else None


def pending_resume(
    state_path: str | os.PathLike[str], settings: TrainSettings, prototypes: torch.Tensor, data_fingerprint: str
) -> dict[str, Any] | None:
    """The ``extra`` dict saved with a resumable state for exactly this run (None: starts fresh).

    Lets the caller reopen what it stored there (the MLflow run id) before training resumes.
    """
    state = _load_state(Path(state_path), resume_key(settings, prototypes, data_fingerprint))
    return None if state is None else dict(state["extra"])


def _save_state(state_path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(state_path, buf.getvalue())


class _EpochOrder(Sampler[int]):
    """The sample order of the current epoch, drawn by the trainer's seeded generator. One DataLoader
    (with persistent workers) serves every epoch: the order is read in the main process."""

    def __init__(self, n: int) -> None:
        self.order = list(range(n))

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def _build_model(settings: TrainSettings, out_dim: int) -> Aligner:
    """The aligner with its initial weights drawn from ``seed`` (the caller's RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return Aligner(settings.in_dim, out_dim, kind=settings.kind, num_heads=settings.num_heads)


def _check_dataset(dataset: Dataset, settings: TrainSettings) -> None:
    """A training set that is not empty and marks unlabelled patches as the loss ignores them."""
    if len(dataset) == 0:
        raise ValueError("the training set is empty: no samples in the train index")
    pooled_ignore = getattr(dataset, "ignore_index", settings.ignore_index)
    if pooled_ignore != settings.ignore_index:
        raise ValueError(f"the samples mark unlabelled patches {pooled_ignore} but the loss ignores "
                         f"{settings.ignore_index}: both follow the vocabulary's label maps (components.io.unlabelled_for)")


def _restore(state: dict[str, Any], model: Aligner, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler,
             shuffle: torch.Generator) -> tuple[list[dict[str, float]], list[float], int]:
    """Load a saved end-of-epoch state into the trainer's parts; returns (epoch summaries, per-step
    losses, the epoch to start at)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    shuffle.set_state(state["shuffle"])
    return [dict(s) for s in state["epochs"]], [float(v) for v in state.get("losses", [])], int(state["epoch"])


def _trainer_state(step: _Step, shuffle: torch.Generator) -> dict[str, Any]:
    """The parts of the trainer an end-of-epoch state holds (what :func:`_restore` loads back)."""
    return {"model": step.model.state_dict(), "optimizer": step.optimizer.state_dict(),
            "scheduler": step.scheduler.state_dict(), "shuffle": shuffle.get_state()}


class _Step(NamedTuple):
    """What one optimizer step uses: the model and its optimizer, the loss against the prototypes
    [K, D] (``text``), and how a batch becomes features on ``device``."""

    model: Aligner
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: Callable[..., torch.Tensor]
    text: torch.Tensor
    settings: TrainSettings
    encoder: Encoder | None
    device: torch.device
    pin: bool

    def features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B, h, w, C] float patch features of a batch: cached features, or the encoder's of its pixels."""
        if "features" in batch:
            return batch["features"].to(self.device, non_blocking=self.pin).float()
        if self.encoder is not None:
            return self.encoder(batch["pixels"].to(self.device, non_blocking=self.pin)).float()
        raise ValueError("the dataset yields pixels but no encoder was given to compute features")

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
        """One optimizer step on a batch; returns (its loss, its [B, h, w] labels on the device)."""
        labels = batch["labels"].to(self.device, non_blocking=self.pin)  # [B, h, w]
        x = self.features(batch)
        b, h, w, c = x.shape
        z = self.model(x.reshape(b, h * w, c))  # [B, N, D]
        loss = self.loss_fn(z.reshape(b * h * w, -1), labels.reshape(-1), self.text, self.settings.temperature,
                            self.settings.ignore_index)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach()), labels


def _run_epoch(step: _Step, loader: DataLoader, steps_per_epoch: int, losses: list[float],
               on_step: Callable[[int, float], None] | None, *, first_step: int) -> dict[str, float]:
    """One pass over ``loader``; appends each step's loss to ``losses``, calls on_step(global step,
    loss) counting from ``first_step``, and returns the epoch's summary."""
    t0 = time.perf_counter()
    loss_sum, valid, total = 0.0, 0, 0
    for i, batch in enumerate(loader):
        value, labels = step(batch)
        loss_sum += value
        valid += int((labels != step.settings.ignore_index).sum())
        total += labels.numel()
        losses.append(value)
        if on_step is not None:
            on_step(first_step + i, value)
    seconds = time.perf_counter() - t0
    return {
        "loss": loss_sum / steps_per_epoch,
        "valid_patch_fraction": valid / max(total, 1),
        "lr": step.scheduler.get_last_lr()[0],
        "seconds": seconds,
        "steps_per_second": steps_per_epoch / max(seconds, 1e-9),
    }


def train_aligner(
    dataset: Dataset,
    prototypes: torch.Tensor,
    settings: TrainSettings,
    *,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    encoder: Encoder | None = None,
    state_path: str | os.PathLike[str] | None = None,
    data_fingerprint: str = "",
    extra: Mapping[str, Any] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    on_resume: Callable[[list[dict[str, float]], list[float]], None] | None = None,
) -> TrainResult:
    """Train M on ``dataset`` against ``prototypes``.

    dataset: items ``{"labels": [h, w] int64 (ignore_index = unlabelled), "features": [h, w, C]
        float}`` -- or ``"pixels": [3, S, S] float`` instead of features, which ``encoder`` turns into
        [B, h, w, C] features on ``device`` (no feature cache).
    prototypes: [K, D] float text prototypes t_k; labels index them.
    state_path: where the end-of-epoch state goes (None: no resuming); ``extra`` is stored with it.
    on_step(global step, loss) after every optimizer step; on_epoch(epoch, summary) after every
    epoch, once its state is saved (an exception there interrupts training resumably);
    on_resume(summaries, losses) when a saved state is restored: the epoch summaries and per-step
    losses it holds, so that a caller killed before logging them can log what it lacks.
    """
    _check_dataset(dataset, settings)
    device = torch.device(device)
    text = prototypes.detach().float().to(device)
    key = resume_key(settings, prototypes, data_fingerprint)
    steps_per_epoch = -(-len(dataset) // settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs

    model = _build_model(settings, text.shape[1]).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    shuffle = torch.Generator().manual_seed(settings.seed)
    summaries: list[dict[str, float]] = []
    losses: list[float] = []  # every step's loss so far, by global step (saved with the state)
    start_epoch = 0
    path = Path(state_path) if state_path is not None else None
    state = _load_state(path, key) if path is not None else None
    if state is not None:
        summaries, losses, start_epoch = _restore(state, model, optimizer, scheduler, shuffle)
        if on_resume is not None:
            on_resume(summaries, losses)

    pin = device.type == "cuda"
    sampler = _EpochOrder(len(dataset))
    loader = DataLoader(
        dataset, batch_size=settings.batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin,
        persistent_workers=num_workers > 0,
    )
    step = _Step(model, optimizer, scheduler, get_loss(settings.loss), text, settings, encoder, device, pin)
    for epoch in range(start_epoch, settings.epochs):
        model.train()
        sampler.order = torch.randperm(len(dataset), generator=shuffle).tolist()
        summary = _run_epoch(step, loader, steps_per_epoch, losses, on_step, first_step=epoch * steps_per_epoch)
        summaries.append(summary)
        if path is not None:
            _save_state(path, {"resume_key": key, "epoch": epoch + 1, **_trainer_state(step, shuffle),
                               "epochs": summaries, "losses": losses, "extra": dict(extra or {})})
        if on_epoch is not None:
            on_epoch(epoch, summary)
    model.eval()
    return TrainResult(model=model, epochs=summaries, start_epoch=start_epoch, steps=total_steps)
