"""Aligner: shapes for every kind, self-describing rebuild, one optimiser step lowers each loss."""

from __future__ import annotations

import io

import pytest
import torch

from components.aligner import ALIGNER_KINDS, LOSSES, Aligner


@pytest.mark.parametrize("kind", ALIGNER_KINDS)
def test_shapes(kind: str) -> None:
    torch.manual_seed(0)
    aligner = Aligner(24, 10, kind=kind, num_heads=4)
    assert aligner(torch.randn(3, 7, 24)).shape == (3, 7, 10)


def test_transformer_attends_across_patches_and_not_across_images() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    changed = x.clone()
    changed[0, 4] += torch.randn(16)  # not a constant shift, which LayerNorm would remove
    aligners = {kind: Aligner(16, 8, kind=kind, num_heads=2) for kind in ALIGNER_KINDS}
    for kind, aligner in aligners.items():
        before, after = aligner(x), aligner(changed)
        assert torch.equal(before[1], after[1]), kind  # other images untouched
        # Only the transformer mixes patches of one image.
        assert (not torch.allclose(before[0, :4], after[0, :4])) == (kind == "transformer"), kind


def test_transformer_is_one_prenorm_block_then_linear() -> None:
    """The block equals x + MHSA(LN x) then + MLP(LN x), checked against nn.MultiheadAttention."""
    torch.manual_seed(0)
    aligner = Aligner(16, 8, kind="transformer", num_heads=4).eval()
    block, head = aligner.net[0], aligner.net[1]
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.attn.qkv.weight)
        mha.in_proj_bias.copy_(block.attn.qkv.bias)
        mha.out_proj.weight.copy_(block.attn.proj.weight)
        mha.out_proj.bias.copy_(block.attn.proj.bias)
        x = torch.randn(2, 6, 16)
        h = block.norm1(x)
        h = x + mha(h, h, h, need_weights=False)[0]
        mlp = block.mlp
        assert mlp[0].out_features == 64 and isinstance(mlp[1], torch.nn.GELU)
        want = head(h + mlp(block.norm2(h)))
        torch.testing.assert_close(aligner(x), want)


@pytest.mark.parametrize("kind", ALIGNER_KINDS)
def test_rebuild_from_config_and_state_dict(kind: str) -> None:
    torch.manual_seed(0)
    aligner = Aligner(16, 8, kind=kind, num_heads=2)
    buffer = io.BytesIO()
    torch.save({"model": aligner.state_dict(), "model_args": aligner.aligner_config()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, map_location="cpu", weights_only=True)
    torch.manual_seed(1)  # a different init, overwritten by the state dict
    rebuilt = Aligner(**checkpoint["model_args"])
    rebuilt.load_state_dict(checkpoint["model"])
    x = torch.randn(2, 5, 16)
    assert checkpoint["model_args"] == {"in_dim": 16, "out_dim": 8, "kind": kind, "num_heads": 2}
    assert torch.equal(rebuilt(x), aligner(x))


@pytest.mark.parametrize("kind", ALIGNER_KINDS)
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_one_step_lowers_loss(kind: str, loss_name: str) -> None:
    torch.manual_seed(0)
    aligner = Aligner(16, 8, kind=kind, num_heads=2)
    x = torch.randn(2, 20, 16)
    labels = torch.randint(0, 3, (40,))
    labels[::7] = 255
    text = torch.randn(5, 8)
    loss_fn = LOSSES[loss_name]
    optimiser = torch.optim.SGD(aligner.parameters(), lr=0.05)
    before = loss_fn(aligner(x).flatten(0, 1), labels, text, 0.5)
    optimiser.zero_grad()
    before.backward()
    optimiser.step()
    with torch.no_grad():
        after = loss_fn(aligner(x).flatten(0, 1), labels, text, 0.5)
    assert after < before


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"\['transformer', 'mlp', 'linear'\]"):
        Aligner(16, 8, kind="conv")
    with pytest.raises(ValueError, match="divide"):
        Aligner(10, 8, kind="transformer", num_heads=4)
    with pytest.raises(ValueError, match=r"\[B, N, 16\]"):
        Aligner(16, 8, kind="linear")(torch.randn(5, 16))
