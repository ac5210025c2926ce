"""The wire format: how one example's latent (M slots x D floats) travels as bytes, and how many.

A latent `(S, D)` is flattened to N = S*D values and sent as fp16, or quantized with symmetric per-group absmax
scaling: consecutive runs of `group_size` values share one fp16 scale (the last group may be shorter; it is
quantized as if padded with zeros, and the padding is not sent since the header gives S and D).

    int8: scale = absmax / 127, q = round(x / scale) in [-127, 127], one byte per value
    int4: scale = absmax /   7, q = round(x / scale) in [-7, 7], two values per byte (low nibble first)

The scale is rounded *up* to the next fp16 value before quantizing, so |x / scale| <= qmax never clips, a non-zero
group never gets a zero scale, and the decoded value q * scale (exact in fp32) is within scale / 2 of x, where
`scale` is the fp16 number actually on the wire.

Layout, little-endian (`struct` format `<4sBBIIH`, 16 bytes of header):

    magic b"LWZ1" | version u8 (=1) | precision u8 (0 fp16, 1 int8, 2 int4) | slots u32 | dim u32 |
    group_size u16 (0 for fp16) | scales: ceil(N / group_size) x fp16 | data: 2N (fp16), N (int8), ceil(N/2) (int4)

`payload_nbytes_bound` gives that length exactly; eval reports the mean `len(encode(...))` per example.

Run the tests: `python -m pytest tests/test_wire.py -q`. Quick look:
    python -c "import torch; from latentwire import wire; print(len(wire.encode(torch.randn(16, 256), 'int4')))"
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import torch

MAGIC = b"LWZ1"
VERSION = 1
HEADER = struct.Struct("<4sBBIIH")
HEADER_NBYTES = HEADER.size  # 16
PRECISIONS = {"fp16": 0, "int8": 1, "int4": 2}
_PRECISION_NAMES = {code: name for name, code in PRECISIONS.items()}
_QMAX = {"int8": 127, "int4": 7}
_FP16_MAX = float(np.finfo(np.float16).max)  # 65504
_U16_MAX, _U32_MAX = 2**16 - 1, 2**32 - 1


class WireFormatError(ValueError):
    """A latent that cannot be encoded, or bytes that are not a valid payload."""


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise WireFormatError(f"unknown precision {precision!r}; expected one of {sorted(PRECISIONS)}")


def _check_sizes(slots: int, dim: int, precision: str, group_size: int) -> None:
    _check_precision(precision)
    if not (1 <= slots <= _U32_MAX and 1 <= dim <= _U32_MAX):
        raise WireFormatError(f"slots and dim must be in [1, {_U32_MAX}], got slots={slots}, dim={dim}")
    if precision != "fp16" and not 1 <= group_size <= _U16_MAX:
        raise WireFormatError(f"group_size must be in [1, {_U16_MAX}], got {group_size}")


def _num_groups(n: int, group_size: int) -> int:
    return -(-n // group_size)


def payload_nbytes_bound(slots: int, dim: int, precision: str = "int8", group_size: int = 32) -> int:
    """Length in bytes of `encode(latent (slots, dim), precision, group_size)`; exact, not just an upper bound."""
    _check_sizes(slots, dim, precision, group_size)
    n = slots * dim
    if precision == "fp16":
        return HEADER_NBYTES + 2 * n
    scales = 2 * _num_groups(n, group_size)
    data = n if precision == "int8" else (n + 1) // 2
    return HEADER_NBYTES + scales + data


def _fp16_scale_round_up(scale: np.ndarray) -> np.ndarray:
    """Smallest fp16 >= each (non-negative, float64) scale."""
    s16 = scale.astype(np.float16)
    low = s16.astype(np.float64) < scale
    # For non-negative finite fp16 numbers the bit patterns are ordered, so +1 is the next representable value.
    bits = s16.view(np.uint16)
    bits[low] += 1
    return bits.view(np.float16)


def encode(latent: torch.Tensor, precision: str = "int8", group_size: int = 32) -> bytes:
    """Serialize one latent `(S, D)` (any float dtype, any device) to wire bytes."""
    if not isinstance(latent, torch.Tensor) or latent.dim() != 2:
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise WireFormatError(f"encode expects one latent tensor (S, D), got {shape}")
    slots, dim = latent.shape
    _check_sizes(slots, dim, precision, group_size)
    x = latent.detach().to("cpu", torch.float64).reshape(-1).numpy()
    if not np.isfinite(x).all():
        raise WireFormatError(f"latent holds {int((~np.isfinite(x)).sum())} NaN/inf values; refusing to encode")

    if precision == "fp16":
        if np.abs(x).max() > _FP16_MAX:
            raise WireFormatError(f"latent value {np.abs(x).max():.4g} overflows fp16 (max {_FP16_MAX})")
        header = HEADER.pack(MAGIC, VERSION, PRECISIONS[precision], slots, dim, 0)
        return header + x.astype("<f2").tobytes()

    n, qmax = x.size, _QMAX[precision]
    padded = np.zeros(_num_groups(n, group_size) * group_size)
    padded[:n] = x
    groups = padded.reshape(-1, group_size)
    exact_scales = np.abs(groups).max(axis=1) / qmax
    if exact_scales.max() > _FP16_MAX:
        raise WireFormatError(f"latent value {np.abs(x).max():.4g} is too large: its {precision} scale "
                              f"(absmax / {qmax}) overflows fp16 (max {_FP16_MAX})")
    scales = _fp16_scale_round_up(exact_scales)
    s = scales.astype(np.float64)[:, None]
    safe = np.where(s > 0, s, 1.0)  # all-zero groups: scale 0, q 0
    q = np.clip(np.rint(groups / safe), -qmax, qmax).astype(np.int8).reshape(-1)[:n]

    if precision == "int8":
        data = q.tobytes()
    else:
        nibbles = (q.astype(np.uint8) & 0x0F)
        if n % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        data = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
    header = HEADER.pack(MAGIC, VERSION, PRECISIONS[precision], slots, dim, group_size)
    return header + scales.astype("<f2").tobytes() + data


def decode(payload: bytes | bytearray | memoryview) -> torch.Tensor:
    """Parse wire bytes back to a float32 latent `(S, D)`; raises WireFormatError on any malformed payload."""
    payload = bytes(payload)
    if len(payload) < HEADER_NBYTES:
        raise WireFormatError(f"payload truncated: expected at least {HEADER_NBYTES} header bytes, "
                              f"got {len(payload)}")
    magic, version, code, slots, dim, group_size = HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise WireFormatError(f"bad magic {magic!r}: not a LatentWire payload (expected {MAGIC!r})")
    if version != VERSION:
        raise WireFormatError(f"unknown wire format version {version} (this reader knows version {VERSION})")
    if code not in _PRECISION_NAMES:
        raise WireFormatError(f"unknown precision code {code} (known: {_PRECISION_NAMES})")
    precision = _PRECISION_NAMES[code]
    if precision == "fp16" and group_size != 0:
        raise WireFormatError(f"fp16 payload with group_size {group_size}; expected 0")
    _check_sizes(slots, dim, precision, group_size)
    expected = payload_nbytes_bound(slots, dim, precision, group_size)
    if len(payload) < expected:
        raise WireFormatError(f"payload truncated: header says {precision} ({slots}, {dim}), group {group_size}, "
                              f"which is {expected} bytes; got {len(payload)}")
    if len(payload) > expected:
        raise WireFormatError(f"{len(payload) - expected} trailing bytes after a {expected}-byte {precision} "
                              f"payload ({slots}, {dim})")

    n = slots * dim
    if precision == "fp16":
        values = np.frombuffer(payload, dtype="<f2", offset=HEADER_NBYTES).astype(np.float32)
        if not np.isfinite(values).all():
            raise WireFormatError("corrupt fp16 payload: non-finite values")
        return torch.from_numpy(values).reshape(slots, dim)

    n_groups = _num_groups(n, group_size)
    scales = np.frombuffer(payload, dtype="<f2", count=n_groups, offset=HEADER_NBYTES).astype(np.float32)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise WireFormatError("corrupt payload: scales must be finite and non-negative")
    raw = np.frombuffer(payload, dtype=np.uint8, offset=HEADER_NBYTES + 2 * n_groups)
    if precision == "int8":
        q = raw.view(np.int8).astype(np.float32)
    else:
        nibbles = np.empty(2 * raw.size, dtype=np.int16)
        nibbles[0::2], nibbles[1::2] = raw & 0x0F, raw >> 4
        q = (np.where(nibbles >= 8, nibbles - 16, nibbles)[:n]).astype(np.float32)
    padded = np.zeros(n_groups * group_size, dtype=np.float32)
    padded[:n] = q
    values = (padded.reshape(n_groups, group_size) * scales[:, None]).reshape(-1)[:n]
    return torch.from_numpy(np.ascontiguousarray(values)).reshape(slots, dim)


def encode_batch(latents: torch.Tensor, precision: str = "int8", group_size: int = 32) -> list[bytes]:
    """One payload per example of `latents (B, S, D)`; wire size is counted per example, never per batch."""
    if not isinstance(latents, torch.Tensor) or latents.dim() != 3:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise WireFormatError(f"encode_batch expects latents (B, S, D), got {shape}")
    return [encode(latent, precision, group_size) for latent in latents]


def decode_batch(payloads: Sequence[bytes]) -> torch.Tensor:
    """Decode payloads of equal shape to a float32 tensor `(B, S, D)`."""
    if not payloads:
        raise WireFormatError("decode_batch got no payloads")
    latents = [decode(p) for p in payloads]
    shapes = {tuple(t.shape) for t in latents}
    if len(shapes) != 1:
        raise WireFormatError(f"decode_batch needs payloads of one shape, got {sorted(shapes)}")
    return torch.stack(latents)
