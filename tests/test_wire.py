"""Tests for latentwire.wire: byte layout, exact sizes, round trips within the quantization bound, errors.

Run: python -m pytest tests/test_wire.py -q
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from latentwire import wire
from latentwire.wire import WireFormatError, decode, decode_batch, encode, encode_batch, payload_nbytes_bound

BITS = {"fp16": 16, "int8": 8, "int4": 4}
SHAPES = [(1, 7), (1, 1), (5, 1), (3, 33), (16, 256), (2, 31)]


def _scales(payload: bytes) -> np.ndarray:
    """The fp16 scales as sent, read straight from the documented layout (16-byte header, then scales)."""
    slots, dim, group = struct.unpack_from("<IIH", payload, 6)
    n_groups = -(-slots * dim // group)
    return np.frombuffer(payload, dtype="<f2", count=n_groups, offset=16).astype(np.float64)


def _latent(shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


# ---------------------------------------------------------------------------------------------------------------
# Layout and sizes
# ---------------------------------------------------------------------------------------------------------------


def test_int4_bytes_match_the_documented_layout():
    payload = encode(torch.tensor([[7.0, -7.0, 1.0]]), "int4", group_size=32)
    # absmax 7 -> scale 1.0 (fp16 0x3C00); q = 7, -7, 1 -> nibbles 0x7, 0x9, 0x1, low nibble first.
    expected = b"LWZ1" + bytes([1, 2]) + (1).to_bytes(4, "little") + (3).to_bytes(4, "little") \
        + (32).to_bytes(2, "little") + b"\x00\x3c" + bytes([0x97, 0x01])
    assert payload == expected
    assert decode(payload).tolist() == [[7.0, -7.0, 1.0]]


def test_int8_and_fp16_bytes_match_the_documented_layout():
    x = torch.tensor([[127.0], [-64.0]])
    assert encode(x, "int8", group_size=2) == (
        b"LWZ1\x01\x01" + struct.pack("<IIH", 2, 1, 2) + b"\x00\x3c" + bytes([0x7F, 0xC0]))
    assert encode(x, "fp16") == b"LWZ1\x01\x00" + struct.pack("<IIH", 2, 1, 0) + np.array(
        [127.0, -64.0], dtype="<f2").tobytes()


@pytest.mark.parametrize("shape, group, expected", [
    # (S, D), group: {precision: header + scales + data}
    ((1, 7), 32, {"fp16": 16 + 14, "int8": 16 + 2 + 7, "int4": 16 + 2 + 4}),
    ((16, 256), 32, {"fp16": 16 + 8192, "int8": 16 + 256 + 4096, "int4": 16 + 256 + 2048}),
    ((3, 33), 32, {"fp16": 16 + 198, "int8": 16 + 8 + 99, "int4": 16 + 8 + 50}),
    ((2, 5), 3, {"fp16": 16 + 20, "int8": 16 + 8 + 10, "int4": 16 + 8 + 5}),
])
def test_exact_payload_lengths(shape, group, expected):
    for precision, nbytes in expected.items():
        payload = encode(_latent(shape), precision, group_size=group)
        assert len(payload) == nbytes == payload_nbytes_bound(*shape, precision, group)


def test_size_ordering_and_overhead_at_realistic_sizes():
    slots, dim = 16, 256
    x = _latent((slots, dim))
    sizes = {p: len(encode(x, p)) for p in BITS}
    assert sizes["fp16"] > sizes["int8"] > sizes["int4"]
    for precision in ("fp16", "int8"):
        assert sizes[precision] <= 1.10 * slots * dim * BITS[precision] / 8 + 64
    # int4 with 32-value groups spends 16/32 = 0.5 bit per value on scales (12.5% of 4 bits), so its honest
    # budget includes that; with 64-value groups it fits the plain 10% + 64 B allowance.
    assert sizes["int4"] <= 1.10 * slots * dim * (4 + 16 / 32) / 8 + 64
    assert len(encode(x, "int4", group_size=64)) <= 1.10 * slots * dim * 4 / 8 + 64


# ---------------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_fp16_round_trip_is_exact_for_fp16_values(shape):
    x = _latent(shape, scale=30.0).half().float()
    y = decode(encode(x, "fp16"))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(x, y)


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group", [32, 7, 1])
def test_quantized_round_trip_within_half_a_step(precision, shape, group):
    x = _latent(shape, seed=shape[1] + group, scale=3.0)
    x[0, 0] = 0.0  # includes an exact zero
    payload = encode(x, precision, group_size=group)
    y = decode(payload)
    assert y.dtype == torch.float32 and y.shape == x.shape
    scales = _scales(payload)
    per_value = np.repeat(scales, group)[: x.numel()].reshape(shape)
    err = np.abs(x.double().numpy() - y.double().numpy())
    assert (err <= per_value / 2).all()
    # The scales are the fp16 values just above absmax / qmax, so nothing clips.
    qmax = 127 if precision == "int8" else 7
    padded = np.zeros(len(scales) * group)
    padded[: x.numel()] = x.abs().reshape(-1).double().numpy()
    absmax = padded.reshape(-1, group).max(axis=1)
    assert (scales >= absmax / qmax).all()
    assert (scales.astype(np.float16).astype(np.float64) == scales).all()


def test_ragged_last_group_gets_its_own_scale():
    x = torch.tensor([[0.01, -0.02, 0.03, 0.04, 100.0, -50.0, 25.0]])  # groups of 4: [4 small] [3 large]
    payload = encode(x, "int8", group_size=4)
    scales = _scales(payload)
    assert len(scales) == 2 and scales[0] < 0.001 < 50 < scales[1] * 127
    assert (decode(payload)[0, :4] - x[0, :4]).abs().max() <= scales[0] / 2


def test_zeros_and_tiny_values():
    zeros = torch.zeros(2, 9)
    for precision in BITS:
        assert torch.equal(decode(encode(zeros, precision)), zeros)
    # absmax / 127 underflows fp16; rounding the scale up keeps it non-zero, so the values survive.
    tiny = torch.full((1, 4), 1e-7)
    payload = encode(tiny, "int8")
    assert _scales(payload)[0] > 0
    assert (decode(payload) - tiny).abs().max() <= _scales(payload)[0] / 2


def test_accepts_other_dtypes_grad_and_bytes_like():
    x = _latent((3, 10)).to(torch.bfloat16).requires_grad_()
    payload = encode(x, "int8")
    y = decode(bytearray(payload))
    assert torch.equal(y, decode(memoryview(payload)))
    assert (y - x.detach().float()).abs().max() <= _scales(payload).max() / 2


def test_batch_round_trip_is_per_example():
    latents = _latent((4, 6, 10))
    latents[2] *= 1000.0  # one loud example must not coarsen the others' scales
    payloads = encode_batch(latents, "int4", group_size=8)
    assert len(payloads) == 4 and all(len(p) == payload_nbytes_bound(6, 10, "int4", 8) for p in payloads)
    out = decode_batch(payloads)
    assert out.shape == (4, 6, 10)
    assert torch.equal(out[1], decode(payloads[1]))
    assert (out[0] - latents[0]).abs().max() < 1.0
    with pytest.raises(WireFormatError, match="one shape"):
        decode_batch([payloads[0], encode(_latent((2, 3)), "int4")])
    with pytest.raises(WireFormatError, match="no payloads"):
        decode_batch([])
    with pytest.raises(WireFormatError, match=r"\(B, S, D\)"):
        encode_batch(latents[0], "int8")


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", list(BITS))
def test_truncated_and_trailing_payloads(precision):
    payload = encode(_latent((2, 7)), precision, group_size=4)
    full = len(payload)
    with pytest.raises(WireFormatError, match=f"{full} bytes; got {full - 1}"):
        decode(payload[:-1])
    with pytest.raises(WireFormatError, match="expected at least 16 header bytes, got 10"):
        decode(payload[:10])
    with pytest.raises(WireFormatError, match="3 trailing bytes"):
        decode(payload + b"abc")


def test_header_errors():
    payload = bytearray(encode(_latent((2, 3)), "int8"))
    bad = bytes(b"XXXX" + payload[4:])
    with pytest.raises(WireFormatError, match="bad magic b'XXXX'"):
        decode(bad)
    with pytest.raises(WireFormatError, match="unknown wire format version 9"):
        decode(bytes(payload[:4] + bytes([9]) + payload[5:]))
    with pytest.raises(WireFormatError, match="unknown precision code 7"):
        decode(bytes(payload[:5] + bytes([7]) + payload[6:]))
    with pytest.raises(WireFormatError, match="group_size"):
        decode(bytes(payload[:14] + b"\x00\x00" + payload[16:]))
    corrupt = bytearray(payload)
    corrupt[16:18] = np.array([np.inf], dtype="<f2").tobytes()
    with pytest.raises(WireFormatError, match="scales"):
        decode(bytes(corrupt))


def test_encode_rejects_bad_input():
    for value in (float("nan"), float("inf"), -float("inf")):
        x = _latent((2, 3))
        x[1, 2] = value
        for precision in BITS:
            with pytest.raises(WireFormatError, match="NaN/inf"):
                encode(x, precision)
    with pytest.raises(WireFormatError, match="unknown precision 'int2'"):
        encode(_latent((2, 3)), "int2")
    with pytest.raises(WireFormatError, match=r"\(S, D\)"):
        encode(_latent((2, 3, 4)), "int8")
    with pytest.raises(WireFormatError, match="overflows fp16"):
        encode(torch.tensor([[1e5]]), "fp16")
    with pytest.raises(WireFormatError, match="overflows fp16"):
        encode(torch.tensor([[1e7]]), "int8")
    with pytest.raises(WireFormatError, match="group_size"):
        encode(_latent((2, 3)), "int8", group_size=0)
    assert issubclass(WireFormatError, ValueError)
    assert wire.HEADER_NBYTES == 16
