"""Every aligner kind learns class structure through TSupCon despite 30% wrong pseudo labels.

Synthetic "DINOv2 features": K classes, each a random mean in in_dim space plus Gaussian noise,
grouped into images of N patches holding a few classes each. 30% of the training labels are
flipped to another class at random (noisy pseudo labels). The aligner is trained with SGD +
cosine annealing against fixed random text prototypes and scored on held-out images against
their clean labels (argmax cosine to the prototypes), as at inference.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from components.aligner import ALIGNER_KINDS, Aligner, tsupcon_loss

NUM_CLASSES = 6
IN_DIM = 32
OUT_DIM = 16
PATCHES = 49  # a 7 x 7 patch grid
CLASSES_PER_IMAGE = 3
FLIP = 0.3
BATCH_IMAGES = 5  # as in the paper
EPOCHS = 20
# τ = 1 (the paper writes no temperature) was the most robust in the issue-5 sweep (τ in {1, 0.5, 0.1,
# 0.07, 0.05} x lr x kind x 3 seeds): >= 0.965 held-out accuracy everywhere, while τ <= 0.1 fits the
# 30% wrong labels and lands at 0.2-0.9. Weight decay matters: the losses only see directions, so
# without it the output norm grows, the gradient (~ 1/norm) shrinks, and training stalls at 0.6-0.9.
TEMPERATURE = 1.0
LEARNING_RATE = 1.0
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-2


class Images(NamedTuple):
    x: torch.Tensor  # [I, N, IN_DIM] float32 patch features
    clean: torch.Tensor  # [I, N] int64 true classes
    noisy: torch.Tensor  # [I, N] int64 pseudo labels, FLIP of them wrong


def make_images(num_images: int, means: torch.Tensor, g: torch.Generator, noise: float = 1.0) -> Images:
    """Images of PATCHES patches, each drawing its patches from CLASSES_PER_IMAGE random classes."""
    present = torch.rand(num_images, NUM_CLASSES, generator=g).argsort(dim=1)[:, :CLASSES_PER_IMAGE]
    clean = present.gather(1, torch.randint(0, CLASSES_PER_IMAGE, (num_images, PATCHES), generator=g))
    x = means[clean] + noise * torch.randn(num_images, PATCHES, IN_DIM, generator=g)
    flip = torch.rand(clean.shape, generator=g) < FLIP
    wrong = (clean + torch.randint(1, NUM_CLASSES, clean.shape, generator=g)) % NUM_CLASSES
    return Images(x=x, clean=clean, noisy=torch.where(flip, wrong, clean))


def make_task(seed: int) -> tuple[Images, Images, torch.Tensor]:
    """(train images, held-out images, [K, OUT_DIM] text prototypes)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(NUM_CLASSES, IN_DIM, generator=g)
    text = torch.randn(NUM_CLASSES, OUT_DIM, generator=g)
    return make_images(60, means, g), make_images(20, means, g), text


def accuracy(aligner: Aligner, images: Images, text: torch.Tensor) -> float:
    """Patch accuracy of argmax-cosine predictions against the clean labels."""
    with torch.no_grad():
        logits = F.normalize(aligner(images.x), dim=-1) @ F.normalize(text, dim=-1).T
    return (logits.argmax(-1) == images.clean).float().mean().item()


def train(
    kind: str,
    temperature: float,
    lr: float,
    *,
    weight_decay: float = WEIGHT_DECAY,
    seed: int = 0,
    epochs: int = EPOCHS,
) -> float:
    """Train one aligner on noisy labels (SGD + cosine annealing); return held-out clean accuracy."""
    train_set, held_out, text = make_task(seed)
    torch.manual_seed(seed)
    aligner = Aligner(IN_DIM, OUT_DIM, kind=kind, num_heads=4)
    optimiser = torch.optim.SGD(aligner.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=weight_decay)
    steps = epochs * len(train_set.x) // BATCH_IMAGES
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(train_set.x), generator=g).split(BATCH_IMAGES):
            z = aligner(train_set.x[batch]).flatten(0, 1)
            loss = tsupcon_loss(z, train_set.noisy[batch].flatten(), text, temperature)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    return accuracy(aligner, held_out, text)


def test_noisy_labels_are_noisy() -> None:
    train_set, _, _ = make_task(0)
    wrong = (train_set.noisy != train_set.clean).float().mean().item()
    assert wrong == pytest.approx(FLIP, abs=0.03)


@pytest.mark.parametrize("kind", ALIGNER_KINDS)
def test_learns_through_label_noise(kind: str) -> None:
    _, held_out, text = make_task(0)
    torch.manual_seed(0)
    untrained = accuracy(Aligner(IN_DIM, OUT_DIM, kind=kind, num_heads=4), held_out, text)
    trained = train(kind, TEMPERATURE, LEARNING_RATE)
    assert untrained < 0.6
    assert trained >= 0.9, f"{kind}: held-out clean accuracy {trained:.3f}"
