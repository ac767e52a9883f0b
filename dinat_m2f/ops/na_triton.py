"""Triton kernels of fused neighborhood attention (1D and 2D): forward and backward, registered as torch ops.

Semantics are those of the native ``na1d``/``na2d`` (shared/spec/neighborhood-attention.md): per axis, query ``i``
of dilation group ``r = i % d`` sees the ``k`` keys ``start + t*d`` with ``start = clamp(i//d - k//2, 0, L' - k)*d + r``
(``L'`` = tokens of the group; windows are shifted inward at the borders), the bias index of a (query, key) pair is
``(key - query)/d + k - 1``, and ``out = softmax(scale * q.k + rpb) v``.

Both dimensions run the same kernels on a 2D problem: 1D is ``H = 1`` with a kernel of height 1.

Tiling (why the products are ``tl.dot``s). All coordinates inside a kernel are *group* coordinates: the tokens of one
dilation group form a dense ``ceil((H-rh)/d) x ceil((W-rw)/d)`` map in which the window is an ordinary (non-dilated)
``k x k`` window. A program takes a ``TILE_H x TILE_W`` tile of queries of one group (8 x 8 in 2D, 1 x 64 in 1D:
64 queries, the M side of the products). Window starts are monotone in the query index and move by at most one per
query, so the union of the tile's windows (the "halo") is a ``(TILE_H + k - 1) x (TILE_W + k - 1)`` rectangle of keys
starting at the first query's window start. The program loads the halo once, ``BLOCK_N`` keys at a time (the halo
flattened row-major, so no power-of-two padding per halo row), computes ``q @ k^T`` for the whole tile, masks the
pairs outside each query's own window and runs an online softmax (logsumexp kept for the backward).

Wasted work: each query uses ``k*k`` of the ``(TILE_H + k - 1)(TILE_W + k - 1)`` halo keys (k = 7: 49 of 196, 25 %;
k = 11: 121 of 324, 37 %), plus the padding of the last ``BLOCK_N`` chunk; tiles that overhang the end of a group
(sides that are not multiples of the tile or of the dilation) compute masked rows. At the map borders the windows
pile up against the edge, so the halo is no larger there, only less used. The key pass of the backward uses the
inverse neighborhood, whose union for a tile of keys is at most ``(TILE + k - 1 + k//2)`` per axis (the border
queries share one window), so it wastes a little more.

Backward (flash-style, no float atomics, deterministic): ``delta = rowsum(dO * O)``; a query pass recomputes
``P = exp(scale q.k + rpb - lse)``, ``dS = P (dO v^T - delta)`` and accumulates ``dQ = scale dS K``; a key pass over
the inverse neighborhood accumulates ``dV = P^T dO`` and ``dK = scale dS^T Q``. When the bias needs a gradient, the
query pass also stores ``dS`` per (query, window slot) in float32 (``[B, heads, H, W, k*k]``, each entry written once)
and the bias gradient is reduced from it with two matmuls (:func:`_rpb_grad_from_slots`): deterministic, at the cost
of that transient buffer.

Precision: float16 / bfloat16 inputs with float32 accumulation (logits, softmax, accumulators; P and dS are rounded
to the input dtype before they enter a product, as in FlashAttention). float32 inputs use TF32 products exactly when
``torch.backends.cuda.matmul.allow_tf32`` is True (PyTorch's own switch, off by default), IEEE float32 otherwise.
float64 is not supported here: the native CUDA kernels are the float64 path.

CPU tensors are accepted only under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported),
which is how CI proves these kernels without a GPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # a clear error where the backend is asked for, see dinat_m2f.ops.backends
    triton = None
    _TRITON_IMPORT_ERROR: ImportError | None = exc
else:
    _TRITON_IMPORT_ERROR = None

__all__ = ["interpreter_active", "na1d", "na2d", "triton_unavailable_reason"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# triton.jit reads TRITON_INTERPRET when it decorates a kernel, i.e. when this module is imported: what counts is
# the value then, not a later change of the variable.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_active() -> bool:
    """True when these kernels run on the CPU (TRITON_INTERPRET=1 when this module was imported)."""
    return _INTERPRETED


def triton_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """None when the Triton kernels can run on ``device`` (default: the current CUDA device), else why not."""
    if triton is None:
        return f"triton is not importable ({_TRITON_IMPORT_ERROR})"
    device = torch.device("cuda" if device is None else device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if device.type == "cpu":
        if interpreter_active():
            return None
        return "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing triton"
    return f"Triton kernels run on CUDA devices, got {device.type}"


# ----------------------------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _window_start(g, group_len, K: tl.constexpr):
        # clamp(g - K//2, 0, group_len - K): group coordinates, the window shifted inward at the borders.
        return tl.minimum(tl.maximum(g - K // 2, 0), group_len - K)

    @triton.jit
    def _first_query(x, K: tl.constexpr):
        # The first query (group coordinates) whose window holds key x: 0 near the start, else x - K//2.
        return tl.where(x < K, 0, x - K // 2)

    @triton.jit
    def _tile_origin(pid, H, W, tiles_h, tiles_w, DH, DW, TH: tl.constexpr, TW: tl.constexpr):
        # Program -> (dilation group rh, rw; first tile row/col in group coordinates; group sizes).
        tile_w = pid % tiles_w
        rest = pid // tiles_w
        tile_h = rest % tiles_h
        rest = rest // tiles_h
        rw = rest % DW
        rh = rest // DW
        len_h = (H - rh + DH - 1) // DH
        len_w = (W - rw + DW - 1) // DW
        return rh, rw, tile_h * TH, tile_w * TW, len_h, len_w

    @triton.jit
    def _logits(
        a,
        b_t,
        RPB,
        head,
        rows_a_h,
        rows_a_w,
        rows_b_h,
        rows_b_w,
        q_is_a: tl.constexpr,
        scale,
        KH: tl.constexpr,
        KW: tl.constexpr,
        HAS_RPB: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # scale * a @ b_t (+ rpb). (rows_*_h, rows_*_w) are the group coordinates of the rows of a / columns of b_t;
        # q_is_a says which side holds the queries (the bias index is key - query).
        s = tl.dot(a, b_t, input_precision=PRECISION) * scale
        if HAS_RPB:
            if q_is_a:
                dh = rows_b_h[None, :] - rows_a_h[:, None]
                dw = rows_b_w[None, :] - rows_a_w[:, None]
            else:
                dh = rows_a_h[:, None] - rows_b_h[None, :]
                dw = rows_a_w[:, None] - rows_b_w[None, :]
            idx = (dh + KH - 1) * (2 * KW - 1) + (dw + KW - 1)
            ok = (dh > -KH) & (dh < KH) & (dw > -KW) & (dw < KW)
            bias = tl.load(RPB + head * (2 * KH - 1) * (2 * KW - 1) + idx, mask=ok, other=0.0)
            s += bias.to(tl.float32)
        return s

    @triton.jit
    def _na_forward_kernel(
        Q,
        K,
        V,
        RPB,
        OUT,
        LSE,
        scale,
        heads,
        H,
        W,
        D,
        tiles_h,
        tiles_w,
        KH: tl.constexpr,
        KW: tl.constexpr,
        DH,
        DW,
        TH: tl.constexpr,
        TW: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HAS_RPB: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # One flat grid (no 65535 limit on batch*heads): the tiles of one (batch, head) slice are consecutive.
        tiles = DH * DW * tiles_h * tiles_w
        bh = (tl.program_id(0) // tiles).to(tl.int64)
        head = bh % heads
        rh, rw, g0h, g0w, len_h, len_w = _tile_origin(tl.program_id(0) % tiles, H, W, tiles_h, tiles_w, DH, DW, TH, TW)
        base = bh * H * W * D

        offs_m = tl.arange(0, TH * TW)
        gh = g0h + offs_m // TW
        gw = g0w + offs_m % TW
        q_ok = (gh < len_h) & (gw < len_w)
        sh = _window_start(gh, len_h, KH)
        sw = _window_start(gw, len_w, KW)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q_tok = (rh + gh * DH) * W + rw + gw * DW
        q = tl.load(Q + base + q_tok[:, None] * D + offs_d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)

        halo_h0 = _window_start(g0h, len_h, KH)
        halo_w0 = _window_start(g0w, len_w, KW)
        HALO_W: tl.constexpr = TW + KW - 1
        HALO_N: tl.constexpr = (TH + KH - 1) * HALO_W

        m_i = tl.full([TH * TW], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([TH * TW], dtype=tl.float32)
        acc = tl.zeros([TH * TW, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, HALO_N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kh = halo_h0 + offs_n // HALO_W
            kw = halo_w0 + offs_n % HALO_W
            k_ok = (offs_n < HALO_N) & (kh < len_h) & (kw < len_w)
            k_tok = (rh + kh * DH) * W + rw + kw * DW
            kv_mask = k_ok[:, None] & d_ok[None, :]
            k = tl.load(K + base + k_tok[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            s = _logits(q, tl.trans(k), RPB, head, gh, gw, kh, kw, True, scale, KH, KW, HAS_RPB, PRECISION)
            in_window = (
                k_ok[None, :]
                & (kh[None, :] >= sh[:, None])
                & (kh[None, :] < sh[:, None] + KH)
                & (kw[None, :] >= sw[:, None])
                & (kw[None, :] < sw[:, None] + KW)
            )
            s = tl.where(in_window, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + base + k_tok[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        l_safe = tl.where(q_ok, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(
            OUT + base + q_tok[:, None] * D + offs_d[None, :],
            out.to(OUT.dtype.element_ty),
            mask=q_ok[:, None] & d_ok[None, :],
        )
        tl.store(LSE + bh * H * W + q_tok, m_i + tl.log(l_safe), mask=q_ok)

    @triton.jit
    def _na_backward_query_kernel(
        Q,
        K,
        V,
        RPB,
        DO,
        LSE,
        DELTA,
        DQ,
        DS,
        scale,
        heads,
        H,
        W,
        D,
        tiles_h,
        tiles_w,
        KH: tl.constexpr,
        KW: tl.constexpr,
        DH,
        DW,
        TH: tl.constexpr,
        TW: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HAS_RPB: tl.constexpr,
        STORE_DS: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # dQ = scale * dS K over each query's window; optionally dS per (query, window slot) for the bias gradient.
        # One flat grid (no 65535 limit on batch*heads): the tiles of one (batch, head) slice are consecutive.
        tiles = DH * DW * tiles_h * tiles_w
        bh = (tl.program_id(0) // tiles).to(tl.int64)
        head = bh % heads
        rh, rw, g0h, g0w, len_h, len_w = _tile_origin(tl.program_id(0) % tiles, H, W, tiles_h, tiles_w, DH, DW, TH, TW)
        base = bh * H * W * D

        offs_m = tl.arange(0, TH * TW)
        gh = g0h + offs_m // TW
        gw = g0w + offs_m % TW
        q_ok = (gh < len_h) & (gw < len_w)
        sh = _window_start(gh, len_h, KH)
        sw = _window_start(gw, len_w, KW)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q_tok = (rh + gh * DH) * W + rw + gw * DW
        q_mask = q_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + base + q_tok[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + base + q_tok[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * H * W + q_tok, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + bh * H * W + q_tok, mask=q_ok, other=0.0)

        halo_h0 = _window_start(g0h, len_h, KH)
        halo_w0 = _window_start(g0w, len_w, KW)
        HALO_W: tl.constexpr = TW + KW - 1
        HALO_N: tl.constexpr = (TH + KH - 1) * HALO_W

        dq = tl.zeros([TH * TW, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, HALO_N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kh = halo_h0 + offs_n // HALO_W
            kw = halo_w0 + offs_n % HALO_W
            k_ok = (offs_n < HALO_N) & (kh < len_h) & (kw < len_w)
            k_tok = (rh + kh * DH) * W + rw + kw * DW
            kv_mask = k_ok[:, None] & d_ok[None, :]
            k = tl.load(K + base + k_tok[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + base + k_tok[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            s = _logits(q, tl.trans(k), RPB, head, gh, gw, kh, kw, True, scale, KH, KW, HAS_RPB, PRECISION)
            in_window = (
                q_ok[:, None]
                & k_ok[None, :]
                & (kh[None, :] >= sh[:, None])
                & (kh[None, :] < sh[:, None] + KH)
                & (kw[None, :] >= sw[:, None])
                & (kw[None, :] < sw[:, None] + KW)
            )
            p = tl.where(in_window, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
            if STORE_DS:
                slot = (kh[None, :] - sh[:, None]) * KW + (kw[None, :] - sw[:, None])
                tl.store(DS + (bh * H * W + q_tok[:, None]) * (KH * KW) + slot, ds, mask=in_window)

        tl.store(DQ + base + q_tok[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _na_backward_key_kernel(
        Q,
        K,
        V,
        RPB,
        DO,
        LSE,
        DELTA,
        DK,
        DV,
        scale,
        heads,
        H,
        W,
        D,
        tiles_h,
        tiles_w,
        KH: tl.constexpr,
        KW: tl.constexpr,
        DH,
        DW,
        TH: tl.constexpr,
        TW: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HAS_RPB: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # dV = P^T dO and dK = scale * dS^T Q over each key's inverse neighborhood (gather: no races).
        # One flat grid (no 65535 limit on batch*heads): the tiles of one (batch, head) slice are consecutive.
        tiles = DH * DW * tiles_h * tiles_w
        bh = (tl.program_id(0) // tiles).to(tl.int64)
        head = bh % heads
        rh, rw, g0h, g0w, len_h, len_w = _tile_origin(tl.program_id(0) % tiles, H, W, tiles_h, tiles_w, DH, DW, TH, TW)
        base = bh * H * W * D

        offs_m = tl.arange(0, TH * TW)
        kh = g0h + offs_m // TW
        kw = g0w + offs_m % TW
        k_ok = (kh < len_h) & (kw < len_w)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        k_tok = (rh + kh * DH) * W + rw + kw * DW
        k_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(K + base + k_tok[:, None] * D + offs_d[None, :], mask=k_mask, other=0.0)
        v = tl.load(V + base + k_tok[:, None] * D + offs_d[None, :], mask=k_mask, other=0.0)

        # Queries whose windows meet the tile: from the first query of the first key (rows/cols bounded below).
        inv_h0 = _first_query(g0h, KH)
        inv_w0 = _first_query(g0w, KW)
        INV_W: tl.constexpr = TW + KW - 1 + KW // 2
        INV_N: tl.constexpr = (TH + KH - 1 + KH // 2) * INV_W

        dk = tl.zeros([TH * TW, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([TH * TW, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, INV_N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            qh = inv_h0 + offs_n // INV_W
            qw = inv_w0 + offs_n % INV_W
            q_ok = (offs_n < INV_N) & (qh < len_h) & (qw < len_w)
            sh = _window_start(qh, len_h, KH)
            sw = _window_start(qw, len_w, KW)
            q_tok = (rh + qh * DH) * W + rw + qw * DW
            q_mask = q_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + base + q_tok[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(DO + base + q_tok[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
            lse = tl.load(LSE + bh * H * W + q_tok, mask=q_ok, other=0.0)
            delta = tl.load(DELTA + bh * H * W + q_tok, mask=q_ok, other=0.0)
            s_t = _logits(k, tl.trans(q), RPB, head, kh, kw, qh, qw, False, scale, KH, KW, HAS_RPB, PRECISION)
            in_window = (
                k_ok[:, None]
                & q_ok[None, :]
                & (kh[:, None] >= sh[None, :])
                & (kh[:, None] < sh[None, :] + KH)
                & (kw[:, None] >= sw[None, :])
                & (kw[:, None] < sw[None, :] + KW)
            )
            p_t = tl.where(in_window, tl.exp(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

        tl.store(DK + base + k_tok[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=k_mask)
        tl.store(DV + base + k_tok[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=k_mask)


# ----------------------------------------------------------------------------------------------- launch helpers


class _Problem:
    """The 2D view of a 1D or 2D problem: per-axis sizes, kernel, dilation, and the tile/launch geometry."""

    def __init__(self, q: torch.Tensor, kernel_size: int, dilation: int) -> None:
        self.dim = q.dim() - 3
        self.batch, self.heads = q.shape[0], q.shape[1]
        self.head_dim = q.shape[-1]
        if self.dim == 2:
            self.height, self.width = q.shape[2], q.shape[3]
            self.kh, self.dh = kernel_size, dilation
            self.tile_h, self.tile_w = 8, 8
        else:
            self.height, self.width = 1, q.shape[2]
            self.kh, self.dh = 1, 1
            self.tile_h, self.tile_w = 1, 64
        self.kw, self.dw = kernel_size, dilation
        self.block_n = 64
        self.block_d = max(16, triton.next_power_of_2(self.head_dim))
        self.launch = launch_options(q.dtype)

    def grid(self) -> tuple[int]:
        return (self.dh * self.dw * self.tiles_h * self.tiles_w * self.batch * self.heads,)

    @property
    def tiles_h(self) -> int:
        return triton.cdiv(triton.cdiv(self.height, self.dh), self.tile_h)

    @property
    def tiles_w(self) -> int:
        return triton.cdiv(triton.cdiv(self.width, self.dw), self.tile_w)

    def common_args(self) -> tuple:
        return (self.heads, self.height, self.width, self.head_dim, self.tiles_h, self.tiles_w)

    def kernel_kwargs(self) -> dict:
        # Kernel sizes and tiles are constexprs (they size the halo); dilations are runtime (one compile for all).
        return dict(
            KH=self.kh,
            KW=self.kw,
            DH=self.dh,
            DW=self.dw,
            TH=self.tile_h,
            TW=self.tile_w,
            BLOCK_N=self.block_n,
            BLOCK_D=self.block_d,
        )


def launch_options(dtype: torch.dtype) -> dict:
    """num_warps / num_stages of every launch. float32 tiles are twice as large in shared memory: with Triton's
    default 3 stages the backward at head_dim 128 needs 246 KB, over Hopper's 227 KB, so float32 pipelines 2 deep
    (164 KB); tests/test_na_triton.py checks the compiled sizes."""
    return {"num_warps": 4, "num_stages": 2 if dtype == torch.float32 else 3}


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for float16/bfloat16 operands


def _check_inputs(name: str, dim: int, q, k, v, rpb, kernel_size: int, dilation: int) -> None:
    reason = triton_unavailable_reason(q.device)
    if reason is not None:
        raise RuntimeError(f"{name} (backend 'triton'): {reason}")
    for tname, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != dim + 3:
            raise ValueError(f"{name}: {tname} must be a {dim + 3}-D tensor, got shape {tuple(t.shape)}")
        if t.shape != q.shape:
            raise ValueError(f"{name}: {tname} has shape {tuple(t.shape)} but q has {tuple(q.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name}: {tname} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} (backend 'triton') supports float16, bfloat16 and float32, got q of {q.dtype}; "
            "use backend='native' for float64"
        )
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] < 1:
        raise ValueError(f"{name} (backend 'triton'): head_dim must be in 1..{MAX_HEAD_DIM}, got {q.shape[-1]}")
    if isinstance(kernel_size, bool) or kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"{name}: kernel_size must be an odd integer > 1, got {kernel_size}")
    if dilation < 1:
        raise ValueError(f"{name}: dilation must be >= 1, got {dilation}")
    for axis, size in enumerate(q.shape[2 : 2 + dim]):
        if size < kernel_size * dilation:
            raise ValueError(
                f"{name}: axis {axis} of q has size {size}, smaller than kernel_size * dilation = "
                f"{kernel_size} * {dilation}; pad the map to at least {kernel_size * dilation}"
            )
    if rpb is not None:
        expected = (q.shape[1],) + (2 * kernel_size - 1,) * dim
        if tuple(rpb.shape) != expected:
            raise ValueError(
                f"{name}: rpb must have shape {expected} ([heads] + [2k-1] * {dim}), got {tuple(rpb.shape)}"
            )
        if rpb.device != q.device:
            raise ValueError(f"{name}: rpb is on {rpb.device} but q is on {q.device}")


def _forward_impl(q, k, v, rpb, kernel_size: int, dilation: int, scale: float):
    prob = _Problem(q, kernel_size, dilation)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    rpb_arg = rpb.contiguous() if rpb is not None else q  # never read when HAS_RPB is False
    _na_forward_kernel[prob.grid()](
        q,
        k,
        v,
        rpb_arg,
        out,
        lse,
        scale,
        *prob.common_args(),
        **prob.kernel_kwargs(),
        HAS_RPB=rpb is not None,
        PRECISION=_precision(q.dtype),
        **prob.launch,
    )
    return out, lse


def _rpb_grad_from_slots(ds: torch.Tensor, prob: _Problem) -> torch.Tensor:
    """Bias gradient [heads, 2kh-1, 2kw-1] from dS per (query, window slot) [B, heads, H, W, kh*kw] (float32).

    Query i's slot t has bias index pb(i) + t with pb(i) = (start(i) - i)/d + k - 1 in [0, k-1] per axis. Summing
    over queries with one-hot matrices of pb (then spreading each (pb, t) to pb + t) is a pair of matmuls, so the
    reduction is deterministic (no scatter-add).
    """
    from dinat_m2f.ops.reference import _bias_indices, window_indices

    def one_hot_bias_start(length: int, kernel: int, dil: int) -> torch.Tensor:
        idx = window_indices(length, kernel, dil, ds.device)
        return torch.nn.functional.one_hot(_bias_indices(idx, kernel, dil)[:, 0], kernel).to(ds.dtype)

    def spread(kernel: int) -> torch.Tensor:  # [pb, t, bias index] = (pb + t == index)
        pb = torch.arange(kernel, device=ds.device)
        return torch.nn.functional.one_hot(pb[:, None] + pb[None, :], 2 * kernel - 1).to(ds.dtype)

    slots = ds.view(prob.batch, prob.heads, prob.height, prob.width, prob.kh, prob.kw)
    oh_h = one_hot_bias_start(prob.height, prob.kh, prob.dh)
    oh_w = one_hot_bias_start(prob.width, prob.kw, prob.dw)
    per_start = torch.einsum("bnijxy,ip,jq->npqxy", slots, oh_h, oh_w)
    return torch.einsum("npqxy,pxa,qyb->nab", per_start, spread(prob.kh), spread(prob.kw))


def _backward_impl(grad_out, q, k, v, rpb, out, lse, kernel_size: int, dilation: int, scale: float, rpb_grad: bool):
    prob = _Problem(q, kernel_size, dilation)
    grad_out, q, k, v = grad_out.contiguous(), q.contiguous(), k.contiguous(), v.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    store_ds = rpb is not None and rpb_grad
    ds = (
        torch.zeros((*q.shape[:-1], prob.kh * prob.kw), dtype=torch.float32, device=q.device)
        if store_ds
        else lse  # never written when STORE_DS is False
    )
    rpb_arg = rpb.contiguous() if rpb is not None else q
    common = dict(**prob.kernel_kwargs(), HAS_RPB=rpb is not None, PRECISION=_precision(q.dtype), **prob.launch)
    _na_backward_query_kernel[prob.grid()](
        q, k, v, rpb_arg, grad_out, lse, delta, dq, ds, scale, *prob.common_args(), STORE_DS=store_ds, **common
    )
    _na_backward_key_kernel[prob.grid()](
        q, k, v, rpb_arg, grad_out, lse, delta, dk, dv, scale, *prob.common_args(), **common
    )
    if store_ds:
        grad_rpb = _rpb_grad_from_slots(ds, prob).reshape(rpb.shape).to(rpb.dtype)
    else:
        grad_rpb = q.new_empty((0,))
    return dq, dk, dv, grad_rpb


# ----------------------------------------------------------------------------------------------- torch ops


def _define_ops(dim: int):
    """dinat_m2f::na{dim}d_triton_forward / _backward as opaque custom ops with fake kernels and autograd."""
    prefix = f"dinat_m2f::na{dim}d_triton"

    @torch.library.custom_op(f"{prefix}_forward", mutates_args=())
    def forward_op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rpb: torch.Tensor | None,
        kernel_size: int,
        dilation: int,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_inputs(f"na{dim}d", dim, q, k, v, rpb, kernel_size, dilation)
        return _forward_impl(q, k, v, rpb, kernel_size, dilation, scale)

    @forward_op.register_fake
    def _(q, k, v, rpb, kernel_size, dilation, scale):
        return torch.empty_like(v), q.new_empty(q.shape[:-1], dtype=torch.float32)

    @torch.library.custom_op(f"{prefix}_backward", mutates_args=())
    def backward_op(
        grad_out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rpb: torch.Tensor | None,
        out: torch.Tensor,
        lse: torch.Tensor,
        kernel_size: int,
        dilation: int,
        scale: float,
        rpb_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _backward_impl(grad_out, q, k, v, rpb, out, lse, kernel_size, dilation, scale, rpb_grad)

    @backward_op.register_fake
    def _(grad_out, q, k, v, rpb, out, lse, kernel_size, dilation, scale, rpb_grad):
        grad_rpb = torch.empty_like(rpb) if rpb is not None and rpb_grad else q.new_empty((0,))
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), grad_rpb

    def setup_context(ctx, inputs, output):
        q, k, v, rpb, kernel_size, dilation, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, rpb, out, lse)
        ctx.kernel_size, ctx.dilation, ctx.scale = kernel_size, dilation, scale
        # the logsumexp is backward state: not differentiable, its gradient never zeros (as the CPU fused ops')
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, _grad_lse):
        if grad_out is None:
            return (None,) * 7
        q, k, v, rpb, out, lse = ctx.saved_tensors
        rpb_grad = rpb is not None and ctx.needs_input_grad[3]
        dq, dk, dv, drpb = backward_op(
            grad_out, q, k, v, rpb, out, lse, ctx.kernel_size, ctx.dilation, ctx.scale, rpb_grad
        )
        return dq, dk, dv, (drpb if rpb_grad else None), None, None, None

    def double_backward(ctx, *grads):
        raise NotImplementedError(
            f"double backward of the Triton na{dim}d is not supported; use backend='reference' (or compose "
            f"na{dim}d_qk, softmax and na{dim}d_av) for higher-order gradients"
        )

    forward_op.register_autograd(backward, setup_context=setup_context)
    backward_op.register_autograd(double_backward, setup_context=lambda ctx, inputs, output: None)
    return forward_op


# Defined at import (not lazily): torch.compile traces calls to these ops, never their definition.
_FORWARD_OPS = {dim: _define_ops(dim) for dim in (1, 2)}


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def na1d(q, k, v, kernel_size: int, dilation: int = 1, rpb=None, scale: float | None = None) -> torch.Tensor:
    """Triton softmax(scale * q.k + rpb) v over 1D neighborhoods; q, k, v: [B, heads, L, D], rpb: [heads, 2k-1]."""
    return _FORWARD_OPS[1](q, k, v, rpb, kernel_size, dilation, _scale(q, scale))[0]


def na2d(q, k, v, kernel_size: int, dilation: int = 1, rpb=None, scale: float | None = None) -> torch.Tensor:
    """Triton softmax(scale * q.k + rpb) v over 2D neighborhoods; q, k, v: [B, heads, H, W, D]."""
    return _FORWARD_OPS[2](q, k, v, rpb, kernel_size, dilation, _scale(q, scale))[0]
