"""Multiply-accumulates the Triton conv kernels put through tl.dot, against the useful ones.

An implicit-GEMM kernel pads every GEMM dimension up to its tile, and its loop structure
decides which slices, empty or not, still go through tl.dot: the stem's 3 channels in a
32-wide K slice, the taps a stride-2 dgrad masks out. This module counts, for one conv and
one tile config, what each kernel's grid and loops hand to tl.dot (`conv.py`, `conv_bwd.py`):

    fwd    programs cdiv(M, BM) x cdiv(C_out, BN), M = N*Ho*Wo; each runs K steps of BK:
           cdiv(kh*kw*C_in, BK) flattened (`config.flat_k`), else kh*kw*cdiv(C_in, BK);
    dgrad  programs cdiv(N*Hq*Wq, BM) x cdiv(C_in, BN) x stride^2, Hq = cdiv(H, stride);
           phase (ph, pw) visits taps_h(ph) * taps_w(pw) taps of cdiv(C_out, BK) steps,
           taps_h(ph) = #{r < k : (ph + pad - r * dilation) mod stride = 0};
    wgrad  programs cdiv(C_out, BM) x column blocks x split; a split's rows in steps of BK
           (an empty split one step: `conv.k_steps`); column blocks cdiv(kh*kw*C_in, BN)
           flattened, else kh*kw*cdiv(C_in, BN);

each step a BM x BK x BN product. Useful work is N*Ho*Wo*C_out*C_in*kh*kw for each of the
three. tests/test_dot_work.py checks these counts against the interpreter's own tally of
tl.dot shapes, exactly: keep the two in step when a kernel's loops change.
"""

from __future__ import annotations

from typing import NamedTuple

from fused_resnet.triton.config import cdiv, flat_k, wgrad_split, wgrad_tiles


class ConvShape(NamedTuple):
    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    k: int
    stride: int
    padding: int
    dilation: int = 1

    @property
    def out_hw(self) -> tuple[int, int]:
        span = self.dilation * (self.k - 1) + 1  # the dilated kernel's extent
        return tuple((size + 2 * self.padding - span) // self.stride + 1
                     for size in (self.h, self.w))

    @property
    def rows(self) -> int:
        """GEMM rows of the forward and wgrad: N * Ho * Wo output pixels."""
        ho, wo = self.out_hw
        return self.n * ho * wo


def _pad(a: int, b: int) -> int:
    return cdiv(a, b) * b


def useful_macs(s: ConvShape) -> int:
    """The conv's MACs; its dgrad and its wgrad have as many."""
    return s.rows * s.c_out * s.c_in * s.k * s.k


def fwd_macs(s: ConvShape, bm: int, bn: int, bk: int) -> int:
    taps = s.k * s.k
    k_run = _pad(taps * s.c_in, bk) if flat_k(s.c_in) else taps * _pad(s.c_in, bk)
    return _pad(s.rows, bm) * _pad(s.c_out, bn) * k_run


def _phase_taps(s: ConvShape, phase: int) -> int:
    """Taps r in [0, k) with r * dilation = phase + pad (mod stride): those a pixel of that
    phase takes (r = (phase + pad) mod stride, + stride, ... undilated)."""
    return sum((phase + s.padding - r * s.dilation) % s.stride == 0 for r in range(s.k))


def dgrad_macs(s: ConvShape, bm: int, bn: int, bk: int) -> int:
    slots = s.n * cdiv(s.h, s.stride) * cdiv(s.w, s.stride)
    taps = sum(_phase_taps(s, ph) * _phase_taps(s, pw)
               for ph in range(s.stride) for pw in range(s.stride))
    return _pad(slots, bm) * _pad(s.c_in, bn) * taps * _pad(s.c_out, bk)


def wgrad_macs(s: ConvShape, bm: int, bn: int, bk: int, split: int | None = None) -> int:
    """split: the kernel's reduction slices (default: `config.wgrad_split`, as conv_wgrad)."""
    rows = s.rows
    split = split or wgrad_split(rows, wgrad_tiles(s.c_out, s.c_in, s.k, s.k))
    per_split = cdiv(rows, split)
    steps = sum(max(1, cdiv(max(0, min(start + per_split, rows) - start), bk))  # k_steps
                for start in range(0, split * per_split, per_split))
    taps = s.k * s.k
    columns = _pad(taps * s.c_in, bn) if flat_k(s.c_in) else taps * _pad(s.c_in, bn)
    return _pad(s.c_out, bm) * columns * steps * bk


def training_macs(s: ConvShape, bm: int, bn: int, bk: int, need_dx: bool = True) -> int:
    """fwd + wgrad (+ dgrad where the input needs a gradient) of one training step."""
    dgrad = dgrad_macs(s, bm, bn, bk) if need_dx else 0
    return fwd_macs(s, bm, bn, bk) + wgrad_macs(s, bm, bn, bk) + dgrad
