"""Stage 2 alignment losses (paper §3.3): TSupCon (Eq. 1-4) and the two ablations of §4.4.3.

Every loss takes the same arguments:

- ``z``: [M, D] float patch embeddings (the aligner's output over a batch, flattened),
- ``labels``: [M] int64 pseudo labels in [0, K), or ``ignore_index`` for unlabelled patches,
- ``text``: [K, D] float text prototypes t_k,
- ``temperature``: τ > 0,

and returns a scalar. z and text are L2-normalised here, and every similarity is
s(a, b) = cos(a, b) / τ. Ignored patches take no part at all (they are dropped before any
similarity is formed), so their values never change the loss.

Edge cases, the same for all three losses:

- no valid patch: a zero scalar that still carries a (zero) gradient to ``z``;
- one valid patch: the patch-patch sum over j != i is empty. In ℓ_t (Eq. 3) the K text terms keep
  the log's argument non-empty; ℓ_im (Eq. 4) has no positive, so the patch adds 0 to it.

Memory: one [M, M] matrix (the similarities, turned into their row softmax in place) and one more
during backward; positive sums come from per-class sums of embeddings, never from an [M, M] mask.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from components.aligner.settings import LossName

__all__ = ["LOSSES", "LossFn", "get_loss", "prototype_loss", "supcon_loss", "tsupcon_loss"]


class _Valid(NamedTuple):
    z: torch.Tensor  # [Mv, D] unit-norm embeddings of the valid patches
    y: torch.Tensor  # [Mv] int64 labels in [0, K)
    t: torch.Tensor  # [K, D] unit-norm text prototypes


def _check_and_select(
    z: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, temperature: float, ignore_index: int
) -> _Valid:
    """Validate the shared arguments; keep the valid patches; L2-normalise z and text."""
    if z.ndim != 2:
        raise ValueError(f"z must be [M, D] (flatten images and patches first); got shape {tuple(z.shape)}")
    if text.ndim != 2 or text.shape[1] != z.shape[1]:
        raise ValueError(f"text must be [K, D] with D = {z.shape[1]} (as z); got shape {tuple(text.shape)}")
    if labels.shape != z.shape[:1]:
        raise ValueError(f"labels must be [M] = [{z.shape[0]}]; got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor; got {labels.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    valid = labels != ignore_index
    y = labels[valid].long()
    num_classes = text.shape[0]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; "
            f"found values in [{int(y.min())}, {int(y.max())}]"
        )
    return _Valid(z=F.normalize(z[valid], dim=-1), y=y, t=F.normalize(text, dim=-1))


class _OffDiagonalLogSumExp(torch.autograd.Function):
    """[n] log Σ_{j≠i} exp(e_i·e_j / τ) for e [n, D], holding one [n, n] buffer (the softmax).

    Autograd through ``torch.logsumexp`` of the masked similarity matrix keeps four to five [n, n]
    temporaries alive at its peak; here the similarity matrix becomes its own row softmax in place,
    and the gradient, (G + Gᵀ) e / τ with G = diag(grad) · softmax, adds one more. A row whose sum is
    empty (n = 1) gives -inf and a zero gradient.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, e: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        s = (e / temperature) @ e.T
        s.fill_diagonal_(float("-inf"))
        row_max = s.amax(dim=1, keepdim=True)
        row_max.masked_fill_(row_max == float("-inf"), 0)
        s.sub_(row_max).exp_()
        row_sum = s.sum(dim=1, keepdim=True)
        s.div_(row_sum.clamp_min(torch.finfo(s.dtype).tiny))
        ctx.save_for_backward(e, s)
        ctx.temperature = temperature
        return (row_max + row_sum.log()).squeeze(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        e, softmax = ctx.saved_tensors
        g = softmax * grad[:, None]
        return (g @ e + g.T @ e) / ctx.temperature, None


def _offdiagonal_logsumexp(e: torch.Tensor, temperature: float) -> torch.Tensor:
    """[n] log Σ_{j≠i} exp s(e_i, e_j) for unit-norm rows e [n, D]."""
    return _OffDiagonalLogSumExp.apply(e, temperature)


def _positive_sum(e: torch.Tensor, y: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[n] Σ_{l≠a, y_l=y_a} e_a·e_l for each row a of e [n, D], via per-class sums (no [n, n] mask)."""
    class_sums = torch.zeros(num_groups, e.shape[1], dtype=e.dtype, device=e.device).index_add_(0, y, e)
    return (e * class_sums[y]).sum(dim=1) - (e * e).sum(dim=1)


def _text_terms(v: _Valid, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch pieces shared by TSupCon and the prototype loss.

    Returns ℓ_t(z_i, t_{y_i}) [Mv] (Eq. 3), log Σ_{j≠i} exp s(z_i, z_j) [Mv], and N_k [K] int64.
    """
    s_zt = (v.z @ v.t.T) / temperature  # [Mv, K]
    lse_patch = _offdiagonal_logsumexp(v.z, temperature)
    # Eq. 3's denominator = Σ_k exp s(z_i, t_k) + Σ_{j≠i} exp s(z_i, z_j), as a logaddexp of the two parts.
    lse_all = torch.logaddexp(torch.logsumexp(s_zt, dim=1), lse_patch)
    l_t = lse_all - s_zt.gather(1, v.y[:, None]).squeeze(1)
    counts = torch.bincount(v.y, minlength=v.t.shape[0])
    return l_t, lse_patch, counts


def tsupcon_loss(
    z: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, temperature: float, ignore_index: int = 255
) -> torch.Tensor:
    """TSupCon, Eq. 1: (Σ_{present k} ℓ_t(t_k) + Σ_{valid i} ℓ_im(z_i)) / (#valid patches + #present classes).

    ℓ_t(t_k) (Eq. 2) averages ℓ_t(z_i, t_k) (Eq. 3) over the patches of class k. ℓ_im(z_i) (Eq. 4)
    averages -s(z_i, z_l) + log Σ_{j≠i} exp s(z_i, z_j) over the positives l ≠ i with y_l = y_i; a
    patch without positive adds 0. z [M, D], labels [M] int (ignore_index = unlabelled), text [K, D].
    Note the weighting this normalisation implies: the text term carries #present / (#valid + #present)
    of the loss (under 1% at 5 x 1369 patches), so the pull towards the prototypes is gentle.
    """
    v = _check_and_select(z, labels, text, temperature, ignore_index)
    if v.y.numel() == 0:
        return v.z.sum() * 0
    l_t, lse_patch, counts = _text_terms(v, temperature)
    n_k = counts[v.y]  # [Mv] N_{y_i}
    sum_l_t = (l_t / n_k).sum()  # Σ_{present k} ℓ_t(t_k)
    n_pos = n_k - 1
    has_pos = n_pos > 0
    mean_pos_sim = _positive_sum(v.z, v.y, v.t.shape[0]) / temperature / n_pos.clamp(min=1)
    # Selecting the patches with a positive keeps a lone patch's -inf (empty sum) out of the loss.
    sum_l_im = (lse_patch - mean_pos_sim)[has_pos].sum()
    num_present = int((counts > 0).sum())
    return (sum_l_t + sum_l_im) / (v.y.numel() + num_present)


def prototype_loss(
    z: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, temperature: float, ignore_index: int = 255
) -> torch.Tensor:
    """Prototype loss (ablation, Eq. 2 alone): the mean over present classes k of ℓ_t(t_k).

    ℓ_t(z_i, t_k) is Eq. 3, whose denominator still contains the patch-patch terms j ≠ i.
    z [M, D], labels [M] int (ignore_index = unlabelled), text [K, D].
    """
    v = _check_and_select(z, labels, text, temperature, ignore_index)
    if v.y.numel() == 0:
        return v.z.sum() * 0
    l_t, _, counts = _text_terms(v, temperature)
    return (l_t / counts[v.y]).sum() / int((counts > 0).sum())


def supcon_loss(
    z: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, temperature: float, ignore_index: int = 255
) -> torch.Tensor:
    """SupCon (Khosla et al., ablation of §4.4.3) over the union of valid patches and all K prototypes.

    t_k is labelled k. Each anchor a with at least one positive p ≠ a (same label) contributes the
    mean over its positives of -s(a, p) + log Σ_{j≠a} exp s(a, j); the loss is the mean over those
    anchors. Prototypes of absent classes have no positive and act only as negatives.
    z [M, D], labels [M] int (ignore_index = unlabelled), text [K, D].
    """
    v = _check_and_select(z, labels, text, temperature, ignore_index)
    if v.y.numel() == 0:
        return v.z.sum() * 0
    num_classes = v.t.shape[0]
    e = torch.cat([v.z, v.t])  # [Mv + K, D]
    y = torch.cat([v.y, torch.arange(num_classes, device=v.y.device)])
    lse = _offdiagonal_logsumexp(e, temperature)
    n_pos = torch.bincount(y, minlength=num_classes)[y] - 1
    anchors = n_pos > 0  # every valid patch (its own prototype is a positive); prototypes of present classes
    mean_pos_sim = _positive_sum(e, y, num_classes) / temperature / n_pos.clamp(min=1)
    return (lse - mean_pos_sim)[anchors].mean()


class LossFn(Protocol):
    """The shared signature of the Stage 2 losses."""

    def __call__(
        self,
        z: torch.Tensor,
        labels: torch.Tensor,
        text: torch.Tensor,
        temperature: float,
        ignore_index: int = 255,
    ) -> torch.Tensor: ...


LOSSES: dict[LossName, LossFn] = {"tsupcon": tsupcon_loss, "prototype": prototype_loss, "supcon": supcon_loss}


def get_loss(name: str) -> LossFn:
    """The loss registered under ``name`` (one of ``LOSSES``)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}")
    return LOSSES[name]
