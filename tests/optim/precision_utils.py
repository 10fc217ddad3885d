"""Bit-level helpers for the precision-option tests (tests/optim/test_precision_options.py).

float32 is sign-magnitude: bit 31 is the sign, bits 0..30 the magnitude, and the magnitude bits of
two floats of the same sign are ordered like the values.  A bfloat16 is the top 16 bits of a
float32, so rounding a float32 to bfloat16 is an integer operation on the magnitude bits:

  toward zero:              mag & 0x7FFF0000
  nearest, ties away:       (mag + 0x8000) & 0x7FFF0000   (a low half >= 0x8000 carries into bit 16)

and because only the magnitude is touched, both work the same for either sign.  All bit
arithmetic is done in int64 (no int32 overflow at the carry) and brought back to int32 at the end.
"""

from __future__ import annotations

import torch

_SIGN = 0x80000000
_MAG = 0x7FFFFFFF
_HI = 0x7FFF0000


def _bits64(x: torch.Tensor) -> torch.Tensor:
    """The 32 bits of a float32 tensor as non-negative int64 values in [0, 2**32)."""
    assert x.dtype == torch.float32, x.dtype
    return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _float_from_bits64(bits: torch.Tensor) -> torch.Tensor:
    """Inverse of _bits64: int64 values in [0, 2**32) -> float32 with those bits."""
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    return signed.to(torch.int32).view(torch.float32)


def low16(x: torch.Tensor) -> torch.Tensor:
    """The 16 low bits of a float32 tensor (what a bfloat16 of its top half leaves out), int64."""
    return _bits64(x) & 0xFFFF


def tie_mask(x: torch.Tensor) -> torch.Tensor:
    """Elements of a float32 tensor exactly half way between two bfloat16 values."""
    return low16(x) == 0x8000


def bf16_round_ties_away(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16, round to nearest, ties away from zero (NaN stays NaN).

    Finite values above the largest bfloat16 round to +-inf like any round-to-nearest would."""
    b = _bits64(x)
    sign, mag = b & _SIGN, b & _MAG
    out = _float_from_bits64(sign | ((mag + 0x8000) & _HI)).to(torch.bfloat16)  # exact: already bf16
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), out)


def bf16_toward_zero(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 truncated toward zero (the bfloat16 neighbour of smaller magnitude)."""
    b = _bits64(x)
    return _float_from_bits64((b & _SIGN) | (b & _HI)).to(torch.bfloat16)


def bf16_away_from_zero(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 rounded away from zero (the neighbour of larger magnitude; x itself
    when x is a bfloat16 value already)."""
    b = _bits64(x)
    mag = b & _MAG
    up = torch.where((mag & 0xFFFF) != 0, (mag & _HI) + 0x10000, mag)
    return _float_from_bits64((b & _SIGN) | up).to(torch.bfloat16)


def remainder_of(master: torch.Tensor) -> torch.Tensor:
    """The 16 low bits of a float32 master as int16 (the state['master_remainder'] encoding)."""
    r = low16(master)
    return torch.where(r >= 0x8000, r - 0x10000, r).to(torch.int16)


def master_from_remainder(param: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """The exact float32 master encoded by a bfloat16 param and its int16 remainder.

    The param is the master rounded to nearest, ties away; the remainder holds the master's low 16
    bits.  A low half >= 0x8000 (the remainder's top bit set) means the magnitude was rounded UP
    by one bfloat16 step, so the master's top half is the param's bits minus one (in magnitude;
    for either sign that is the 16-bit pattern minus one, the sign bit being untouched):
        master_bits = ((param_bits - (rem >= 0x8000)) << 16) | rem
    """
    assert param.dtype == torch.bfloat16, param.dtype
    assert remainder.dtype == torch.int16, remainder.dtype
    assert param.shape == remainder.shape, (param.shape, remainder.shape)
    pb = param.detach().contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    r = remainder.detach().contiguous().to(torch.int64) & 0xFFFF
    hi = (pb - (r >= 0x8000).to(torch.int64)) & 0xFFFF
    return _float_from_bits64((hi << 16) | r)


def float_bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two float32 tensors (distinguishes -0.0 / +0.0, NaN payloads)."""
    assert a.dtype == b.dtype == torch.float32, (a.dtype, b.dtype)
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    """A short description of the first element where a and b differ (for assertion messages)."""
    ne = (a.detach().float().flatten() != b.detach().float().flatten()).nonzero()
    if ne.numel() == 0:
        return "no element differs in value (bit pattern / signed zero / shape?)"
    i = ne[0].item()
    return (f"{ne.numel()} elements differ; first at flat index {i}: "
            f"{a.detach().flatten()[i].item()!r} vs {b.detach().flatten()[i].item()!r}")
