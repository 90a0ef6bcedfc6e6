"""Axial attention with a CLS token in every line: the Triton kernels behind `vimpac.kernels.axial_attention`.

Semantics are those of `axial_attention_reference` (docs/design.md §5.1): for one axis of the clip `[B, T, H, W]`, every
1-D line of tokens along that axis is one sequence with CLS prepended as query, key and value; PAD tokens are
never keys (CLS always is); the CLS query's output is averaged over all lines.

Layout. Lines are short (1 + T = 6, 1 + 16, 1 + 32) and there are thousands of them, so the op is memory-bound:
one program owns one head of `LPP` consecutive lines of one sample, packed row after row into a `BLOCK_M`-row
tile (`BLOCK_M` a power of two ≥ 16 for `tl.dot`, row r = line r // N, position r % N, N = 1 + L). The grid is
(B · ⌈lines per sample / LPP⌉, heads): a program never holds lines of two samples, so the last program of each
sample may be partly empty (T axis of the small model: 256 lines at 5 per program, 52 programs per sample where
51.2 would do). Q, K and V token rows are gathered straight from the caller's strided views; the CLS rows, which
all lines of a program share (`cls_*[b, head]`), are read once per program and broadcast to the tile. The whole
`BLOCK_M × BLOCK_M` score tile stays in registers; keys of another line in the same tile are masked like PAD.
Packing several lines per tile trades wasted FLOPs in the off-diagonal blocks (cheap: compute is idle) for
bigger, better-shaped `tl.dot`s and fewer programs.

Backward recomputes the softmax from Q and K instead of saving a log-sum-exp: with the whole row resident, the
row max and sum are two register reductions, cheaper than writing and re-reading an LSE tensor.

Dropout uses `tl.rand(seed, offset)` with offset = ((line · heads + head) · N + row) · N + col, unique per
(line, head, query, key) and independent of the packing, so forward, backward and `dropout_keep_mask` (a
debug helper for tests) draw the same mask. Philox costs ~100 integer ops per element and is evaluated on the
whole tile, so with dropout on the default packing shrinks to the smallest legal tile to limit wasted draws.
The seed is an int64 scalar tensor on q's device that the kernels `tl.load`, never a Python int: drawing it
(`torch.randint` on that device) needs no `.item()`, so no host sync, and torch.compile traces the default
(seedless) path without a graph break; autograd saves it for backward.

CLS outputs and CLS gradients are summed over the program's lines in registers (a masked `tl.sum` over the
tile's rows), and each program writes one fp32 [d] partial per buffer: [B, programs per sample, heads, d]
forward, [3, B, programs per sample, heads, d] backward (dcls_q, dcls_k, dcls_v). PyTorch adds the partials
(forward: and divides by the lines per sample, the mean): deterministic, no atomics.

Bytes per call (`bytes_moved`: what the loads and stores address, plus the partials' reduction), with E = element
bytes, d = head dim, S = tokens · heads, P = B · ⌈lines per sample / LPP⌉ · heads (programs), C = B · heads:

  forward   4·S·d·E (q, k, v read, out written) + 3·P·d·E (CLS rows) + 2·P·d·4 (partial written, read back)
            + C·d·E (cls_out) [+ S bytes PAD, read by every head] [+ 8·P dropout seed]
  backward  7·S·d·E (q, k, v, dO read; dq, dk, dv written) + 4·P·d·E (cls_q, cls_k, cls_v, dcls)
            + 2·3·P·d·4 (partials) + 3·C·d·E [+ S PAD] [+ 8·P seed]
  minimum   the token terms + each [B, heads, d] CLS input and output once [+ the PAD mask once]

Before this layout the CLS rows were read and the partials written once per line (P → lines · heads). Worked
example, the small pre-training model (scripts/pretrain/small.sh with ds_configs/small.json: micro-batch 8,
clip_len 5, 128 px → 16 × 16 codes, hidden 512 = 8 heads of 64), fp16, axis T: 2048 lines of 6 tokens, 10,240
tokens. Default tile (32 rows, 5 lines per program, 416 programs per head, no dropout): forward 54.0 MiB per line
→ 42.9 MiB per program (minimum 40.0 MiB: × 1.35 → × 1.07), backward 102.0 → 76.5 MiB (minimum 70.1 MiB:
× 1.46 → × 1.09). Training (dropout 0.1, PAD mask: 16-row tiles of 2 lines): forward 54.2 → 47.1 MiB (× 1.35 →
× 1.18), backward 102.2 → 86.2 MiB (× 1.46 → × 1.23). The token rows are read and written exactly once; the rest
is what remains above the minimum. The count is of requested bytes: the PAD bytes each head re-reads mostly hit L2.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vimpac.kernels.axial_attention_reference import AXIS_DIMS, _check_inputs
from vimpac.kernels.launch import on_device

LOG2E = 1.4426950408889634
MAX_SEQ = 256  # 1 + axis length; the score tile is BLOCK_M², held in registers
HEAD_DIMS = (16, 32, 64, 128)


@triton.jit
def _row_layout(pid, lines_per_b, progs_per_b, D2, N: tl.constexpr, LPP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Tile row r → (local line, position in line, global line, valid, batch, line coords c1, c2).

    Program `pid` is program pid % progs_per_b of sample b = pid // progs_per_b (a scalar: a program never holds
    lines of two samples); its lines are lines_per_b-local indices j·LPP + local. The global line
    b · lines_per_b + index numbers lines as before packing, so dropout offsets do not depend on LPP."""
    r = tl.arange(0, BLOCK_M)
    local = r // N
    pos = r % N
    pid64 = pid.to(tl.int64)
    b = pid64 // progs_per_b
    within = (pid64 % progs_per_b) * LPP + local
    valid = (local < LPP) & (within < lines_per_b)
    line = b * lines_per_b + within
    c1 = within // D2
    c2 = within % D2
    return local, pos, line, valid, b, c1, c2


@triton.jit
def _token_offsets(b, c1, c2, pos, h, sb, s1, s2, sa, sh):
    """Element offset of each row's token in a [B, T, H, W, heads, d] tensor (garbage on CLS rows: mask them)."""
    return b * sb + c1 * s1 + c2 * s2 + (pos - 1).to(tl.int64) * sa + h * sh


@triton.jit
def _load_rows(ptr, cls_ptr, tok_off, is_tok, is_cls, b, h, scb, sch, scd, dcol, CDT: tl.constexpr):
    """[BLOCK_M, HEAD_DIM] tile: token rows from `ptr`, CLS rows from `cls_ptr` [B, heads, d], zeros elsewhere.

    All lines of a program belong to sample b, so the CLS row is read once and broadcast to every CLS row."""
    x = tl.load(ptr + tok_off[:, None] + dcol[None, :], mask=is_tok[:, None], other=0.0).to(CDT)
    c = tl.load(cls_ptr + b * scb + h * sch + dcol * scd).to(CDT)
    # The interpreter keeps bf16 as raw bits, so the select happens after the cast to CDT (fp32 there). x is 0 off
    # the token rows. (A nested select, token rows first, made ptxas spill the forward at lines of 6, d=64.)
    return tl.where(is_cls[:, None], c[None, :], x)


@triton.jit
def _allowed_keys(PAD, b, c1, c2, pos, local, valid, is_tok, spb, sp1, sp2, spa, HAS_PAD: tl.constexpr):
    """[BLOCK_M, BLOCK_M] bool: query row i may attend key column j (same line, real token, not PAD)."""
    key_ok = valid
    if HAS_PAD:
        pad_off = b * spb + c1 * sp1 + c2 * sp2 + (pos - 1).to(tl.int64) * spa
        pad = tl.load(PAD + pad_off, mask=is_tok, other=0)
        key_ok = key_ok & (pad == 0)
    return (local[:, None] == local[None, :]) & key_ok[None, :]


@triton.jit
def _keep_mask(SEED, line, pos, h, heads, dropout_p, N: tl.constexpr):
    """[BLOCK_M, BLOCK_M] dropout keep mask; meaningful for same-line pairs only (others are masked anyway).

    SEED points to an int64 scalar; tl.rand takes any integer seed (as uint64, split into the two 32-bit Philox
    key words), so a loaded int64 gives the same mask a Python int of the same value did."""
    seed = tl.load(SEED)
    offs = ((line * heads + h) * N + pos)[:, None] * N + pos[None, :]
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _softmax(s, allowed, valid):
    """Row softmax of log2-scaled scores s over allowed keys; rows with no allowed key (padding rows) → 0."""
    s = tl.where(allowed, s, float("-inf"))
    m = tl.max(s, axis=1)
    m = tl.where(valid, m, 0.0)
    p = tl.exp2(s - m[:, None])
    denom = tl.sum(p, axis=1)
    denom = tl.where(denom > 0.0, denom, 1.0)
    return p / denom[:, None]


@triton.jit
def _axial_fwd_kernel(
    Q, K, V, CQ, CK, CV, PAD, OUT, CLS_PART,
    SEED, scale_log2, dropout_p,
    sqb, sq1, sq2, sqa, sqh,
    skb, sk1, sk2, ska, skh,
    svb, sv1, sv2, sva, svh,
    scqb, scqh, scqd, sckb, sckh, sckd, scvb, scvh, scvd,
    spb, sp1, sp2, spa,
    sob, so1, so2, soa, soh,
    lines_per_b, progs_per_b, D2, heads,
    N: tl.constexpr, LPP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr, CDT: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    local, pos, line, valid, b, c1, c2 = _row_layout(pid, lines_per_b, progs_per_b, D2, N, LPP, BLOCK_M)
    is_tok = valid & (pos > 0)
    is_cls = valid & (pos == 0)
    dcol = tl.arange(0, HEAD_DIM)

    q = _load_rows(Q, CQ, _token_offsets(b, c1, c2, pos, h, sqb, sq1, sq2, sqa, sqh), is_tok, is_cls, b, h,
                   scqb, scqh, scqd, dcol, CDT)  # fmt: skip
    k = _load_rows(K, CK, _token_offsets(b, c1, c2, pos, h, skb, sk1, sk2, ska, skh), is_tok, is_cls, b, h,
                   sckb, sckh, sckd, dcol, CDT)  # fmt: skip
    v = _load_rows(V, CV, _token_offsets(b, c1, c2, pos, h, svb, sv1, sv2, sva, svh), is_tok, is_cls, b, h,
                   scvb, scvh, scvd, dcol, CDT)  # fmt: skip

    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
    allowed = _allowed_keys(PAD, b, c1, c2, pos, local, valid, is_tok, spb, sp1, sp2, spa, HAS_PAD)
    p = _softmax(s, allowed, valid)
    if HAS_DROPOUT:
        keep = _keep_mask(SEED, line, pos, h, heads, dropout_p, N)
        p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
    o = tl.dot(p.to(CDT), v, input_precision=DOT_PREC)

    out_off = _token_offsets(b, c1, c2, pos, h, sob, so1, so2, soa, soh)
    tl.store(OUT + out_off[:, None] + dcol[None, :], o.to(OUT.dtype.element_ty), mask=is_tok[:, None])
    # One fp32 partial per program: the sum of its lines' CLS outputs (PyTorch adds the partials, divides by lines).
    part = (pid.to(tl.int64) * heads + h) * HEAD_DIM + dcol
    tl.store(CLS_PART + part, tl.sum(tl.where(is_cls[:, None], o, 0.0), axis=0))


@triton.jit
def _axial_bwd_kernel(
    Q, K, V, CQ, CK, CV, PAD, DO, DCLS, DQ, DK, DV, DCLS_PART,
    SEED, scale, scale_log2, dropout_p, inv_lines,
    sqb, sq1, sq2, sqa, sqh,
    skb, sk1, sk2, ska, skh,
    svb, sv1, sv2, sva, svh,
    scqb, scqh, scqd, sckb, sckh, sckd, scvb, scvh, scvd,
    spb, sp1, sp2, spa,
    sdob, sdo1, sdo2, sdoa, sdoh,
    sdcb, sdch, sdcd,
    sgb, sg1, sg2, sga, sgh,
    lines_per_b, progs_per_b, D2, heads,
    N: tl.constexpr, LPP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr, CDT: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    local, pos, line, valid, b, c1, c2 = _row_layout(pid, lines_per_b, progs_per_b, D2, N, LPP, BLOCK_M)
    is_tok = valid & (pos > 0)
    is_cls = valid & (pos == 0)
    dcol = tl.arange(0, HEAD_DIM)

    q = _load_rows(Q, CQ, _token_offsets(b, c1, c2, pos, h, sqb, sq1, sq2, sqa, sqh), is_tok, is_cls, b, h,
                   scqb, scqh, scqd, dcol, CDT)  # fmt: skip
    k = _load_rows(K, CK, _token_offsets(b, c1, c2, pos, h, skb, sk1, sk2, ska, skh), is_tok, is_cls, b, h,
                   sckb, sckh, sckd, dcol, CDT)  # fmt: skip
    v = _load_rows(V, CV, _token_offsets(b, c1, c2, pos, h, svb, sv1, sv2, sva, svh), is_tok, is_cls, b, h,
                   scvb, scvh, scvd, dcol, CDT)  # fmt: skip
    # cls_out is a mean over lines, so each line's CLS row receives d(cls_out) / lines.
    do = _load_rows(DO, DCLS, _token_offsets(b, c1, c2, pos, h, sdob, sdo1, sdo2, sdoa, sdoh), is_tok, is_cls,
                    b, h, sdcb, sdch, sdcd, dcol, tl.float32)  # fmt: skip
    do = tl.where(is_cls[:, None], do * inv_lines, do)
    do_c = do.to(CDT)

    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
    allowed = _allowed_keys(PAD, b, c1, c2, pos, local, valid, is_tok, spb, sp1, sp2, spa, HAS_PAD)
    p = _softmax(s, allowed, valid)
    dp = tl.dot(do_c, tl.trans(v), input_precision=DOT_PREC)
    if HAS_DROPOUT:
        keep = _keep_mask(SEED, line, pos, h, heads, dropout_p, N)
        inv_keep = 1.0 / (1.0 - dropout_p)
        p_drop = tl.where(keep, p * inv_keep, 0.0)
        dp = tl.where(keep, dp * inv_keep, 0.0)
    else:
        p_drop = p
    p_drop_c = p_drop.to(CDT)
    # Delta = rowsum(dO ⊙ O), with O recomputed in fp32 rather than re-read: compute is idle, memory is not.
    o = tl.dot(p_drop_c, v, input_precision=DOT_PREC)
    delta = tl.sum(do * o, axis=1)
    ds = (p * (dp - delta[:, None])).to(CDT)

    dv = tl.dot(tl.trans(p_drop_c), do_c, input_precision=DOT_PREC)
    dq = tl.dot(ds, k, input_precision=DOT_PREC) * scale
    dk = tl.dot(tl.trans(ds), q, input_precision=DOT_PREC) * scale

    g_off = _token_offsets(b, c1, c2, pos, h, sgb, sg1, sg2, sga, sgh)[:, None] + dcol[None, :]
    tl.store(DQ + g_off, dq.to(DQ.dtype.element_ty), mask=is_tok[:, None])
    tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=is_tok[:, None])
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=is_tok[:, None])
    # One fp32 partial per program and CLS input: the sum over its lines' CLS rows (PyTorch adds the partials).
    part = (pid.to(tl.int64) * heads + h) * HEAD_DIM + dcol
    part_stride = tl.num_programs(0).to(tl.int64) * heads * HEAD_DIM
    tl.store(DCLS_PART + part, tl.sum(tl.where(is_cls[:, None], dq, 0.0), axis=0))
    tl.store(DCLS_PART + part_stride + part, tl.sum(tl.where(is_cls[:, None], dk, 0.0), axis=0))
    tl.store(DCLS_PART + 2 * part_stride + part, tl.sum(tl.where(is_cls[:, None], dv, 0.0), axis=0))


@triton.jit
def _keep_mask_kernel(
    KEEP, SEED, dropout_p, lines_per_b, progs_per_b, heads,
    N: tl.constexpr, LPP: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    local, pos, line, valid, _, _, _ = _row_layout(pid, lines_per_b, progs_per_b, 1, N, LPP, BLOCK_M)
    keep = _keep_mask(SEED, line, pos, h, heads, dropout_p, N)
    same = (local[:, None] == local[None, :]) & valid[:, None] & valid[None, :]
    offs = ((line * heads + h) * N + pos)[:, None] * N + pos[None, :]
    tl.store(KEEP + offs, keep.to(tl.int8), mask=same)


# ---------------------------------------------------------------------------------------------------------------
# Launch helpers


def _geometry(shape: torch.Size, axis: str) -> tuple[int, int, int, int, int]:
    """(axis dim, line dim 1, line dim 2, L, lines per sample) for [B, T, H, W, ...] and axis 'T'|'H'|'W'."""
    if axis not in AXIS_DIMS:
        raise ValueError(f"axis must be one of 'T', 'H', 'W'; got {axis!r}")
    a = AXIS_DIMS[axis]
    d1, d2 = (d for d in (1, 2, 3) if d != a)
    return a, d1, d2, shape[a], shape[d1] * shape[d2]


def _tile(seq: int, has_dropout: bool, block_rows: int | None) -> tuple[int, int]:
    """(BLOCK_M, lines per program) for lines of `seq` rows."""
    smallest = max(16, triton.next_power_of_2(seq))
    if block_rows is None:
        # Pack lines up to 32 rows without dropout: 64-row packings spilled registers (backward, and forward at
        # d=64, when the strides are not known 16-divisible; scripts/bench/kernels_static.py). With dropout the
        # per-element Philox draws over the whole tile dominate, so keep the tile as small as tl.dot allows.
        block_rows = smallest if has_dropout else max(32, smallest)
    if block_rows < smallest or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two ≥ {smallest} for lines of {seq}; got {block_rows}")
    return block_rows, block_rows // seq


# Whether these kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported).
_INTERPRET = type(_row_layout).__name__ == "InterpretedFunction"
# Opt-in shared memory per block when the device cannot be asked (CPU, the interpreter): the A100's 163 KB, the
# smallest of the GPUs the kernels target (H100/H200: 227 KB).
STATIC_SHARED_LIMIT = 163 * 1024


def _shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one program may use on `device` (opt-in limit; STATIC_SHARED_LIMIT off CUDA)."""
    if device.type != "cuda":
        return STATIC_SHARED_LIMIT
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or STATIC_SHARED_LIMIT)


def _shared_bytes(block_m: int, dim: int, dtype: torch.dtype, backward: bool) -> int:
    """An upper bound on the shared memory of one program: the dot operands staged through shared memory
    (3 [BLOCK_M, d] tiles forward, 6 backward) plus one BLOCK_M² probability tile, in the dot's input dtype.
    The static report (scripts/bench/kernels_static.py) checks that it bounds what Triton allocates."""
    elem = 4 if dtype == torch.float32 else 2
    return elem * block_m * ((6 if backward else 3) * dim + block_m)


def _check_fits(seq: int, dim: int, dtype: torch.dtype, has_dropout: bool, block_rows, backward: bool, device):
    """(BLOCK_M, lines per program), or ValueError when that tile needs more shared memory than `device` has."""
    block_m, lpp = _tile(seq, has_dropout, block_rows)
    need, limit = _shared_bytes(block_m, dim, dtype, backward), _shared_memory_limit(device)
    if need > limit:
        raise ValueError(
            f"axial_attention_triton: lines of {seq} tokens (tile of {block_m} rows, d={dim}, {dtype}) need up to "
            f"{need // 1024} KB of shared memory in the {'backward' if backward else 'forward'} kernel, over the "
            f"{limit // 1024} KB this device allows per block; use the PyTorch reference for such lines "
            "(vimpac.kernels.axial_attention does when VIMPAC_KERNELS is unset)"
        )
    return block_m, lpp


def _compute_dtype(dtype: torch.dtype, on_cuda: bool):
    # The interpreter does bf16 arithmetic on raw bits (wrong results, no error): upcast right after each load.
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and on_cuda:
        return tl.bfloat16
    return tl.float32


def _num_warps(block_m: int, dim: int, dtype: torch.dtype, backward: bool) -> int:
    # Backward holds ~5 [BLOCK_M, d] and ~4 [BLOCK_M, BLOCK_M] tiles live; spread big ones over more threads
    # (4 warps spilled at 64 rows, 8 do not: scripts/bench/kernels_static.py). fp32 inputs take the non-tensor-
    # core dot path and twice the registers per loaded element: its backward spilled at 32 × 64 with 4 warps,
    # not with 8 (its forward is clean with 4 and spills with 8).
    limit = 16 * 64 if backward and dtype == torch.float32 else 32 * 64
    return 4 if block_m * max(block_m, dim) <= limit else 8


def _line_strides(x: torch.Tensor, a: int, d1: int, d2: int) -> tuple[int, ...]:
    """(batch, line dim 1, line dim 2, axis, head) strides of a [B, T, H, W, heads, d] tensor."""
    return x.stride(0), x.stride(d1), x.stride(d2), x.stride(a), x.stride(4)


def check_supported(q: torch.Tensor, axis: str) -> None:
    """Raise ValueError unless the kernels handle q's dtype, head dim and axis length (1 + L ≤ MAX_SEQ, and the
    tile for lines of 1 + L fits the device's shared memory: `_check_fits`)."""
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"axial_attention_triton supports fp32/fp16/bf16 inputs; got {q.dtype}")
    dim = q.shape[-1]
    if dim not in HEAD_DIMS:
        raise ValueError(f"axial_attention_triton supports head dims {HEAD_DIMS}; got d={dim}")
    a, *_ = _geometry(q.shape, axis)
    if 1 + q.shape[a] > MAX_SEQ:
        raise ValueError(f"axial_attention_triton supports 1 + axis length ≤ {MAX_SEQ}; got 1 + {q.shape[a]}")
    # The default tile must fit the device's shared memory (both passes when a gradient will be needed). Not while
    # torch.compile traces (no device query in the graph): the launch checks again, then with a clear error.
    if not torch.compiler.is_compiling():
        _check_fits(1 + q.shape[a], dim, q.dtype, False, None, q.requires_grad, q.device)


def _tile_constants(
    q: torch.Tensor, seq: int, lpp: int, block_m: int, key_padding_mask, dropout_p: float, backward: bool
) -> dict:
    """The compile-time constants and warp count the forward (or backward) kernel is launched with."""
    return {
        "N": seq,
        "LPP": lpp,
        "BLOCK_M": block_m,
        "HEAD_DIM": q.shape[-1],
        "HAS_PAD": key_padding_mask is not None,
        "HAS_DROPOUT": dropout_p > 0.0,
        "CDT": _compute_dtype(q.dtype, q.is_cuda),
        "DOT_PREC": "ieee" if q.dtype == torch.float32 else "tf32",
        "num_warps": _num_warps(block_m, q.shape[-1], q.dtype, backward),
    }


def _pad_args(key_padding_mask: torch.Tensor | None, q: torch.Tensor, a: int, d1: int, d2: int):
    if key_padding_mask is None:
        return q, (0, 0, 0, 0)  # never read (HAS_PAD=False); any pointer will do
    pad = key_padding_mask.view(torch.uint8)  # same bytes, a dtype Triton loads as integers
    return pad, (pad.stride(0), pad.stride(d1), pad.stride(d2), pad.stride(a))


def _forward(q, k, v, cls_q, cls_k, cls_v, axis, key_padding_mask, dropout_p, scale, seed, block_rows):
    """Launch the forward kernel. Returns out [B, T, H, W, heads, d] (contiguous), cls_out [B, heads, d]."""
    a, d1, d2, length, lines_per_b = _geometry(q.shape, axis)
    batch, heads, dim = q.shape[0], q.shape[4], q.shape[5]
    seq = 1 + length
    total_lines = batch * lines_per_b
    block_m, lpp = _check_fits(seq, dim, q.dtype, dropout_p > 0.0, block_rows, False, q.device)
    progs_per_b = triton.cdiv(lines_per_b, lpp)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    cls_part = torch.empty(batch, progs_per_b, heads, dim, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or total_lines == 0 or heads == 0:
        return out, (cls_part.sum(1) / lines_per_b).to(q.dtype)
    pad, pad_strides = _pad_args(key_padding_mask, q, a, d1, d2)
    grid = (batch * progs_per_b, heads)
    with on_device(q):
        _axial_fwd_kernel[grid](
            q, k, v, cls_q, cls_k, cls_v, pad, out, cls_part,
            seed, scale * LOG2E, dropout_p,
            *_line_strides(q, a, d1, d2), *_line_strides(k, a, d1, d2), *_line_strides(v, a, d1, d2),
            *cls_q.stride(), *cls_k.stride(), *cls_v.stride(),
            *pad_strides,
            *_line_strides(out, a, d1, d2),
            lines_per_b, progs_per_b, q.shape[d2], heads,
            **_tile_constants(q, seq, lpp, block_m, key_padding_mask, dropout_p, False),
        )  # fmt: skip
    # cls_out = mean over lines of the per-line CLS outputs = (sum of the per-program partials) / lines.
    return out, (cls_part.sum(1) / lines_per_b).to(q.dtype)


def _backward(q, k, v, cls_q, cls_k, cls_v, axis, key_padding_mask, dropout_p, scale, seed, block_rows, dout, dcls):
    """Launch the backward kernel. Returns dq, dk, dv (contiguous, input dtype) and dcls_q, dcls_k, dcls_v."""
    a, d1, d2, length, lines_per_b = _geometry(q.shape, axis)
    batch, heads, dim = q.shape[0], q.shape[4], q.shape[5]
    seq = 1 + length
    total_lines = batch * lines_per_b
    block_m, lpp = _check_fits(seq, dim, q.dtype, dropout_p > 0.0, block_rows, True, q.device)
    progs_per_b = triton.cdiv(lines_per_b, lpp)
    grads = [torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3)]
    if grads[0].numel() == 0 or total_lines == 0 or heads == 0:
        zero = q.new_zeros(cls_q.shape)
        return (*(g.zero_() for g in grads), zero, zero.clone(), zero.clone())
    # Every program writes its partials, so no zero fill.
    cls_part = torch.empty(3, batch, progs_per_b, heads, dim, dtype=torch.float32, device=q.device)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    pad, pad_strides = _pad_args(key_padding_mask, q, a, d1, d2)
    grid = (batch * progs_per_b, heads)
    with on_device(q):
        _axial_bwd_kernel[grid](
            q, k, v, cls_q, cls_k, cls_v, pad, dout, dcls, *grads, cls_part,
            seed, scale, scale * LOG2E, dropout_p, 1.0 / lines_per_b,
            *_line_strides(q, a, d1, d2), *_line_strides(k, a, d1, d2), *_line_strides(v, a, d1, d2),
            *cls_q.stride(), *cls_k.stride(), *cls_v.stride(),
            *pad_strides,
            *_line_strides(dout, a, d1, d2),
            *dcls.stride(),
            *_line_strides(grads[0], a, d1, d2),
            lines_per_b, progs_per_b, q.shape[d2], heads,
            **_tile_constants(q, seq, lpp, block_m, key_padding_mask, dropout_p, True),
        )  # fmt: skip
    return (*grads, *(part.sum(1).to(q.dtype) for part in cls_part))


def bytes_moved(
    shape: tuple[int, ...],
    axis: str,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    block_rows: int | None = None,
    dropout: bool = False,
    backward: bool = False,
    pad: bool = False,
    per_line: bool = False,
) -> dict[str, int]:
    """Bytes one forward (or backward) call moves through global memory, and the minimum any implementation must.

    shape: [B, T, H, W] (more trailing dims are ignored); the tile is the one the call would use (`_tile`).
    per_line: count the layout before partials moved into the program (CLS rows read and fp32 partials written
    once per line instead of once per program). Counts what the kernel's loads and stores address plus the PyTorch
    reduction of the partials (module docstring, "Bytes per call"); all values in bytes:

      tokens    q, k, v (+ dO) token rows read once, out (+ dq, dk, dv) written once
      cls       CLS rows read: cls_q, cls_k, cls_v (+ dcls), one row of head_dim each per program (per line and
                head with per_line)
      pad       the PAD mask, one byte per token, read by every head's programs (0 without PAD)
      seed      the int64 dropout seed, read once per program (0 without dropout)
      partials  fp32 partials (1 buffer forward, 3 backward) written by the kernel and read by the reduction
      cls_out   the reduced CLS result(s), [B, heads, d] each, written once in the input dtype
      total     the sum of the above
      minimum   tokens + the [B, heads, d] CLS inputs read once + cls_out + the PAD mask read once
    """
    _, _, _, length, lines_per_b = _geometry(shape, axis)
    batch = shape[0]
    elem = torch.empty((), dtype=dtype).element_size()
    _, lpp = _tile(1 + length, dropout, block_rows)
    programs = batch * triton.cdiv(lines_per_b, lpp) * heads  # the grid's size
    tokens = batch * length * lines_per_b
    row = head_dim * elem
    n_in, n_out = (4, 3) if backward else (3, 1)  # token tensors read / written; also CLS tensors in / out
    per = batch * lines_per_b * heads if per_line else programs  # CLS rows read and partials written, per tensor
    if per_line:  # programs straddled samples then: cdiv(all lines, lines per program) per head
        programs = triton.cdiv(batch * lines_per_b, lpp) * heads
    counts = {
        "tokens": tokens * heads * row * (n_in + n_out),
        "cls": per * n_in * row,
        "pad": tokens * heads if pad else 0,
        "seed": programs * 8 if dropout else 0,
        "partials": 2 * per * n_out * head_dim * 4,
        "cls_out": n_out * batch * heads * row,
    }
    counts["total"] = sum(counts.values())
    counts["minimum"] = counts["tokens"] + (n_in + n_out) * batch * heads * row + (tokens if pad else 0)
    return counts


SEED_RANGE = 2**62  # drawn seeds lie in [0, SEED_RANGE); tl.rand takes any 64-bit seed


def _seed_tensor(seed: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A given seed (int or integer scalar tensor) as the int64 scalar tensor on `device` that the kernels load."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise ValueError(f"seed must be an integer tensor of one element; got {seed.dtype} {tuple(seed.shape)}")
        return seed.to(device=device, dtype=torch.int64).reshape(())
    return torch.tensor(int(seed), dtype=torch.int64, device=device)


def _draw_seed(device: torch.device) -> torch.Tensor:
    """A fresh seed from torch's generator for `device` (torch.manual_seed / torch.cuda.manual_seed reproduce it).

    It stays on the device: no `.item()`, so no host sync and no graph break under torch.compile.
    """
    return torch.randint(0, SEED_RANGE, (), dtype=torch.int64, device=device)


def axial_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cls_q: torch.Tensor,
    cls_k: torch.Tensor,
    cls_v: torch.Tensor,
    axis: str,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    seed: int | torch.Tensor | None = None,
    block_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial attention along one axis ('T' | 'H' | 'W') with CLS in every line; Triton forward and backward.

    q, k, v: [B, T, H, W, heads, d], any strides with a contiguous last dim (views into a fused QKV output are
    read in place). cls_q, cls_k, cls_v: [B, heads, d]. key_padding_mask: bool [B, T, H, W], True = PAD (never a
    key; CLS always is). dropout_p: attention-probability dropout. scale: default 1/√d. seed: dropout seed, an int
    or an integer scalar tensor (default: drawn on q's device from torch's RNG, so torch.manual_seed reproduces
    it; it stays a device tensor, so no host sync). block_rows: rows per program tile
    (a power of two; default picks one), lines are packed into it; the dropout mask does not depend on it.
    Supports fp32/fp16/bf16 (fp32 softmax and accumulation), d in HEAD_DIMS, 1 + axis length ≤ MAX_SEQ.
    Returns out [B, T, H, W, heads, d] (contiguous) and cls_out [B, heads, d] (CLS output averaged over lines),
    both in the input dtype; gradients flow to all six inputs (contiguous, input dtype).
    It runs the registered op torch.ops.vimpac.axial_attention (seed passed as an int64 tensor), which
    torch.compile traces through without a graph break, with or without an explicit seed.
    """
    _check_inputs(q, k, v, cls_q, cls_k, cls_v, key_padding_mask, dropout_p)
    check_supported(q, axis)
    if k.dtype != q.dtype or v.dtype != q.dtype or any(c.dtype != q.dtype for c in (cls_q, cls_k, cls_v)):
        raise ValueError("q, k, v and cls_q, cls_k, cls_v must share one dtype")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if dropout_p == 0.0:
        seed = torch.zeros((), dtype=torch.int64, device=q.device)  # never read (HAS_DROPOUT=False)
    elif seed is None:
        seed = _draw_seed(q.device)
    else:
        seed = _seed_tensor(seed, q.device)
    return torch.ops.vimpac.axial_attention(
        q, k, v, cls_q, cls_k, cls_v, axis, key_padding_mask, dropout_p, scale, seed, int(block_rows or 0)
    )


# ---------------------------------------------------------------------------------------------------------------
# torch.library registration: an opaque op with autograd and fake (meta) kernels, so torch.compile and
# torch.export trace through it without entering the Triton launch.


def _define_ops() -> None:
    @torch.library.custom_op("vimpac::axial_attention", mutates_args=())
    def axial_attention_op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cls_q: torch.Tensor,
        cls_k: torch.Tensor,
        cls_v: torch.Tensor,
        axis: str,
        key_padding_mask: torch.Tensor | None,
        dropout_p: float,
        scale: float,
        seed: torch.Tensor,
        block_rows: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, cls_out = _forward(
            q, k, v, cls_q, cls_k, cls_v, axis, key_padding_mask, dropout_p, scale, seed, block_rows or None
        )
        return out, cls_out

    @torch.library.custom_op("vimpac::axial_attention_backward", mutates_args=())
    def axial_attention_backward_op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cls_q: torch.Tensor,
        cls_k: torch.Tensor,
        cls_v: torch.Tensor,
        axis: str,
        key_padding_mask: torch.Tensor | None,
        dropout_p: float,
        scale: float,
        seed: torch.Tensor,
        block_rows: int,
        dout: torch.Tensor,
        dcls: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _backward(
            q, k, v, cls_q, cls_k, cls_v, axis, key_padding_mask, dropout_p, scale, seed, block_rows or None, dout,
            dcls,
        )  # fmt: skip

    @axial_attention_op.register_fake
    def _(q, k, v, cls_q, cls_k, cls_v, axis, key_padding_mask, dropout_p, scale, seed, block_rows):
        return q.new_empty(q.shape), q.new_empty(cls_q.shape)

    @axial_attention_backward_op.register_fake
    def _(q, k, v, cls_q, cls_k, cls_v, axis, key_padding_mask, dropout_p, scale, seed, block_rows, dout, dcls):
        return (*(q.new_empty(q.shape) for _ in range(3)), *(q.new_empty(cls_q.shape) for _ in range(3)))

    def setup_context(ctx, inputs, output):
        q, k, v, cls_q, cls_k, cls_v, axis, key_padding_mask, dropout_p, scale, seed, block_rows = inputs
        # The seed tensor is saved, so backward regenerates the forward's keep mask.
        ctx.save_for_backward(q, k, v, cls_q, cls_k, cls_v, key_padding_mask, seed)
        ctx.args = (axis, dropout_p, scale, block_rows)

    def backward(ctx, dout, dcls):
        q, k, v, cls_q, cls_k, cls_v, key_padding_mask, seed = ctx.saved_tensors
        axis, dropout_p, scale, block_rows = ctx.args
        grads = torch.ops.vimpac.axial_attention_backward(
            q, k, v, cls_q, cls_k, cls_v, axis, key_padding_mask, dropout_p, scale, seed, block_rows, dout, dcls
        )
        # No gradient for axis, key_padding_mask, dropout_p, scale, seed (an integer tensor), block_rows.
        return (*grads, None, None, None, None, None, None)

    axial_attention_op.register_autograd(backward, setup_context=setup_context)


# Importing this file under a second module name must not register the op twice.
if not hasattr(torch.ops.vimpac, "axial_attention"):
    _define_ops()


def dropout_keep_mask(
    batch: int,
    lines_per_b: int,
    heads: int,
    seq: int,
    dropout_p: float,
    seed: int | torch.Tensor,
    device: torch.device | str = "cpu",
    block_rows: int | None = None,
) -> torch.Tensor:
    """The kernels' dropout keep mask (debug/tests): bool [B, lines, heads, seq, seq], seq = 1 + axis length.

    Lines are numbered as the reference numbers them (row-major over the two non-attended dims of T, H, W);
    entry [b, l, h, i, j] says whether probability (query i, key j) of that line and head survives dropout.
    seed: an int or an integer scalar tensor, as in `axial_attention_triton`. block_rows only changes how the
    work is tiled (as in `axial_attention_triton`), never the mask.
    """
    keep = torch.zeros(batch, lines_per_b, heads, seq, seq, dtype=torch.int8, device=device)
    if keep.numel() == 0:
        return keep.bool()
    block_m, lpp = _tile(seq, True, block_rows)
    progs_per_b = triton.cdiv(lines_per_b, lpp)
    grid = (batch * progs_per_b, heads)
    seed = _seed_tensor(seed, keep.device)
    with on_device(keep):
        _keep_mask_kernel[grid](
            keep, seed, float(dropout_p), lines_per_b, progs_per_b, heads, N=seq, LPP=lpp, BLOCK_M=block_m
        )  # fmt: skip
    return keep.bool()


__all__ = [
    "axial_attention_triton",
    "bytes_moved",
    "check_supported",
    "dropout_keep_mask",
]
