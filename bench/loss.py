"""Time and peak memory of each Stage 2 loss, forward + backward, at the paper's batch size.

A batch of 5 images x 1369 DINOv2 patches (ViT-L/14 at 518 px) gives M = 6845 patches of
D = 768 against K = 171 prototypes (COCO-Stuff), 10% of patches unlabelled. For comparison,
`straightforward_tsupcon` is the obvious vectorisation of Eq. 1-4 (concatenated logits and [M, M]
boolean masks) that `tsupcon_loss` avoids.

Peak memory: on CUDA, torch.cuda.max_memory_allocated above the inputs; on CPU, the growth of the
peak resident set size (ru_maxrss), measured in a fresh process per loss so that peaks don't mix.

    python bench/loss.py [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

import torch
import torch.nn.functional as F

from components.aligner.losses import LOSSES

IGNORE = 255


def straightforward_tsupcon(
    z: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, temperature: float, ignore_index: int = IGNORE
) -> torch.Tensor:
    """Eq. 1-4 vectorised the obvious way: [M, M + K] logits and [M, M] masks."""
    valid = labels != ignore_index
    zn, y, t = F.normalize(z[valid], dim=-1), labels[valid], F.normalize(text, dim=-1)
    s_zz, s_zt = zn @ zn.T / temperature, zn @ t.T / temperature
    eye = torch.eye(len(y), dtype=torch.bool, device=z.device)
    s_zz = s_zz.masked_fill(eye, float("-inf"))
    same = (y[:, None] == y[None]) & ~eye
    l_t = torch.logsumexp(torch.cat([s_zt, s_zz], 1), 1) - s_zt.gather(1, y[:, None]).squeeze(1)
    counts = torch.bincount(y, minlength=len(t))
    n_pos = same.sum(1)
    pos_sum = torch.where(same, s_zz, 0).sum(1)
    l_im = torch.where(n_pos > 0, torch.logsumexp(s_zz, 1) - pos_sum / n_pos.clamp(min=1), 0)
    return ((l_t / counts[y]).sum() + l_im.sum()) / (len(y) + int((counts > 0).sum()))


CANDIDATES = {**LOSSES, "tsupcon (straightforward)": straightforward_tsupcon}


def make_inputs(m: int, d: int, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(m, d, generator=g).to(device).requires_grad_(True)
    labels = torch.randint(0, k, (m,), generator=g)
    labels[torch.rand(m, generator=g) < 0.1] = IGNORE
    return z, labels.to(device), torch.randn(k, d, generator=g).to(device)


def measure(name: str, m: int, d: int, k: int, device: str, repeats: int) -> dict[str, float]:
    """Seconds per forward + backward (median of `repeats`) and peak extra memory in MiB."""
    fn = CANDIDATES[name]
    z, labels, text = make_inputs(m, d, k, device)

    def step(z: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> float:
        z.grad = None
        loss = fn(z, labels, text, 0.1)
        loss.backward()
        return loss.item()

    # Warm-up (library initialisation, kernels, allocator): full size on CUDA, where the peak resets;
    # tiny on CPU, where the process's peak RSS cannot be reset.
    step(*(make_inputs(m, d, k, device) if device == "cuda" else make_inputs(64, d, k, device)))
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        value = step(z, labels, text)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        value = step(z, labels, text)
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**10
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(z, labels, text)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"seconds": sorted(times)[len(times) // 2], "peak_mib": peak, "loss": value}


def _measure_in_child(args: tuple[str, int, int, int, str, int]) -> dict[str, float]:
    return measure(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--patches", type=int, default=6845)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=171)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    valid = int((make_inputs(args.patches, args.dim, args.classes, "cpu")[1] != IGNORE).sum())
    square_mib = valid**2 * 4 / 2**20
    print(
        f"M={args.patches} ({valid} valid) D={args.dim} K={args.classes}, device={args.device}, "
        f"threads={torch.get_num_threads()}; one [valid, valid] float32 = {square_mib:.0f} MiB"
    )
    print(f"{'loss':<28}{'fwd+bwd s':>11}{'peak MiB':>10}{'/ square':>9}{'value':>10}")
    context = multiprocessing.get_context("spawn")
    for name in CANDIDATES:
        job = (name, args.patches, args.dim, args.classes, args.device, args.repeats)
        with context.Pool(1) as pool:
            r = pool.apply(_measure_in_child, (job,))
        print(
            f"{name:<28}{r['seconds']:>11.3f}{r['peak_mib']:>10.0f}{r['peak_mib'] / square_mib:>9.1f}"
            f"{r['loss']:>10.4f}"
        )


if __name__ == "__main__":
    main()
