"""Tests for latentwire.wire: byte layout, exact sizes, round trips within the quantization bound, errors, for v1
(float latents) and v2 (bit-packed FSQ codes), plus seeded fuzzing: every mutated payload of either version decodes
to a finite tensor of its declared shape or raises WireFormatError, nothing else.

Run: python -m pytest tests/test_wire.py -q
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from latentwire import wire
from latentwire.wire import (WireFormatError, code_header_nbytes, code_payload_nbytes, decode, decode_any,
                             decode_batch, decode_codes, decode_codes_batch, encode, encode_batch, encode_codes,
                             encode_codes_batch, payload_nbytes_bound, payload_version)

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


def test_v1_non_finite_fp16_values_and_bad_scales_raise():
    payload = bytearray(encode(_latent((2, 3)), "fp16"))
    for bad in (np.inf, -np.inf, np.nan):
        corrupt = bytearray(payload)
        corrupt[20:22] = np.array([bad], dtype="<f2").tobytes()
        with pytest.raises(WireFormatError, match="non-finite"):
            decode(bytes(corrupt))
    q = bytearray(encode(_latent((2, 3)), "int4"))
    for bad in (np.nan, -1.0):
        corrupt = bytearray(q)
        corrupt[16:18] = np.array([bad], dtype="<f2").tobytes()
        with pytest.raises(WireFormatError, match="scales must be finite and non-negative"):
            decode(bytes(corrupt))
    with pytest.raises(WireFormatError, match="must be bytes, bytearray or memoryview, got str"):
        decode("LWZ1")
    with pytest.raises(WireFormatError, match="got int"):
        decode(16)


# ---------------------------------------------------------------------------------------------------------------
# Version 2: bit-packed codes
# ---------------------------------------------------------------------------------------------------------------

LAYOUT = [1000] * 8 + [16] * 4  # 8 shared slots of FSQ [8, 5, 5, 5] (10 bits) + 4 private of [4, 4] (4 bits)
HASH = 0xA1B2C3D4


def _codes(levels, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([int(torch.randint(0, n, (1,), generator=g)) if n < 2**31 else
                         int(torch.randint(0, 2**31, (1,), generator=g)) * (n // 2**31) for n in levels])


def test_v2_bytes_match_the_documented_layout():
    # 999 = 0b1111100111 (10 bits), 3 = 0b0011, 15 = 0b1111 (4 bits each), MSB first, zero-padded: f9 cf c0.
    payload = encode_codes([999, 3, 15], [1000, 16, 16], 7)
    assert payload == b"LW" + bytes([2, 1, 3]) + (7).to_bytes(4, "little") + bytes([0xF9, 0xCF, 0xC0])
    assert encode_codes([1], [2], 0)[-1:] == b"\x80"  # the first code bit is the most significant bit of its byte
    assert decode_codes(payload, [1000, 16, 16], 7).tolist() == [999, 3, 15]


def test_v2_shared_and_private_example_is_header_plus_12_bytes():
    codes = _codes(LAYOUT)
    payload = encode_codes(codes, LAYOUT, HASH)
    assert code_header_nbytes(12) == 9
    assert len(payload) == 9 + 12 == code_payload_nbytes(LAYOUT)  # 8 * 10 + 4 * 4 = 96 bits
    out = decode_codes(payload, LAYOUT, HASH)
    assert out.dtype == torch.int64 and torch.equal(out, codes)


@pytest.mark.parametrize("slots, header", [(1, 9), (127, 9), (128, 10), (16383, 10), (16384, 11)])
def test_v2_header_size_grows_with_the_varint(slots, header):
    assert code_header_nbytes(slots) == header
    levels = [3] * slots  # 2 bits each
    assert code_payload_nbytes(levels) == header + -(-2 * slots // 8)


@pytest.mark.parametrize("levels", [
    [2], [3], [1000, 16], [8, 5, 5, 5], [1025, 2, 7, 2**32, 2**32 - 1, 3] * 3, [16] * 7 + [1000] * 5,
    [2**32], [5] * 200,
])
def test_v2_round_trip_exact_sizes(levels):
    for seed in range(3):
        codes = _codes(levels, seed)
        payload = encode_codes(codes, levels, HASH)
        total_bits = sum((n - 1).bit_length() for n in levels)
        assert len(payload) == code_header_nbytes(len(levels)) + -(-total_bits // 8) == code_payload_nbytes(levels)
        assert torch.equal(decode_codes(bytearray(payload), levels, HASH), codes)
    # Extremes of every codebook survive.
    for codes in ([0] * len(levels), [n - 1 for n in levels]):
        assert decode_codes(encode_codes(codes, levels, HASH), levels, HASH).tolist() == codes


def test_v2_accepts_tensors_lists_and_numpy():
    codes = _codes(LAYOUT)
    ref = encode_codes(codes, LAYOUT, HASH)
    assert encode_codes(codes.tolist(), LAYOUT, HASH) == ref
    assert encode_codes(codes.numpy().astype(np.uint16), LAYOUT, HASH) == ref
    assert encode_codes(codes.to(torch.int32), np.array(LAYOUT), np.uint32(HASH)) == ref


def test_v2_batch_and_dispatch():
    codes = torch.stack([_codes(LAYOUT, seed) for seed in range(5)])
    payloads = encode_codes_batch(codes, LAYOUT, HASH)
    assert len(payloads) == 5 and all(len(p) == code_payload_nbytes(LAYOUT) for p in payloads)
    assert torch.equal(decode_codes_batch(payloads, LAYOUT, HASH), codes)
    with pytest.raises(WireFormatError, match="no payloads"):
        decode_codes_batch([], LAYOUT, HASH)
    with pytest.raises(WireFormatError, match=r"codes \(B, S\)"):
        encode_codes_batch(codes[0], LAYOUT, HASH)
    v1 = encode(_latent((2, 3)), "int8")
    assert payload_version(v1) == 1 and payload_version(payloads[0]) == 2
    assert torch.equal(decode_any(v1), decode(v1))
    assert torch.equal(decode_any(payloads[1], LAYOUT, HASH), codes[1])
    with pytest.raises(WireFormatError, match="a v2 code payload: use decode_codes"):
        decode(payloads[0])
    with pytest.raises(WireFormatError, match="needs levels_per_slot and levels_hash"):
        decode_any(payloads[1])
    for junk in (b"", b"L", b"LW", b"LW\x03\x01", b"XXXX"):
        with pytest.raises(WireFormatError, match="not a LatentWire payload"):
            payload_version(junk)


def _v2(body: bytes, slots: int = 1, hash_: int = HASH, header: bytes = b"LW\x02\x01") -> bytes:
    return header + bytes([slots]) + hash_.to_bytes(4, "little") + body


def test_v2_malformed_payloads_name_the_problem():
    good = encode_codes(_codes(LAYOUT), LAYOUT, HASH)
    cases = [
        (good[:3], "truncated: 3 bytes"),
        (good[:4], "truncated inside the slot-count varint"),
        (good[:7], "truncated inside the levels hash"),
        (good[:-1], "make 21 bytes; got 20"),
        (good + b"\x00", "1 trailing bytes"),
        (b"Lw" + good[2:], "bad magic b'Lw'"),
        (good[:2] + b"\x03" + good[3:], "wire format version 3"),
        (encode(_latent((2, 3)), "int8"), r"version 90 .* \(a v1 float payload: use decode\)"),
        (good[:3] + b"\x07" + good[4:], "unknown v2 payload kind 7"),
        (good[:4] + b"\x0b" + good[5:], "payload holds 11 slots but the quantizer layout has 12"),
        (good[:5] + b"\x00\x00\x00\x00" + good[9:], "levels hash 0x00000000 does not match .* 0xa1b2c3d4"),
        (good[:4] + b"\x8c\x00" + good[5:], "not minimal"),
        (good[:4] + b"\xff\xff\xff\xff\x7f" + good[5:], "exceeds 2\\*\\*32 - 1"),
        (good[:4] + b"\xff" * 6, "longer than 5 bytes"),
    ]
    for payload, match in cases:
        with pytest.raises(WireFormatError, match=match):
            decode_codes(payload, LAYOUT, HASH)
    # 1000..1023 fit in 10 bits but are outside the codebook.
    with pytest.raises(WireFormatError, match=r"code 1023 of slot 0 is outside its codebook \[0, 1000\)"):
        decode_codes(_v2(b"\xff\xc0"), [1000], HASH)
    with pytest.raises(WireFormatError, match=r"code 3 of slot 1 is outside its codebook \[0, 3\)"):
        decode_codes(_v2(b"\x30", slots=2), [3, 3], HASH)  # 00 11 | 0000
    assert decode_codes(_v2(b"\x20", slots=2), [3, 3], HASH).tolist() == [0, 2]
    with pytest.raises(WireFormatError, match="non-zero padding bits"):
        decode_codes(_v2(b"\x00\x01"), [1000], HASH)  # 0000000000 | 000001
    with pytest.raises(WireFormatError, match="non-zero padding bits"):
        decode_codes(_v2(b"\x41"), [3], HASH)  # 01 | 000001
    # Every strict prefix fails.
    for cut in range(len(good)):
        with pytest.raises(WireFormatError):
            decode_codes(good[:cut], LAYOUT, HASH)


def test_v2_encode_and_layout_errors():
    with pytest.raises(WireFormatError, match=r"code 1000 of slot 2 is outside \[0, 1000\)"):
        encode_codes([0, 0, 1000], [1000] * 3, HASH)
    with pytest.raises(WireFormatError, match=r"code -1 of slot 0"):
        encode_codes([-1], [4], HASH)
    with pytest.raises(WireFormatError, match="2 codes for a layout of 3 slots"):
        encode_codes([0, 0], [4] * 3, HASH)
    with pytest.raises(WireFormatError, match="integer tensor, got torch.float32"):
        encode_codes(torch.zeros(3), [4] * 3, HASH)
    with pytest.raises(WireFormatError, match=r"levels_per_slot\[1\] must be an integer in \[2, 2\*\*32\], got 1"):
        encode_codes([0, 0], [4, 1], HASH)
    with pytest.raises(WireFormatError, match=r"levels_per_slot\[0\].*got 4294967297"):
        code_payload_nbytes([2**32 + 1])
    with pytest.raises(WireFormatError, match="non-empty list"):
        decode_codes(b"", [], HASH)
    with pytest.raises(WireFormatError, match="levels_hash must be an integer"):
        encode_codes([0], [4], 2**32)
    with pytest.raises(WireFormatError, match="levels_hash must be an integer"):
        decode_codes(b"", [4], -1)


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing: mutated payloads decode to finite tensors of their declared shape or raise WireFormatError
# ---------------------------------------------------------------------------------------------------------------


def _mutate(payload: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(payload)
    kind = rng.integers(7) if data else 5
    if kind == 0:  # flip 1-3 bits anywhere
        for _ in range(rng.integers(1, 4)):
            pos = rng.integers(len(data))
            data[pos] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # flip a bit in the header (where the interesting checks live)
        pos = rng.integers(min(len(data), 16))
        data[pos] ^= 1 << int(rng.integers(8))
    elif kind == 2:  # insert bytes
        pos = rng.integers(len(data) + 1)
        data[pos:pos] = rng.integers(0, 256, rng.integers(1, 4), dtype=np.uint8).tobytes()
    elif kind == 3:  # delete bytes
        pos = rng.integers(len(data))
        del data[pos:pos + int(rng.integers(1, 4))]
    elif kind == 4:  # truncate
        data = data[: rng.integers(len(data))]
    elif kind == 5:  # append bytes
        data += rng.integers(0, 256, rng.integers(1, 6), dtype=np.uint8).tobytes()
    else:  # random bytes behind a valid magic (or none at all)
        prefix = bytes(data[: rng.integers(0, 5)])
        data = bytearray(prefix + rng.integers(0, 256, rng.integers(0, 40), dtype=np.uint8).tobytes())
    return bytes(data)


def test_fuzz_v1_mutations_never_escape():
    rng = np.random.default_rng(1234)
    bases = [encode(_latent(shape, seed=i, scale=5.0), precision, group_size=group)
             for i, (shape, group) in enumerate([((2, 7), 4), ((3, 5), 32), ((1, 1), 1), ((8, 64), 16)])
             for precision in BITS]
    outcomes = {"ok": 0, "error": 0}
    for i in range(4800):
        payload = _mutate(bases[i % len(bases)], rng)
        try:
            out = decode(payload)
        except WireFormatError:
            outcomes["error"] += 1
            continue
        slots, dim = struct.unpack_from("<IIH", payload, 6)[:2]
        assert out.dtype == torch.float32 and out.shape == (slots, dim), payload.hex()
        assert torch.isfinite(out).all(), payload.hex()
        outcomes["ok"] += 1
    assert outcomes["ok"] > 300 and outcomes["error"] > 300, outcomes  # both paths really exercised


def test_fuzz_v2_mutations_never_escape():
    rng = np.random.default_rng(5678)
    layouts = [LAYOUT, [3, 3, 3], [2**32, 7], [5] * 130]
    bases = [(encode_codes(_codes(levels, seed), levels, HASH), levels) for seed in range(2) for levels in layouts]
    outcomes = {"ok": 0, "error": 0}
    for i in range(3000):
        base, levels = bases[i % len(bases)]
        payload = _mutate(base, rng)
        try:
            out = decode_codes(payload, levels, HASH)
        except WireFormatError:
            outcomes["error"] += 1
            continue
        assert out.dtype == torch.int64 and out.shape == (len(levels),), payload.hex()
        assert ((out >= 0) & (out < torch.tensor(levels))).all(), payload.hex()
        outcomes["ok"] += 1
        # decode_any dispatches the same bytes the same way.
        assert torch.equal(decode_any(payload, levels, HASH), out)
    assert outcomes["ok"] > 200 and outcomes["error"] > 300, outcomes


def test_fuzz_decode_any_on_random_bytes():
    rng = np.random.default_rng(9)
    for n in range(2000):
        prefix = [b"", b"LW", b"LWZ1", b"LW\x02", b"LW\x02\x01"][n % 5]
        payload = prefix + rng.integers(0, 256, rng.integers(0, 30), dtype=np.uint8).tobytes()
        try:
            out = decode_any(payload, [7, 300], 42)
        except WireFormatError:
            continue
        assert torch.isfinite(out.float()).all()
