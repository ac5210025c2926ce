"""Tests for latentwire.quantizer (FSQ): exact level counts, straight-through gradients, code <-> latent round trips,
the shared/private slot layout and its hash, and config validation.

Run: python -m pytest tests/test_quantizer.py -q
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from latentwire import wire
from latentwire.quantizer import (FSQ, QuantizerConfig, SlotQuantizer, levels_layout_hash,
                                  validate_quantizer_config)


def _identity_fsq(levels: list[int]) -> FSQ:
    """FSQ with d_z = len(levels) and project_in = identity, so the test drives each dimension directly."""
    fsq = FSQ(len(levels), levels)
    with torch.no_grad():
        fsq.project_in.weight.copy_(torch.eye(len(levels)))
        fsq.project_in.bias.zero_()
    return fsq


def _grid(levels: list[int], span: float = 3.0) -> torch.Tensor:
    """Every combination of 4 * L_i values in [-span, span] per dimension i: (prod(4 * L_i), len(levels))."""
    axes = [torch.linspace(-span, span, 4 * level) for level in levels]
    return torch.cartesian_prod(*axes).reshape(-1, len(levels))


@pytest.mark.parametrize("levels", [[2], [3], [4], [5], [8], [7, 2], [3, 4], [8, 5, 5, 5], [1000], [65536]])
def test_each_dimension_takes_exactly_its_level_count(levels):
    fsq = _identity_fsq(levels)
    for dim, level in enumerate(levels):
        h = torch.zeros(20001, len(levels))
        h[:, dim] = torch.linspace(-12, 12, 20001)
        _, codes = fsq(h)
        per_dim = fsq.codes_to_indices(codes)[:, dim]
        if level <= 20001:
            assert sorted(per_dim.unique().tolist()) == list(range(level))
        assert per_dim.min() == 0 and per_dim.max() == level - 1
        # Monotone: a larger pre-activation never gives a smaller index.
        assert (per_dim.diff() >= 0).all()


@pytest.mark.parametrize("levels", [[3, 4], [2, 2, 2], [8, 5, 5, 5]])
def test_every_code_is_reachable_and_round_trips(levels):
    fsq = _identity_fsq(levels)
    _, codes = fsq(_grid(levels))
    size = math.prod(levels)
    assert fsq.codebook_size == size and codes.dtype == torch.int64
    assert sorted(codes.unique().tolist()) == list(range(size))
    # Mixed radix, dimension 0 least significant: enumerate per-dimension indices and map both ways.
    all_indices = torch.tensor(list(itertools.product(*[range(v) for v in reversed(levels)])))[:, list(
        reversed(range(len(levels))))]
    all_codes = fsq.indices_to_codes(all_indices)
    assert all_codes.tolist() == list(range(size))
    assert torch.equal(fsq.codes_to_indices(all_codes), all_indices)
    # Distinct codes give distinct quantized points (before project_out), hence an injective codebook.
    book = fsq.codes_to_latent(torch.arange(size))
    assert book.shape == (size, len(levels))
    assert len({tuple(row) for row in book.tolist()}) == size


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [4, 4], [2, 7, 3]])
def test_codes_to_latent_equals_forward_bit_for_bit(levels):
    torch.manual_seed(0)
    fsq = FSQ(16, levels)
    z = torch.randn(3, 7, 16) * 3
    z_hat, codes = fsq(z)
    assert z_hat.shape == (3, 7, 16) and codes.shape == (3, 7)
    assert (codes >= 0).all() and (codes < fsq.codebook_size).all()
    assert torch.equal(fsq.codes_to_latent(codes), z_hat)


def test_zero_maps_to_the_centre_code_and_normalized_values():
    fsq = _identity_fsq([3, 4, 5])
    _, codes = fsq(torch.zeros(1, 3))
    assert fsq.codes_to_indices(codes).tolist() == [[1, 2, 2]]
    # project_out = identity shows the normalized grid r / (L // 2).
    with torch.no_grad():
        fsq.project_out.weight.copy_(torch.eye(3))
        fsq.project_out.bias.zero_()
    grid = fsq.codes_to_latent(torch.arange(fsq.codebook_size))
    assert sorted(grid[:, 0].unique().tolist()) == [-1.0, 0.0, 1.0]
    assert sorted(grid[:, 1].unique().tolist()) == [-1.0, -0.5, 0.0, 0.5]
    assert sorted(grid[:, 2].unique().tolist()) == [-1.0, -0.5, 0.0, 0.5, 1.0]


def test_straight_through_gradients_reach_input_and_both_projections():
    torch.manual_seed(0)
    fsq = FSQ(12, [8, 5, 5, 5])
    z = torch.randn(4, 3, 12, requires_grad=True)
    target = torch.randn(4, 3, 12)
    z_hat, _ = fsq(z)
    ((z_hat - target) ** 2).mean().backward()
    for name, grad in [("z", z.grad), ("project_in.weight", fsq.project_in.weight.grad),
                       ("project_in.bias", fsq.project_in.bias.grad),
                       ("project_out.weight", fsq.project_out.weight.grad)]:
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # The estimator's gradient at the bounded value is 1: d z_hat / d h equals that of the unrounded path.
    h = torch.randn(5, 4, requires_grad=True)
    ident = _identity_fsq([8, 5, 5, 5])
    bounded = torch.tanh(h + ident._shift) * ident._half - ident._offset
    (g_ref,) = torch.autograd.grad((ident.project_out(bounded / ident._half_width)).sum(), h)
    (g_ste,) = torch.autograd.grad(ident(h)[0].sum(), h)
    torch.testing.assert_close(g_ste, g_ref)


def test_training_moves_the_quantized_output_toward_a_target():
    torch.manual_seed(0)
    fsq = FSQ(8, [5, 5, 5])
    z, target = torch.randn(64, 8), torch.randn(64, 8)
    opt = torch.optim.Adam(fsq.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = ((fsq(z)[0] - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_determinism_and_dtype():
    torch.manual_seed(1)
    a = FSQ(16, [8, 5, 5, 5])
    torch.manual_seed(1)
    b = FSQ(16, [8, 5, 5, 5])
    z = torch.randn(5, 16)
    za, ca = a(z)
    zb, cb = b(z)
    assert torch.equal(ca, cb) and torch.equal(za, zb)
    assert torch.equal(a(z)[1], ca)
    # bf16 input is read in the parameters' dtype; codes match the fp32 path on the same values.
    z16 = z.to(torch.bfloat16)
    assert torch.equal(a(z16)[1], a(z16.float())[1])
    assert a(z16)[0].dtype == torch.float32


def test_nan_input_still_gives_in_range_codes():
    fsq = FSQ(4, [3, 4])
    z = torch.full((2, 4), float("nan"))
    _, codes = fsq(z)
    assert ((codes >= 0) & (codes < 12)).all()


def test_bits_and_errors():
    assert FSQ(4, [8, 5, 5, 5]).bits_per_slot == 10
    assert FSQ(4, [4, 4]).bits_per_slot == 4
    assert FSQ(4, [2]).bits_per_slot == 1
    assert FSQ(4, [65536, 65536]).bits_per_slot == 32
    fsq = FSQ(4, [3, 4])
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        fsq.codes_to_latent(torch.tensor([12]))
    with pytest.raises(ValueError, match=r"d_z=4"):
        fsq(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"levels\.1"):
        FSQ(4, [8, 1])


def _cfg(**kw) -> QuantizerConfig:
    return QuantizerConfig(kind="fsq", **kw)


def test_slot_quantizer_layout_codes_and_latents():
    torch.manual_seed(0)
    q = SlotQuantizer(d_z=16, m_shared=8, m_private_total=4, cfg=_cfg(levels=[8, 5, 5, 5], private_levels=[4, 4]))
    assert q.levels_per_slot() == [1000] * 8 + [16] * 4
    assert q.bits_per_slot() == [10] * 8 + [4] * 4
    z = torch.randn(3, 12, 16, requires_grad=True)
    z_hat, codes = q(z)
    assert z_hat.shape == (3, 12, 16) and codes.shape == (3, 12) and codes.dtype == torch.int64
    assert (codes[:, :8] < 1000).all() and (codes[:, 8:] < 16).all() and (codes >= 0).all()
    assert torch.equal(q.codes_to_latent(codes), z_hat)
    # Shared slots go through the shared FSQ only, private slots through the private one.
    assert torch.equal(z_hat[:, :8], q.shared(z[:, :8])[0])
    assert torch.equal(z_hat[:, 8:], q.private(z[:, 8:])[0])
    z_hat.sum().backward()
    assert z.grad.abs().sum() > 0 and q.private.project_in.weight.grad.abs().sum() > 0
    # Through the wire and back: the receiver sees exactly what training saw.
    payloads = wire.encode_codes_batch(codes, q.levels_per_slot(), q.levels_hash())
    assert all(len(p) == 9 + 12 for p in payloads)
    decoded = wire.decode_codes_batch(payloads, q.levels_per_slot(), q.levels_hash())
    assert torch.equal(decoded, codes)
    assert torch.equal(q.codes_to_latent(decoded), z_hat)


def test_slot_quantizer_private_defaults_to_shared_levels_and_no_private_slots():
    q = SlotQuantizer(8, 3, 2, _cfg(levels=[5, 3]))
    assert q.levels_per_slot() == [15] * 5 and q.private is not None and q.private is not q.shared
    only_shared = SlotQuantizer(8, 3, 0, _cfg(levels=[5, 3]))
    assert only_shared.private is None
    z_hat, codes = only_shared(torch.randn(2, 3, 8))
    assert z_hat.shape == (2, 3, 8) and codes.shape == (2, 3)
    with pytest.raises(ValueError, match="M_total = m_shared 3 \\+ m_private_total 0 = 3 slots, got 4"):
        only_shared(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"\(B, M_total, d_z\)"):
        only_shared(torch.randn(3, 8))


def test_levels_hash_is_stable_and_tracks_the_layout():
    base = SlotQuantizer(8, 8, 4, _cfg(levels=[8, 5, 5, 5], private_levels=[4, 4])).levels_hash()
    assert base == levels_layout_hash([8, 5, 5, 5], [4, 4], 8, 4)
    assert 0 <= base < 2**32
    assert SlotQuantizer(8, 8, 4, _cfg(levels=[8, 5, 5, 5], private_levels=[4, 4])).levels_hash() == base
    # Same layout written with an empty private_levels hashes like the explicit one.
    assert levels_layout_hash([4, 4], [], 2, 2) == levels_layout_hash([4, 4], [4, 4], 2, 2)
    others = {levels_layout_hash([8, 5, 5, 5], [4, 4], 7, 5), levels_layout_hash([8, 5, 5, 5], [4, 4], 8, 3),
              levels_layout_hash([5, 5, 5, 8], [4, 4], 8, 4), levels_layout_hash([8, 5, 5, 5], [16], 8, 4),
              levels_layout_hash([8, 5, 5, 5], [], 8, 4)}
    assert base not in others and len(others) == 5


@pytest.mark.parametrize("cfg, match", [
    (QuantizerConfig(kind="vq"), r"encoder\.quantizer\.kind: expected one of \['off', 'fsq'\]"),
    (_cfg(levels=[]), r"encoder\.quantizer\.levels: expected a non-empty list"),
    (_cfg(levels=[8, 1]), r"encoder\.quantizer\.levels\.1: .* \[2, 65536\], got 1"),
    (_cfg(levels=[8, 2.5]), r"encoder\.quantizer\.levels\.1"),
    (_cfg(levels=[8, True]), r"encoder\.quantizer\.levels\.1"),
    (_cfg(levels=[65537]), r"encoder\.quantizer\.levels\.0"),
    (_cfg(levels=[65536, 65536, 2]), r"encoder\.quantizer\.levels: product .* over 2\*\*32"),
    (_cfg(private_levels=[4, 0]), r"encoder\.quantizer\.private_levels\.1"),
])
def test_config_validation_names_the_field(cfg, match):
    with pytest.raises(ValueError, match=match):
        validate_quantizer_config(cfg)
    with pytest.raises(ValueError, match=match):
        SlotQuantizer(8, 2, 2, cfg)


def test_off_config_is_valid_but_builds_no_quantizer():
    validate_quantizer_config(QuantizerConfig())
    validate_quantizer_config(QuantizerConfig(kind="off", levels=[]))  # levels only matter with fsq
    with pytest.raises(ValueError, match="encoder.quantizer.kind: SlotQuantizer needs 'fsq'"):
        SlotQuantizer(8, 2, 2, QuantizerConfig())
    with pytest.raises(ValueError, match="at least one slot"):
        SlotQuantizer(8, 0, 0, _cfg())
