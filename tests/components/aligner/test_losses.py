"""Stage 2 losses against naive loops over the paper's equations (Eq. 1-4) and SupCon."""

from __future__ import annotations

import math

import pytest
import torch

from components.aligner.losses import LOSSES, get_loss, prototype_loss, supcon_loss, tsupcon_loss

IGNORE = 255


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def _prepare(z: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, ignore_index: int):
    zs, ys = [], []
    for row, y in zip(z.tolist(), labels.tolist(), strict=True):
        if y != ignore_index:
            zs.append(_unit(row))
            ys.append(y)
    return zs, ys, [_unit(row) for row in text.tolist()]


def _sim(a: list[float], b: list[float], tau: float) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / tau


def ref_l_t(zs, ys, ts, tau, i) -> float:
    """Eq. 3 for patch i."""
    denom = sum(math.exp(_sim(zs[i], tk, tau)) for tk in ts)
    denom += sum(math.exp(_sim(zs[i], zs[j], tau)) for j in range(len(zs)) if j != i)
    return -_sim(zs[i], ts[ys[i]], tau) + math.log(denom)


def ref_l_t_per_class(zs, ys, ts, tau) -> dict[int, float]:
    """Eq. 2 for every present class k."""
    out = {}
    for k in range(len(ts)):
        members = [i for i in range(len(zs)) if ys[i] == k]
        if members:
            out[k] = sum(ref_l_t(zs, ys, ts, tau, i) for i in members) / len(members)
    return out


def ref_l_im(zs, ys, tau, i) -> float:
    """Eq. 4 for patch i (positives l != i; none -> 0)."""
    positives = [p for p in range(len(zs)) if p != i and ys[p] == ys[i]]
    if not positives:
        return 0.0
    log_denom = math.log(sum(math.exp(_sim(zs[i], zs[j], tau)) for j in range(len(zs)) if j != i))
    return sum(-_sim(zs[i], zs[p], tau) + log_denom for p in positives) / len(positives)


def ref_tsupcon(z, labels, text, tau, ignore_index=IGNORE) -> float:
    zs, ys, ts = _prepare(z, labels, text, ignore_index)
    if not zs:
        return 0.0
    per_class = ref_l_t_per_class(zs, ys, ts, tau)
    total = sum(per_class.values()) + sum(ref_l_im(zs, ys, tau, i) for i in range(len(zs)))
    return total / (len(zs) + len(per_class))


def ref_prototype(z, labels, text, tau, ignore_index=IGNORE) -> float:
    zs, ys, ts = _prepare(z, labels, text, ignore_index)
    if not zs:
        return 0.0
    per_class = ref_l_t_per_class(zs, ys, ts, tau)
    return sum(per_class.values()) / len(per_class)


def ref_supcon(z, labels, text, tau, ignore_index=IGNORE) -> float:
    zs, ys, ts = _prepare(z, labels, text, ignore_index)
    if not zs:
        return 0.0
    feats = zs + ts
    labs = ys + list(range(len(ts)))
    per_anchor = []
    for a in range(len(feats)):
        positives = [p for p in range(len(feats)) if p != a and labs[p] == labs[a]]
        if not positives:
            continue
        log_denom = math.log(
            sum(math.exp(_sim(feats[a], feats[j], tau)) for j in range(len(feats)) if j != a)
        )
        per_anchor.append(sum(-_sim(feats[a], feats[p], tau) + log_denom for p in positives) / len(positives))
    return sum(per_anchor) / len(per_anchor)


REFERENCES = {"tsupcon": ref_tsupcon, "prototype": ref_prototype, "supcon": ref_supcon}


def _inputs(seed: int, m: int = 30, d: int = 6, k: int = 7, used: int = 4, ignore_index: int = IGNORE):
    """Random z [m, d], labels [m] over the first `used` of k classes (the rest absent), ~25% ignored,
    class `used - 1` a singleton (a patch with no positive)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, d, generator=g, dtype=torch.float64)
    text = torch.randn(k, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, used - 1, (m,), generator=g)
    labels[torch.rand(m, generator=g) < 0.25] = ignore_index
    labels[0] = used - 1
    return z, labels, text


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [1.0, 0.5, 0.07])
def test_matches_naive_reference(name: str, seed: int, tau: float) -> None:
    z, labels, text = _inputs(seed)
    got = LOSSES[name](z, labels, text, tau)
    want = REFERENCES[name](z, labels, text, tau)
    assert got.dtype == torch.float64 and got.ndim == 0
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_custom_ignore_index(name: str) -> None:
    z, labels, text = _inputs(3, ignore_index=-1)
    got = LOSSES[name](z, labels, text, 0.2, ignore_index=-1)
    assert got.item() == pytest.approx(REFERENCES[name](z, labels, text, 0.2, ignore_index=-1), rel=1e-5)


def test_terms_differ_between_losses() -> None:
    z, labels, text = _inputs(4)
    values = {name: fn(z, labels, text, 0.5).item() for name, fn in LOSSES.items()}
    assert len({round(v, 6) for v in values.values()}) == 3, values


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_finite_and_ignored_patches_get_none(name: str) -> None:
    z, labels, text = _inputs(5)
    z.requires_grad_(True)
    text.requires_grad_(True)
    LOSSES[name](z, labels, text, 0.07).backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(text.grad).all()
    ignored = labels == IGNORE
    assert ignored.any()
    assert (z.grad[ignored] == 0).all()
    assert z.grad[~ignored].abs().sum() > 0 and text.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_match_finite_differences(name: str) -> None:
    """The hand-written backward of the patch-patch logsumexp agrees with numerical gradients."""
    z, labels, text = _inputs(9, m=12, d=4, k=5)
    z.requires_grad_(True)
    text.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: LOSSES[name](a, labels, b, 0.3), (z, text))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_ignored_patch_values_do_not_matter(name: str) -> None:
    z, labels, text = _inputs(6)
    ignored = labels == IGNORE
    perturbed = z.clone()
    perturbed[ignored] = 100 * torch.randn_like(perturbed[ignored])
    assert LOSSES[name](perturbed, labels, text, 0.1).item() == LOSSES[name](z, labels, text, 0.1).item()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_temperature_divides_every_similarity(name: str) -> None:
    """Similarities scale as 1/τ: τ and the reference agree, embeddings' norms never matter."""
    z, labels, text = _inputs(7)
    fn = LOSSES[name]
    values = [fn(z, labels, text, tau).item() for tau in (1.0, 0.3, 0.05)]
    assert len(set(values)) == 3
    # L2 normalisation inside the loss: scaling z or text cannot emulate a temperature.
    assert fn(5 * z, labels, 0.2 * text, 0.3).item() == pytest.approx(values[1], rel=1e-12)
    # At a tiny τ, the loss is dominated by the hardest negative margin times 1/τ.
    assert fn(z, labels, text, 1e-3).item() > 10 * fn(z, labels, text, 1.0).item()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_no_valid_patch_gives_zero_with_grad(name: str) -> None:
    z = torch.randn(5, 4, requires_grad=True)
    labels = torch.full((5,), IGNORE)
    loss = LOSSES[name](z, labels, torch.randn(3, 4), 0.1)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (z.grad == 0).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_single_valid_patch(name: str) -> None:
    """One valid patch: empty patch-patch sums; ℓ_t keeps its K text terms, ℓ_im adds 0."""
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    text = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([IGNORE, 2, IGNORE, IGNORE])
    loss = LOSSES[name](z, labels, text, 0.5)
    assert loss.item() == pytest.approx(REFERENCES[name](z.detach(), labels, text.detach(), 0.5), rel=1e-10)
    loss.backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(text.grad).all()
    if name != "supcon":
        # TSupCon = (ℓ_t(t_2) + 0) / (1 + 1); prototype = ℓ_t(t_2) = CE over the 3 prototypes.
        s = torch.nn.functional.cosine_similarity(z[1:2].detach(), text.detach()) / 0.5
        ce = (torch.logsumexp(s, 0) - s[2]).item()
        assert loss.item() == pytest.approx(ce / 2 if name == "tsupcon" else ce, rel=1e-10)


def test_float32_large_batch_is_stable() -> None:
    """Small τ with many near-duplicate patches: logsumexp keeps everything finite in float32."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(4, 16, generator=g).repeat_interleave(100, 0) + 1e-3 * torch.randn(400, 16, generator=g)
    labels = torch.arange(4).repeat_interleave(100)
    text = torch.randn(6, 16, generator=g)
    for fn in LOSSES.values():
        zz = z.clone().requires_grad_(True)
        loss = fn(zz, labels, text, 0.01)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(zz.grad).all()
        want = fn(z.double(), labels, text.double(), 0.01).item()
        assert loss.item() == pytest.approx(want, rel=1e-4)


def test_rejects_bad_input() -> None:
    z, labels, text = torch.randn(4, 3), torch.tensor([0, 1, 255, 1]), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        tsupcon_loss(z, torch.tensor([0, 2, 255, 1]), text, 0.1)
    with pytest.raises(ValueError, match="temperature"):
        prototype_loss(z, labels, text, 0.0)
    with pytest.raises(ValueError, match="text must be"):
        supcon_loss(z, labels, torch.randn(2, 4), 0.1)
    with pytest.raises(ValueError, match="labels must be"):
        tsupcon_loss(z, labels[:3], text, 0.1)
    with pytest.raises(ValueError, match="flatten"):
        tsupcon_loss(z[None], labels[None], text, 0.1)
    with pytest.raises(ValueError, match="integer"):
        tsupcon_loss(z, labels.float(), text, 0.1)


def test_registry() -> None:
    assert set(LOSSES) == {"tsupcon", "prototype", "supcon"}
    assert get_loss("tsupcon") is tsupcon_loss
    with pytest.raises(ValueError, match=r"'prototype', 'supcon', 'tsupcon'"):
        get_loss("clip")
