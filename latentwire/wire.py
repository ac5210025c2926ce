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

Version 2 carries the integer codes of a learned discrete latent (`latentwire/quantizer.py`, FSQ): one code per slot,
slot s's code in [0, levels_per_slot[s]) where levels_per_slot[s] is that slot's codebook size. Layout:

    magic b"LW" | version u8 (=2) | kind u8 (1 = FSQ codes) | slots: unsigned LEB128 varint (minimal, 1..5 bytes) |
    levels_hash u32 little-endian | codes, bit-packed | zero bits up to the next byte boundary

Slot s takes exactly bits_s = ceil(log2(levels_per_slot[s])) bits. Packing is MSB-first: the codes are written in
slot order, each most significant bit first, filling every byte from its most significant bit; the unused low bits
of the last byte are 0. So the header is 9 bytes for 1..127 slots, 10 bytes for 128..16383 slots (`code_header_nbytes`)
and a payload is `code_header_nbytes(S) + ceil(sum(bits_s) / 8)` bytes (`code_payload_nbytes`): 8 shared slots of
FSQ levels [8, 5, 5, 5] (1000 codes, 10 bits) + 4 private slots of [4, 4] (16 codes, 4 bits) is 9 + 12 = 21 bytes.
The reader must know the layout (levels_per_slot) and checks it against the slot count and `levels_hash`
(`SlotQuantizer.levels_hash()`), so a payload is never decoded with another checkpoint's quantizer.

A v1 payload starts with b"LWZ1" and a v2 payload with b"LW\x02", so `payload_version` / `decode_any` tell them apart
by their first bytes. Every malformed payload of either version raises WireFormatError, never anything else.

Run the tests: `python -m pytest tests/test_wire.py -q`. Quick look:
    python -c "import torch; from latentwire import wire; print(len(wire.encode(torch.randn(16, 256), 'int4')))"
    python -c "from latentwire import wire; print(wire.encode_codes([999, 3, 15], [1000, 16, 16], 7).hex())"
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
CODE_MAGIC, CODE_VERSION, KIND_CODES = b"LW", 2, 1  # v2: magic, version byte, kind byte of FSQ codes
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


def _as_bytes(payload: object) -> bytes:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"a payload must be bytes, bytearray or memoryview, got {type(payload).__name__}")
    return bytes(payload)


def decode(payload: bytes | bytearray | memoryview) -> torch.Tensor:
    """Parse wire bytes back to a float32 latent `(S, D)`; raises WireFormatError on any malformed payload."""
    payload = _as_bytes(payload)
    if len(payload) < HEADER_NBYTES:
        raise WireFormatError(f"payload truncated: expected at least {HEADER_NBYTES} header bytes, "
                              f"got {len(payload)}")
    magic, version, code, slots, dim, group_size = HEADER.unpack_from(payload)
    if magic != MAGIC:
        hint = "; a v2 code payload: use decode_codes" if magic[:3] == CODE_MAGIC + bytes([CODE_VERSION]) else ""
        raise WireFormatError(f"bad magic {magic!r}: not a LatentWire payload (expected {MAGIC!r}{hint})")
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


# ---------------------------------------------------------------------------------------------------------------
# Version 2: bit-packed FSQ codes
# ---------------------------------------------------------------------------------------------------------------

_MAX_CODEBOOK = 2**32  # a slot's code is at most 32 bits
_FIXED_NBYTES = len(CODE_MAGIC) + 2 + 4  # magic, version, kind, levels hash; the varint comes on top


def _varint(value: int) -> bytes:
    """Unsigned LEB128: 7 bits per byte, least significant group first, high bit = more bytes follow."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(payload: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the minimal unsigned LEB128 u32 at `pos`; WireFormatError otherwise."""
    value = 0
    for i in range(5):
        if pos + i >= len(payload):
            raise WireFormatError(f"payload truncated inside the slot-count varint ({len(payload)} bytes)")
        byte = payload[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i and byte == 0:
                raise WireFormatError("slot-count varint is not minimal (ends with a 0x00 continuation byte)")
            if value > _U32_MAX:
                raise WireFormatError(f"slot-count varint {value} exceeds 2**32 - 1")
            return value, pos + i + 1
    raise WireFormatError("slot-count varint longer than 5 bytes")


def _check_layout(levels_per_slot: Sequence[int], levels_hash: int) -> tuple[list[int], list[int]]:
    """(codebook sizes, bit widths) per slot of a valid layout; WireFormatError naming the bad argument otherwise."""
    if isinstance(levels_per_slot, (np.ndarray, torch.Tensor)):
        levels_per_slot = levels_per_slot.tolist()
    if isinstance(levels_per_slot, (str, bytes)) or not isinstance(levels_per_slot, Sequence) \
            or not 1 <= len(levels_per_slot) <= _U32_MAX:
        raise WireFormatError(f"levels_per_slot must be a non-empty list of codebook sizes, got {levels_per_slot!r}")
    for s, n in enumerate(levels_per_slot):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 2 <= n <= _MAX_CODEBOOK:
            raise WireFormatError(f"levels_per_slot[{s}] must be an integer in [2, 2**32], got {n!r}")
    if isinstance(levels_hash, bool) or not isinstance(levels_hash, (int, np.integer)) \
            or not 0 <= levels_hash <= _U32_MAX:
        raise WireFormatError(f"levels_hash must be an integer in [0, 2**32 - 1], got {levels_hash!r}")
    levels = [int(n) for n in levels_per_slot]
    return levels, [(n - 1).bit_length() for n in levels]


def code_header_nbytes(slots: int) -> int:
    """Header bytes of a v2 payload of `slots` codes: 8 + len(LEB128(slots)), i.e. 9 for < 128 slots."""
    return _FIXED_NBYTES + len(_varint(slots))


def code_payload_nbytes(levels_per_slot: Sequence[int]) -> int:
    """Exact length of `encode_codes(codes, levels_per_slot, h)`: header + ceil(sum(ceil(log2 L_s)) / 8)."""
    _, bits = _check_layout(levels_per_slot, 0)
    return code_header_nbytes(len(bits)) + -(-sum(bits) // 8)


def _codes_list(codes: torch.Tensor | Sequence[int] | np.ndarray, what: str) -> list[int]:
    if isinstance(codes, torch.Tensor):
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise WireFormatError(f"{what} must be an integer tensor, got {codes.dtype}")
        codes = codes.detach().cpu().tolist()
    elif isinstance(codes, np.ndarray):
        if codes.dtype.kind not in "iu":
            raise WireFormatError(f"{what} must be an integer array, got {codes.dtype}")
        codes = codes.tolist()
    if isinstance(codes, (str, bytes)) or not isinstance(codes, Sequence):
        raise WireFormatError(f"{what} must be a 1-D integer tensor or sequence, got {type(codes).__name__}")
    for c in codes:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise WireFormatError(f"{what} must hold integers (S,), got an element {c!r}")
    return [int(c) for c in codes]


def encode_codes(codes: torch.Tensor | Sequence[int], levels_per_slot: Sequence[int], levels_hash: int) -> bytes:
    """Serialize one example's codes `(S,)`, slot s in [0, levels_per_slot[s]), to a v2 payload."""
    levels, bits = _check_layout(levels_per_slot, levels_hash)
    values = _codes_list(codes, "encode_codes: codes")
    if len(values) != len(bits):
        raise WireFormatError(f"encode_codes: {len(values)} codes for a layout of {len(bits)} slots")
    out = bytearray(CODE_MAGIC + bytes([CODE_VERSION, KIND_CODES]) + _varint(len(bits))
                    + int(levels_hash).to_bytes(4, "little"))
    acc = n_acc = 0  # bit accumulator: the n_acc low bits of acc are pending, most significant first
    for s, (code, width) in enumerate(zip(values, bits)):
        if not 0 <= code < levels[s]:
            raise WireFormatError(f"encode_codes: code {code} of slot {s} is outside [0, {levels[s]})")
        acc, n_acc = (acc << width) | code, n_acc + width
        while n_acc >= 8:
            n_acc -= 8
            out.append(acc >> n_acc)
            acc &= (1 << n_acc) - 1
    if n_acc:
        out.append(acc << (8 - n_acc))
    return bytes(out)


def decode_codes(payload: bytes | bytearray | memoryview, levels_per_slot: Sequence[int],
                 levels_hash: int) -> torch.Tensor:
    """Parse a v2 payload back to codes `(S,)` int64 under the expected layout; WireFormatError if malformed."""
    levels, bits = _check_layout(levels_per_slot, levels_hash)
    payload = _as_bytes(payload)
    if len(payload) < len(CODE_MAGIC) + 2:
        raise WireFormatError(f"payload truncated: {len(payload)} bytes, shorter than a v2 header")
    if payload[:2] != CODE_MAGIC:
        raise WireFormatError(f"bad magic {payload[:2]!r}: not a LatentWire v2 payload (expected {CODE_MAGIC!r})")
    if payload[2] != CODE_VERSION:
        hint = " (a v1 float payload: use decode)" if payload[:4] == MAGIC else ""
        raise WireFormatError(f"wire format version {payload[2]} where a code payload (version {CODE_VERSION}) "
                              f"was expected{hint}")
    if payload[3] != KIND_CODES:
        raise WireFormatError(f"unknown v2 payload kind {payload[3]} (known: {KIND_CODES} = FSQ codes)")
    slots, pos = _read_varint(payload, 4)
    if slots != len(bits):
        raise WireFormatError(f"payload holds {slots} slots but the quantizer layout has {len(bits)}")
    if len(payload) < pos + 4:
        raise WireFormatError(f"payload truncated inside the levels hash ({len(payload)} bytes)")
    got_hash = int.from_bytes(payload[pos:pos + 4], "little")
    if got_hash != levels_hash:
        raise WireFormatError(f"levels hash {got_hash:#010x} does not match this quantizer's {levels_hash:#010x}: "
                              f"the payload was made with another levels layout")
    pos += 4
    expected = pos + -(-sum(bits) // 8)
    if len(payload) < expected:
        raise WireFormatError(f"payload truncated: {slots} codes of {sum(bits)} bits make {expected} bytes; "
                              f"got {len(payload)}")
    if len(payload) > expected:
        raise WireFormatError(f"{len(payload) - expected} trailing bytes after a {expected}-byte code payload")
    codes, acc, n_acc = [], 0, 0
    for s, width in enumerate(bits):
        while n_acc < width:
            acc, n_acc, pos = (acc << 8) | payload[pos], n_acc + 8, pos + 1
        n_acc -= width
        code, acc = acc >> n_acc, acc & ((1 << n_acc) - 1)
        if code >= levels[s]:
            raise WireFormatError(f"code {code} of slot {s} is outside its codebook [0, {levels[s]})")
        codes.append(code)
    if acc:
        raise WireFormatError(f"non-zero padding bits ({acc:#x} in the last {n_acc} bits)")
    return torch.tensor(codes, dtype=torch.int64)


def encode_codes_batch(codes: torch.Tensor, levels_per_slot: Sequence[int], levels_hash: int) -> list[bytes]:
    """One v2 payload per example of `codes (B, S)`; wire size is counted per example, never per batch."""
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise WireFormatError(f"encode_codes_batch expects codes (B, S), got {shape}")
    return [encode_codes(row, levels_per_slot, levels_hash) for row in codes]


def decode_codes_batch(payloads: Sequence[bytes], levels_per_slot: Sequence[int], levels_hash: int) -> torch.Tensor:
    """Decode v2 payloads of one layout to codes `(B, S)` int64."""
    if not payloads:
        raise WireFormatError("decode_codes_batch got no payloads")
    return torch.stack([decode_codes(p, levels_per_slot, levels_hash) for p in payloads])


def payload_version(payload: bytes | bytearray | memoryview) -> int:
    """1 for a float payload (b"LWZ1..."), 2 for a code payload (b"LW\\x02..."); WireFormatError otherwise."""
    payload = _as_bytes(payload)
    if payload[:4] == MAGIC:
        return VERSION
    if payload[:2] == CODE_MAGIC and payload[2:3] == bytes([CODE_VERSION]):
        return CODE_VERSION
    raise WireFormatError(f"not a LatentWire payload: starts with {payload[:4]!r} (expected {MAGIC!r} for v1 or "
                          f"{CODE_MAGIC + bytes([CODE_VERSION])!r} for v2)")


def decode_any(payload: bytes | bytearray | memoryview, levels_per_slot: Sequence[int] | None = None,
               levels_hash: int | None = None) -> torch.Tensor:
    """v1 -> float32 latent `(S, D)`; v2 -> int64 codes `(S,)` (needs the quantizer's layout and hash)."""
    if payload_version(payload) == VERSION:
        return decode(payload)
    if levels_per_slot is None or levels_hash is None:
        raise WireFormatError("a v2 code payload needs levels_per_slot and levels_hash to decode")
    return decode_codes(payload, levels_per_slot, levels_hash)
