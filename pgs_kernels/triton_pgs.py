r"""Fused Triton kernel of PGS selection (docs/algorithm.md; symbols as there).

For image ``b`` with a ``GH x GW`` grid of patches (``L = GH GW``), ``C``
channels, ``k`` candidates, ``K`` kept and ``M = L - K`` dropped, one program
runs six steps, one ``@triton.jit`` helper each:

1. ``_edge_pass`` reads the image once, top to bottom, a pixel column per
   lane (a warp covers ``_SEG = 30`` columns plus a halo column each side;
   wide images go in strips of 8 warps). Per row: ``Ysum = Σ_c x_c``,
   ``Y = Ysum / C`` (the Sobel filter runs on the mean, not the sum, so that
   it holds in fp32 to the same pixel size whatever ``C``), ``Y(x±1)`` from
   the neighbouring lanes (``tl.gather`` within the warp; at the image border
   a column is its own neighbour), ``hs = Y(x-1) + 2Y(x) + Y(x+1)``,
   ``hd = Y(x+1) - Y(x-1)``. With the rows above and below in registers,
   ``Gx = hd(y-1) + 2hd(y) + hd(y+1)``, ``Gy = hs(y+1) - hs(y-1)``,
   ``G = sqrt(Gx² + Gy²)`` (rows past the top and bottom replicate them).
   Per band of ``P`` rows each lane sums over its column ``col_g = Σ G`` and,
   with ``s`` its channel-0 pixel in the band's
   first row, ``col_t = Σ (Ysum - s⊕C)`` (``s⊕C``: ``s`` added ``C`` times in
   the channel order, so a constant column gives exactly 0) and
   ``col_q = Σ_c (x_c - s)²``: one store of each per band.
2. ``_patch_stats``: per patch ``j`` over its ``P`` columns of ``n = C P``
   values: ``e_j = Σ col_g / P²``; the mean
   ``c_j = s_0 + (1/P) Σ_col ((s_col - s_0) + col_t/n)`` (``s_0`` the first
   column's shift); the centred norm by Chan's merge,
   ``‖x̃_j‖² = Σ_col (col_q - col_t²/n) + n Σ_col (m_col - c_j)²`` with
   ``m_col = s_col + col_t/n``, and ``ι_j = 1 / (‖x̃_j‖ + 1e-6)``. A constant
   patch gets ``c_j`` equal to its value and ``‖x̃_j‖ = 0``, exactly.
   ``_edge_keys``: ``ê_j = (e_j - min e) / (max e - min e + 1e-6)`` (a NaN
   ``e`` makes every ``ê`` NaN, as ``amin``/``amax`` do),
   ``key_j = u_j + w_e ê_j``, NaN -> +inf, -0 -> +0.
3. ``_order``: one sort (``tl.sort``, bitonic) of ``key_j`` packed over ``j``,
   the order-preserving unsigned image of the key's bits in the high word and
   ``j`` in the low one, so patches come in ``(key, j)`` order;
   ``order[r]`` is the ``r``-th, the candidates are ``order[0..k)``.
4. ``_similarity_block``: ``S`` (``k x L``) in tiles of ``BK ≥ k`` candidates x
   ``BJ`` patches, each pixel tile read once for all candidates:
   ``acc_ij = Σ_e (x_ie - c_i)(x_je - c_j)`` (``tl.dot`` with fp32
   accumulators, patches-major: by default on the tensor cores as
   ``hi·hi + hi·lo + lo·hi`` of the exact tf32 splits ``x = hi + lo``
   (``_dot_into``, ``DOT = "tf32x3"``; ``"ieee"``: FMA on the CUDA cores);
   padding elements add exactly 0) and ``S^x_ij = acc_ij ι_i ι_j``; tokens:
   ``acc^t_ij = <t_i, t_j>`` (bf16/fp16 on the tensor cores, products exact in
   the fp32 accumulator) with ``ι^t`` from ``_token_norms``; then
   ``S = (1-α) S^x + α S^t``. ``ι = 0`` (a squared norm that overflowed fp32)
   makes a term exactly 0, as ``v / inf`` does in fp32; a token holding Inf
   gets a NaN norm (its terms are ``t² + t·0``), as ``t / inf`` gives NaN.
5. ``_sinkhorn_scaling``: with OT, the contract's ``T`` log-domain Sinkhorn steps in
   their scaling form. In base 2, ``z = S log2(e)/ε``, ``c_i = max_j z_ij``,
   ``K_ij = 2^(z_ij - c_i)``; from ``B = 1``,
   ``A_i = (1/k) / Σ_j K_ij B_j``, ``B_j = (1/L) / Σ_i K_ij A_i`` (so that
   ``A_i = 2^(f_i/ln2 + c_i)``, ``B_j = 2^(g_j/ln2)``) and
   ``r_j = L B_j Σ_i K_ij A_i S_ij``: two mat-vecs a step, over two copies
   of ``K`` (the second transposed through scratch) so that neither reduces
   across warps, and ``1/x`` as ``rsqrt(x)²``. The algebra is
   exact; fp32 holds it when ``S`` is finite, every ``K_ij ≥ e^-80`` and every
   sum stays in ``[1e-30, 1e30]`` (a sum outside is counted: after the steps
   from the sums' running min and max on a register tile, by ``_scale``
   turning it into NaN, which reaches ``r``, when streamed). Otherwise ``_sinkhorn_log`` runs the steps
   themselves: ``f_i = log2(1/k) - LSE2_j(z_ij + g_j)``,
   ``g_j = log2(1/L) - LSE2_i(z_ij + f_i)``,
   ``r_j = L Σ_i 2^(z_ij + f_i + g_j) S_ij``. When ``S`` does not fit one
   register tile, ``_sinkhorn_stream`` and ``_sinkhorn_stream_log`` do the same
   streaming ``K``, made once and kept transposed in scratch. Without OT
   ``r_j = max_i S_ij``; ``k = 0`` gives
   ``r = -inf``.
6. ``_select``: tier 0 for the first ``k`` in ``order``, 1 where ``r > θ``, 2
   otherwise; walking ``order``, a patch's drop position is its place ``r``
   (tier 0), ``k`` + the tier-1 patches before it (tier 1), or ``k`` + all
   tier-1 patches + the tier-2 patches before it (tier 2): exclusive prefix
   sums. Dropped when the position is ``< M``; a kept patch goes to slot
   ``#{kept l < j}`` of ``keep_idx``.

Design. One program per image, ``grid = (B,)`` (fewer programs striding over
the batch when the per-program scratch would pass ``_SCRATCH_BUDGET``): every
step reduces over the whole image, so there is no host sync and no
cross-program communication. The pixels are read twice (the candidates depend
on all of pass 1). With both the pixel and the token term on, steps 1-3 and
the pixel term run in a first launch (``FIRST``) and the token term, Sinkhorn
and the selection in a second (``LAST``), which finds the first's
per-program scratch: each kernel then holds one dot's tiles and fits 128
registers, two 8-warp blocks an SM, without spilling (one launch does both
when programs stride over several images). Per-patch vectors read back in
another layout, and ``S`` when it spans blocks, go through the per-program
scratch in global memory (L1/L2 resident), ordered by ``tl.debug_barrier``
(a CTA barrier, which also orders global memory within the CTA). Loop bounds
are compile-time constants (one compile per shape), so the interpreter runs
the same loops; so are the image's and the tokens' strides (a contiguous
input's follow from its shape), which lets every load of pass 1 take its
offset as an immediate. Launch settings (warps, stages, register cap, the
pixel product's precision) come from ``triton_tuning``: a table a GPU's
sweep wrote, else the offline best. ``bench/kernel_report.py`` says what it
costs on sm_90 and sm_80.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import triton_tuning

__all__ = ["pgs_select_triton", "MAX_PATCHES"]

MAX_PATCHES = 1024
_LOG2E = 1.4426950408889634
# Scratch per call is capped; past it, fewer programs stride over the batch.
_SCRATCH_BUDGET = 256 << 20
# Largest tile of S (BK x patches) Sinkhorn keeps in registers; past it, S is streamed from scratch.
_S_TILE = 4096
# Elements of one similarity tile (BK candidates x BJ patches).
_SIM_TILE = 4096
# A warp's 32 lanes cover this many image columns, plus a halo column each side.
_SEG: tl.constexpr = tl.constexpr(30)
# The scaling form of Sinkhorn needs K_ij >= e^-80, i.e. log2 K_ij >= -80 log2(e).
_MIN_LOG2_K: tl.constexpr = tl.constexpr(-80.0 * _LOG2E)


# ---- 1. edge energy and patch means -----------------------------------------------------


@triton.jit
def _load_row(img_b, s_c, s_h, s_w, y, x, xok, il, ir, inv_c, shift, q, C: tl.constexpr, FIRST: tl.constexpr):
    """One image row at the lanes' columns: the Sobel row terms ``hs``, ``hd``
    of ``Y``, the channel sum ``Σ_c x_c``, ``q + Σ_c (x_c - s)²`` (one FMA a
    channel into the column's running sum) and the shift ``s`` (the channel-0
    pixel itself when ``FIRST``, whose own term is then 0). Lanes outside the
    image load nothing: they only feed the halo lanes, never an owned column."""
    row = img_b + y * s_h + x * s_w
    v = tl.load(row, mask=xok).to(tl.float32)
    if FIRST:
        shift = v
    else:
        d = v - shift
        q += d * d
    ysum = v
    for c in tl.static_range(1, C):
        v = tl.load(row + c * s_c, mask=xok).to(tl.float32)
        ysum += v
        d = v - shift
        q += d * d
    yv = ysum * inv_c
    yl = tl.gather(yv, il, axis=1)
    yr = tl.gather(yv, ir, axis=1)
    return yl + 2.0 * yv + yr, yr - yl, ysum, q, shift


@triton.jit
def _repeat_sum(v, C: tl.constexpr):
    """``v`` added ``C`` times in order, as ``_load_row`` sums the channels."""
    acc = v
    for _c in tl.static_range(1, C):
        acc += v
    return acc


@triton.jit
def _sobel(hs_up, hd_up, hd_mid, hs_dn, hd_dn):
    gx = hd_up + 2.0 * hd_mid + hd_dn
    gy = hs_dn - hs_up
    return tl.sqrt(gx * gx + gy * gy)


@triton.jit
def _edge_pass(img_b, s_c, s_h, s_w, col_g, col_t, col_q, col_s,
               C: tl.constexpr, P: tl.constexpr, GH: tl.constexpr, W: tl.constexpr, NSEG: tl.constexpr,
               NSTRIP: tl.constexpr):
    """Step 1: column sums per band of ``P`` rows (module docstring), in
    vertical strips of ``NSEG`` warps' worth of columns."""
    seg = tl.arange(0, NSEG)[:, None]
    lane = tl.arange(0, 32)[None, :]
    inv_c = 1.0 / C
    for strip in range(NSTRIP):
        x = strip * (NSEG * _SEG) + seg * _SEG + lane - 1
        xok = (x >= 0) & (x < W)
        # Neighbour lanes; at the image border a column is its own neighbour.
        il = tl.where(x == 0, lane, tl.maximum(lane - 1, 0))
        ir = tl.where(x == W - 1, lane, tl.minimum(lane + 1, 31))
        own = xok & (lane > 0) & (lane < 31)
        zero = tl.zeros(x.shape, tl.float32)
        # Row -1 replicates row 0.
        hs_mid, hd_mid, _y, _q, _s = _load_row(img_b, s_c, s_h, s_w, 0, x, xok, il, ir, inv_c, zero, zero, C,
                                               True)
        hs_up = hs_mid
        hd_up = hd_mid
        g_sum = zero
        for band in range(GH):
            y0 = band * P
            # The band's first row completes G of the row above it (previous
            # band) and gives each lane its shift s (own channel-0 pixel).
            hs_dn, hd_dn, ysum, q_sum, shift = _load_row(img_b, s_c, s_h, s_w, y0, x, xok, il, ir, inv_c, zero,
                                                         zero, C, True)
            shift_sum = _repeat_sum(shift, C)
            t_sum = ysum - shift_sum
            g = _sobel(hs_up, hd_up, hd_mid, hs_dn, hd_dn)
            if band > 0:
                tl.store(col_g + (band - 1) * W + x, g_sum + g, mask=own)
            g_sum = zero
            hs_up, hd_up, hs_mid, hd_mid = hs_mid, hd_mid, hs_dn, hd_dn
            for r in tl.static_range(1, P):
                hs_dn, hd_dn, ysum, q_sum, _s = _load_row(img_b, s_c, s_h, s_w, y0 + r, x, xok, il, ir, inv_c,
                                                          shift, q_sum, C, False)
                t_sum += ysum - shift_sum
                g_sum += _sobel(hs_up, hd_up, hd_mid, hs_dn, hd_dn)
                hs_up, hd_up, hs_mid, hd_mid = hs_mid, hd_mid, hs_dn, hd_dn
            tl.store(col_t + band * W + x, t_sum, mask=own)
            tl.store(col_q + band * W + x, q_sum, mask=own)
            tl.store(col_s + band * W + x, shift, mask=own)
        # The last row: the row below replicates it.
        g = _sobel(hs_up, hd_up, hd_mid, hs_mid, hd_mid)
        tl.store(col_g + (GH - 1) * W + x, g_sum + g, mask=own)


@triton.jit
def _patch_stats(col_g, col_t, col_q, col_s, ws_e, ws_cen, ws_inv,
                 C: tl.constexpr, P: tl.constexpr, GW: tl.constexpr, L: tl.constexpr, BLOCK_L: tl.constexpr):
    """Step 2a: ``e_j``, the patch means ``c_j`` and the inverse centred norms
    ``ι_j = 1 / (‖x_j - mean‖ + 1e-6)`` (to scratch). With ``n = C P`` values a
    column, column mean ``m = s + t/n`` and ``M2_col = q - t²/n``; the patch
    merges its columns (Chan): ``‖x̃‖² = Σ_col M2_col + n Σ_col (m_col - c)²``,
    all in differences from the first column's shift ``s_0``."""
    W: tl.constexpr = GW * P
    N: tl.constexpr = C * P
    NB: tl.constexpr = BLOCK_L if BLOCK_L < 256 else 256
    for jb in range(0, L, NB):
        j = jb + tl.arange(0, NB)
        jok = j < L
        at = tl.where(jok, (j // GW) * W + (j % GW) * P, 0)
        s0 = tl.load(col_s + at)
        g = tl.zeros((NB,), tl.float32)
        dm = tl.zeros((NB,), tl.float32)
        for u in range(P):
            g += tl.load(col_g + at + u)
            dm += (tl.load(col_s + at + u) - s0) + tl.load(col_t + at + u) * (1.0 / N)
        dm = dm * (1.0 / P)  # c - s0
        m2 = tl.zeros((NB,), tl.float32)
        for u in range(P):
            t = tl.load(col_t + at + u)
            q = tl.load(col_q + at + u)
            dc = (tl.load(col_s + at + u) - s0) + t * (1.0 / N) - dm
            # An overflowed q stays +inf (a zero vector below), never inf - inf.
            m2 += tl.where(q == float("inf"), q, q - t * (t * (1.0 / N))) + N * (dc * dc)
        tl.store(ws_e + j, g * (1.0 / (P * P)), mask=jok)
        tl.store(ws_cen + j, s0 + dm, mask=jok)
        # Rounding can leave m2 a hair below 0; NaN stays NaN (tl.maximum would drop it on a GPU).
        tl.store(ws_inv + j, _inv_norm(tl.where(m2 < 0.0, 0.0, m2)), mask=jok)


@triton.jit
def _edge_keys(e, noise_b, s_nl, edge_b, edge_weight,
               L: tl.constexpr, BLOCK_L: tl.constexpr, USE_EDGE: tl.constexpr):
    """Step 2b: ``ê`` (stored) and the keys (returned; padding lanes +inf)."""
    INF: tl.constexpr = float("inf")
    j = tl.arange(0, BLOCK_L)
    jok = j < L
    lo = tl.min(tl.where(jok, e, INF), axis=0)
    hi = tl.max(tl.where(jok, e, -INF), axis=0)
    nan_e = tl.sum((jok & (e != e)).to(tl.int32), axis=0)
    edge = (e - lo) / (hi - lo + 1e-6)
    edge = tl.where(nan_e > 0, float("nan"), edge)
    tl.store(edge_b + j, edge, mask=jok)
    key = tl.load(noise_b + j * s_nl, mask=jok, other=0.0).to(tl.float32)
    if USE_EDGE:
        key = key + edge_weight * edge
    key = tl.where(key != key, INF, key)
    key = tl.where(key == 0.0, 0.0, key)  # -0 ties with +0, as in a stable sort
    return tl.where(jok, key, INF)


# ---- 3. order and candidates -------------------------------------------------------------


@triton.jit
def _order(key, ws_order, cand_b, k, BLOCK_L: tl.constexpr):
    """Step 3: the patches in (key, j) order, by one sort of ``key`` packed over
    ``j``: the key's bits mapped so that unsigned order is float order (flip
    every bit of a negative, set the sign bit of a positive) in the high word,
    ``j`` in the low word. The first ``k`` are the candidates."""
    j = tl.arange(0, BLOCK_L)
    bits = key.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, ~bits, bits | -2147483648).to(tl.uint32)
    packed = tl.sort((ordered.to(tl.uint64) << 32) | j.to(tl.uint64))
    order = (packed & 0xFFFFFFFF).to(tl.int32)
    tl.store(ws_order + j, order)
    tl.store(cand_b + j, order.to(tl.int64), mask=j < k)


# ---- 4. similarity -----------------------------------------------------------------------


@triton.jit
def _split_tf32(x):
    """``x = hi + lo`` exactly: ``hi`` keeps the sign, the exponent and the top
    10 stored mantissa bits (a tf32 value), ``lo = x - hi`` the rest."""
    hi = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def _dot_into(bt, a, acc, DOT: tl.constexpr):
    """``acc += bt @ a`` in fp32: on CUDA cores (``ieee``), or on the tensor
    cores as ``hi·hi + hi·lo + lo·hi`` of the operands' tf32 splits
    (``tf32x3``; the dropped ``lo·lo`` and the tensor cores reading ``lo`` as
    tf32 leave an error of about ``2^-21 |bt| |a|`` a product, docs/algorithm.md)."""
    if DOT == "tf32x3":
        bh, bl = _split_tf32(bt)
        ah, al = _split_tf32(a)
        acc = tl.dot(bl, ah, acc, input_precision="tf32")
        acc = tl.dot(bh, al, acc, input_precision="tf32")
        acc = tl.dot(bh, ah, acc, input_precision="tf32")
    else:
        acc = tl.dot(bt, a, acc, input_precision="ieee")
    return acc


@triton.jit
def _pixel_dot(img_b, s_c, s_h, s_w, ci, cen_i, j, cen_j,
               C: tl.constexpr, P: tl.constexpr, GW: tl.constexpr, E: tl.constexpr,
               BK: tl.constexpr, BJ: tl.constexpr, DOT: tl.constexpr):
    """``acc_ij = Σ_e (x_ie - c_i)(x_je - c_j)``. ``ci``, ``j``: valid patch
    indices (padding rows and columns repeat a real patch; the caller discards
    them). A power-of-two ``P`` is walked in flat chunks of ``E`` elements; any
    other ``P`` row by row, each row in chunks of ``E`` columns (no integer
    division per element). The product runs patches-major (``BJ x BK``, the
    patches as the MMA's M side, which on sm_90 is a warpgroup MMA reading
    its operands from shared memory) and is transposed once at the end."""
    c_off = ((ci // GW) * P) * s_h + ((ci % GW) * P) * s_w
    p_off = ((j // GW) * P) * s_h + ((j % GW) * P) * s_w
    acc = tl.zeros((BJ, BK), tl.float32)
    el = tl.arange(0, E)
    FLAT: tl.constexpr = (P & (P - 1)) == 0 and (P * P) % E == 0
    ROW: tl.constexpr = (P + E - 1) // E * E  # a row padded to whole chunks
    # One stage: the tiles pass through registers (centring) anyway, and
    # prefetching them would cost the registers two CTAs an SM need.
    if FLAT:
        for c in range(C):
            for e0 in tl.range(0, P * P, E, num_stages=1):
                e = e0 + el
                e_off = c * s_c + (e // P) * s_h + (e % P) * s_w
                a = tl.load(img_b + c_off[None, :] + e_off[:, None]) - cen_i[None, :]
                bt = tl.load(img_b + p_off[:, None] + e_off[None, :]) - cen_j[:, None]
                acc = _dot_into(bt, a, acc, DOT)
    else:
        # One loop over (channel, row chunk): ptxas would unroll a loop over the
        # few rows of one channel (14 for P = 14) into a register hog.
        STEPS: tl.constexpr = P * ROW // E
        for step in tl.range(0, C * STEPS, num_stages=1):
            c = step // STEPS
            e0 = (step % STEPS) * E
            ex = e0 % ROW + el
            e_off = c * s_c + (e0 // ROW) * s_h + ex * s_w
            eok = ex < P
            # Columns past P: 0 on the candidates' side, so whatever the
            # patches' side holds there adds exactly 0.
            a = tl.where(eok[:, None], tl.load(img_b + c_off[None, :] + e_off[:, None], mask=eok[:, None],
                                               other=0.0) - cen_i[None, :], 0.0)
            bt = tl.load(img_b + p_off[:, None] + e_off[None, :], mask=eok[None, :], other=0.0) - cen_j[:, None]
            acc = _dot_into(bt, a, acc, DOT)
    return tl.trans(acc)


@triton.jit
def _token_norms(tok_b, s_tl, s_td, ws_tinv, L: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr,
                 DB: tl.constexpr):
    """Step 4a: ``ι^t_j = 1 / (‖t_j‖ + 1e-6)`` of every token (to scratch). Each
    term is ``t² + t·0``: a token holding Inf gets a NaN norm (as ``t / inf``
    gives NaN in ``t̂``), finite tokens whose norm overflows get Inf (``ι = 0``)."""
    NB: tl.constexpr = BLOCK_L if BLOCK_L < 256 else 256
    # Patches along the first axis here (the dot has them along the second):
    # no address is shared with the dot, so none stays live until it.
    for jb in range(0, L, NB):
        j = jb + tl.arange(0, NB)
        jc = tl.where(j < L, j, 0)
        sq = tl.zeros((NB, DB), tl.float32)
        for d0 in range(0, D, DB):
            d = d0 + tl.arange(0, DB)
            if D % DB == 0:
                t = tl.load(tok_b + jc[:, None] * s_tl + d[None, :] * s_td).to(tl.float32)
            else:
                t = tl.load(tok_b + jc[:, None] * s_tl + d[None, :] * s_td, mask=(d < D)[None, :], other=0.0)
                t = t.to(tl.float32)
            sq = (sq + t * t) + t * 0.0
        tl.store(ws_tinv + j, _inv_norm(tl.sum(sq, axis=1)), mask=j < L)


@triton.jit
def _token_dot(tok_b, s_tl, s_td, ci, j,
               D: tl.constexpr, DB: tl.constexpr, BK: tl.constexpr, BJ: tl.constexpr, TOK_LOWP: tl.constexpr):
    """``acc_ij = <t_i, t_j>``; ``ci``, ``j``: valid patch indices, as in ``_pixel_dot``."""
    acc = tl.zeros((BK, BJ), tl.float32)
    for d0 in range(0, D, DB):
        d = d0 + tl.arange(0, DB)
        if D % DB == 0:
            ta = tl.load(tok_b + ci[:, None] * s_tl + d[None, :] * s_td)
            tb = tl.load(tok_b + j[None, :] * s_tl + d[:, None] * s_td)
        else:
            dok = d < D
            ta = tl.load(tok_b + ci[:, None] * s_tl + d[None, :] * s_td, mask=dok[None, :], other=0.0)
            tb = tl.load(tok_b + j[None, :] * s_tl + d[:, None] * s_td, mask=dok[:, None], other=0.0)
        if TOK_LOWP:
            acc = tl.dot(ta, tb, acc)
        else:
            acc = tl.dot(ta.to(tl.float32), tb.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _inv_norm(sq):
    """``1 / (‖v‖ + 1e-6)``: 0 when ``‖v‖²`` overflowed, NaN when it is NaN."""
    return 1.0 / (tl.sqrt_rn(sq) + 1e-6)


@triton.jit
def _cosine(acc, inv_i, inv_j):
    """``acc_ij ι_i ι_j``, exactly 0 when either vector counts as zero (ι = 0)."""
    s = (acc * inv_i[:, None]) * inv_j[None, :]
    return tl.where((inv_i[:, None] * inv_j[None, :]) == 0.0, 0.0, s)


@triton.jit
def _similarity_block(img_b, s_c, s_h, s_w, tok_b, s_tl, s_td, ws_cen, ws_inv, ws_tinv, pix_tile, ci, vi, j, vj,
                      token_weight, PIXELS: tl.constexpr, TOKENS: tl.constexpr, BOTH: tl.constexpr,
                      C: tl.constexpr, P: tl.constexpr, GW: tl.constexpr, E: tl.constexpr, D: tl.constexpr,
                      DB: tl.constexpr, BK: tl.constexpr, BJ: tl.constexpr, TOK_LOWP: tl.constexpr,
                      DOT: tl.constexpr):
    """Step 4 for one block of patches, a ``BK x BJ`` tile: the pixel term
    ``(1-α) <p̂_i, p̂_j>`` (``PIXELS``) and/or the token term ``α <t̂_i, t̂_j>``
    (``TOKENS``), the weights applied when ``BOTH`` terms are on. With both,
    the pixel term waits in ``pix_tile`` while the token tiles hold the
    registers (or, with ``TOKENS`` alone, it is the pixel launch's tile there).
    Padding rows and columns hold 0, so no later step can pick up a NaN."""
    s = tl.zeros((BK, BJ), tl.float32)
    jc = tl.where(vj, j, 0)
    if PIXELS:
        acc = _pixel_dot(img_b, s_c, s_h, s_w, ci, tl.load(ws_cen + ci), jc, tl.load(ws_cen + jc),
                         C, P, GW, E, BK, BJ, DOT)
        s = _cosine(acc, tl.load(ws_inv + ci), tl.load(ws_inv + jc))
        if BOTH:
            s = (1.0 - token_weight) * s
        if TOKENS:
            tl.store(pix_tile, s)
    if TOKENS:
        acc = _token_dot(tok_b, s_tl, s_td, ci, jc, D, DB, BK, BJ, TOK_LOWP)
        s = _cosine(acc, tl.load(ws_tinv + ci), tl.load(ws_tinv + jc))
        if BOTH:
            if PIXELS:
                tl.debug_barrier()
            s = token_weight * s + tl.load(pix_tile)
    return tl.where(vi[:, None] & vj[None, :], s, 0.0)


# ---- 5. redundancy -----------------------------------------------------------------------


@triton.jit
def _lse2(x, axis: tl.constexpr):
    """Base-2 log-sum-exp; a slice with no finite entry gives -inf, not NaN."""
    m = tl.max(x, axis=axis)
    m = tl.where(m == -float("inf"), 0.0, m)
    if axis == 0:
        s = tl.sum(tl.exp2(x - m[None, :]), axis=0)
    else:
        s = tl.sum(tl.exp2(x - m[:, None]), axis=1)
    return m + tl.log2(s)


@triton.jit
def _kernel_tile(S, valid, z_scale, c):
    """``z = S log2(e)/ε`` and ``K = 2^(z - c_i)`` on a tile (0 outside ``valid``),
    with the count of entries fp32 cannot hold (``S`` not finite or ``K < e^-80``)."""
    z = S * z_scale
    dz = z - c[:, None]
    bad = tl.sum(tl.sum((valid & ~((dz >= _MIN_LOG2_K) & (z - z == 0.0))).to(tl.int32), axis=1), axis=0)
    return tl.where(valid, tl.exp2(dz), 0.0), bad


@triton.jit
def _recip(x):
    """``1/x`` as ``rsqrt(x)²``: two instructions (MUFU.RSQ, FMUL), a few ulp,
    where a division expands to a dozen; for the normal numbers it gets."""
    r = tl.math.rsqrt(x)
    return r * r


@triton.jit
def _scale(num, den):
    """``num / den`` when ``den`` lies in ``[1e-30, 1e30]``, else NaN: a number
    fp32 would not hold poisons everything after it, and the caller sees NaN."""
    return tl.where((den >= 1e-30) & (den <= 1e30), num * _recip(den), float("nan"))


@triton.jit
def _sinkhorn_scaling(S, vi, vj, inv_k, inv_l, z_scale, ws_s, ws_kt,
                      L: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, LP: tl.constexpr):
    """Step 5, scaling form on a register tile of ``S``: ``r`` and the count
    of numbers fp32 did not hold (nonzero: the caller takes the log domain).
    ``S`` waits in ``ws_s`` (``BK x LP``) meanwhile, and stays there.

    ``K`` is held twice, as ``BK x LP`` and, read back from ``ws_kt`` with the
    candidates contiguous, as ``LP x BK``: each mat-vec then reduces along the
    axis its copy holds within a thread (or a few lanes), never across
    warps, so a step costs two short reductions and two vector exchanges."""
    rows = tl.arange(0, BK)
    cols = tl.arange(0, LP)
    valid = vi[:, None] & vj[None, :]
    c = tl.max(tl.where(valid, S * z_scale, -float("inf")), axis=1)
    c = tl.where(vi, c, 0.0)
    Kt, bad = _kernel_tile(S, valid, z_scale, c)
    park = ws_s + rows[:, None] * LP + cols[None, :]
    tl.store(park, S)
    tl.store(ws_kt + cols[None, :] * BK + rows[:, None], Kt)
    tl.debug_barrier()
    KT = tl.load(ws_kt + cols[:, None] * BK + rows[None, :])
    vjt = cols < L
    B = tl.where(vj, 1.0, 0.0)
    A = c
    # The sums' range, checked once after the steps rather than at each: a sum
    # outside [1e-30, 1e30] sends the caller to the log domain all the same
    # (a NaN sum, which min/max would skip, reaches r and is counted there).
    lo_a = tl.full((BK,), 1.0, tl.float32)
    hi_a = tl.full((BK,), 1.0, tl.float32)
    lo_b = tl.full((LP,), 1.0, tl.float32)
    hi_b = tl.full((LP,), 1.0, tl.float32)
    for _t in range(T):
        ra = tl.sum(Kt * B[None, :], axis=1)
        ra = tl.where(vi, ra, 1.0)
        lo_a = tl.minimum(lo_a, ra)
        hi_a = tl.maximum(hi_a, ra)
        A = tl.where(vi, _recip(ra) * inv_k, 0.0)
        rb = tl.sum(KT * A[None, :], axis=1)
        rb = tl.where(vjt, rb, 1.0)
        lo_b = tl.minimum(lo_b, rb)
        hi_b = tl.maximum(hi_b, rb)
        B = tl.where(vjt, _recip(rb) * inv_l, 0.0)
    red = (L * B) * tl.sum((Kt * A[:, None]) * tl.load(park), axis=0)
    out_a = tl.sum(((lo_a < 1e-30) | (hi_a > 1e30)).to(tl.int32), axis=0)
    out_b = tl.sum(((lo_b < 1e-30) | (hi_b > 1e30)).to(tl.int32), axis=0)
    return red, bad + out_a + out_b + tl.sum((vj & (red - red != 0.0)).to(tl.int32), axis=0)


@triton.jit
def _sinkhorn_log(S, vi, vj, z_scale, log2_a, log2_b, L: tl.constexpr, T: tl.constexpr):
    """Step 5, log domain on a register tile of ``S`` (the fallback)."""
    INF: tl.constexpr = float("inf")
    z = S * z_scale
    g = tl.where(vj, 0.0, -INF)
    f = tl.where(vi, 0.0, -INF)
    for _t in range(T):
        f = tl.where(vi, log2_a - _lse2(z + g[None, :], 1), -INF)
        g = tl.where(vj, log2_b - _lse2(z + f[:, None], 0), -INF)
    plan = tl.exp2(z + f[:, None] + g[None, :])
    return L * tl.sum(plan * S, axis=0)


@triton.jit
def _s_tile(ws_s, nj, k, L: tl.constexpr, BK: tl.constexpr, BJ: tl.constexpr, LP: tl.constexpr):
    rows = tl.arange(0, BK)
    j = nj * BJ + tl.arange(0, BJ)
    vi = rows < k
    vj = j < L
    S = tl.load(ws_s + rows[:, None] * LP + j[None, :])
    return S, vi, vj, j


@triton.jit
def _kt_tile(ws_kt, nj, BK: tl.constexpr, BJ: tl.constexpr):
    """A ``BJ x BK`` tile of ``K`` transposed (candidates contiguous) and its patches."""
    j = nj * BJ + tl.arange(0, BJ)
    return tl.load(ws_kt + j[:, None] * BK + tl.arange(0, BK)[None, :]), j


@triton.jit
def _sinkhorn_stream(ws_s, ws_kt, ws_b, red_b, k, inv_k, inv_l, z_scale,
                     L: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BJ: tl.constexpr, NJ: tl.constexpr):
    """Step 5, scaling form with ``S`` in scratch (``BK x NJ·BJ``). ``K`` is
    made once and kept transposed in ``ws_kt`` (``LP x BK``), streamed in
    ``BJ x BK`` tiles: the row sums ``Σ_j K_ij B_j`` accumulate tile on tile in
    registers and reduce across the block once a step, the column sums reduce
    over the few lanes that hold a patch's candidates. ``B`` lives in scratch.
    Writes ``r``; returns the count of numbers fp32 did not hold."""
    LP: tl.constexpr = NJ * BJ
    rows = tl.arange(0, BK)
    vi = rows < k
    c = tl.full((BK,), -float("inf"), tl.float32)
    for nj in range(NJ):
        S, vi, vj, j = _s_tile(ws_s, nj, k, L, BK, BJ, LP)
        c = tl.maximum(c, tl.max(tl.where(vi[:, None] & vj[None, :], S * z_scale, -float("inf")), axis=1))
    c = tl.where(vi, c, 0.0)
    bad = tl.zeros((), tl.int32)
    for nj in range(NJ):
        S, vi, vj, j = _s_tile(ws_s, nj, k, L, BK, BJ, LP)
        Kt, bad_t = _kernel_tile(S, vi[:, None] & vj[None, :], z_scale, c)
        bad += bad_t
        tl.store(ws_kt + j[None, :] * BK + rows[:, None], Kt)
        tl.store(ws_b + j, tl.where(vj, 1.0, 0.0))
    A = c
    for _t in range(T):
        tl.debug_barrier()
        acc = tl.zeros((BJ, BK), tl.float32)
        for nj in range(NJ):
            KT, j = _kt_tile(ws_kt, nj, BK, BJ)
            acc += KT * tl.load(ws_b + j)[:, None]
        A = tl.where(vi, _scale(inv_k, tl.sum(acc, axis=0)), 0.0)
        tl.debug_barrier()
        for nj in range(NJ):
            KT, j = _kt_tile(ws_kt, nj, BK, BJ)
            tl.store(ws_b + j, tl.where(j < L, _scale(inv_l, tl.sum(KT * A[None, :], axis=1)), 0.0))
    tl.debug_barrier()
    for nj in range(NJ):
        KT, j = _kt_tile(ws_kt, nj, BK, BJ)
        St = tl.load(ws_s + rows[None, :] * LP + j[:, None])
        red = (L * tl.load(ws_b + j)) * tl.sum((KT * A[None, :]) * St, axis=1)
        tl.store(red_b + j, red, mask=j < L)
        bad += tl.sum(((j < L) & (red - red != 0.0)).to(tl.int32), axis=0)
    return bad


@triton.jit
def _sinkhorn_stream_log(ws_s, ws_g, red_b, k, z_scale, log2_a, log2_b,
                         L: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BJ: tl.constexpr, NJ: tl.constexpr):
    """Step 5, log domain with ``S`` in scratch (the fallback of the above):
    ``f`` by an online log-sum-exp over the patch blocks, ``g`` in scratch."""
    INF: tl.constexpr = float("inf")
    LP: tl.constexpr = NJ * BJ
    rows = tl.arange(0, BK)
    vi = rows < k
    tl.debug_barrier()
    for nj in range(NJ):
        j = nj * BJ + tl.arange(0, BJ)
        tl.store(ws_g + j, tl.where(j < L, 0.0, -INF))
    f = tl.where(vi, 0.0, -INF)
    for _t in range(T):
        tl.debug_barrier()
        m = tl.full((BK,), -INF, tl.float32)
        s = tl.zeros((BK,), tl.float32)
        for nj in range(NJ):
            S, vi, vj, j = _s_tile(ws_s, nj, k, L, BK, BJ, LP)
            x = S * z_scale + tl.load(ws_g + j)[None, :]
            m_new = tl.maximum(m, tl.max(x, axis=1))
            sh = tl.where(m_new == -INF, 0.0, m_new)
            s = s * tl.exp2(m - sh) + tl.sum(tl.exp2(x - sh[:, None]), axis=1)
            m = m_new
        f = tl.where(vi, log2_a - (tl.where(m == -INF, 0.0, m) + tl.log2(s)), -INF)
        tl.debug_barrier()
        for nj in range(NJ):
            S, vi, vj, j = _s_tile(ws_s, nj, k, L, BK, BJ, LP)
            g = tl.where(vj, log2_b - _lse2(S * z_scale + f[:, None], 0), -INF)
            tl.store(ws_g + j, g)
    tl.debug_barrier()
    for nj in range(NJ):
        S, vi, vj, j = _s_tile(ws_s, nj, k, L, BK, BJ, LP)
        plan = tl.exp2(S * z_scale + f[:, None] + tl.load(ws_g + j)[None, :])
        tl.store(red_b + j, L * tl.sum(plan * S, axis=0), mask=vj)


@triton.jit
def _max_redundancy(S, vi, vj):
    """``r_j = max_i S_ij``, NaN propagating as ``amax`` does."""
    sm = vi[:, None] & vj[None, :]
    red = tl.max(tl.where(sm, S, -float("inf")), axis=0)
    nan_s = tl.sum(((S != S) & sm).to(tl.int32), axis=0)
    return tl.where(nan_s > 0, float("nan"), red)


# ---- 6. selection ------------------------------------------------------------------------


@triton.jit
def _select(ws_order, red_b, mask_b, keep_b, k, M, sim_threshold, L: tl.constexpr, BLOCK_L: tl.constexpr):
    """Step 6: drop the first ``M`` in (tier, key, j) order; ``keep_idx`` ascending."""
    r = tl.arange(0, BLOCK_L)  # position in key order
    ok = r < L
    jr = tl.load(ws_order + r, mask=ok, other=0)
    hot = tl.load(red_b + jr, mask=ok, other=0.0) > sim_threshold
    tier1 = (ok & (r >= k) & hot).to(tl.int32)
    tier2 = (ok & (r >= k) & ~hot).to(tl.int32)
    n1 = tl.cumsum(tier1, axis=0) - tier1
    n2 = tl.cumsum(tier2, axis=0) - tier2
    pos = tl.where(r < k, r, tl.where(tier1 > 0, k + n1, k + tl.sum(tier1, axis=0) + n2))
    tl.store(mask_b + jr, pos < M, mask=ok)
    tl.debug_barrier()
    dropped = tl.load(mask_b + r, mask=ok, other=1).to(tl.int32)
    kept = tl.where(ok, 1 - dropped, 0)
    slot = tl.cumsum(kept, axis=0) - kept
    tl.store(keep_b + slot, r.to(tl.int64), mask=kept > 0)


# ---- the kernel --------------------------------------------------------------------------


@triton.jit
def _pgs_kernel(
    img_ptr, s_ib, s_ic: tl.constexpr, s_ih: tl.constexpr, s_iw: tl.constexpr,
    tok_ptr, s_tb, s_tl: tl.constexpr, s_td: tl.constexpr,
    noise_ptr, s_nb, s_nl,
    keep_ptr, mask_ptr, edge_ptr, cand_ptr, red_ptr,
    fws_ptr, iws_ptr,
    B, M, K, k,
    sim_threshold, token_weight, edge_weight, z_scale, log2_a, log2_b, inv_k, inv_l,
    ITERS: tl.constexpr, C: tl.constexpr, P: tl.constexpr, GH: tl.constexpr, GW: tl.constexpr,
    D: tl.constexpr, T: tl.constexpr, NSEG: tl.constexpr, NSTRIP: tl.constexpr, BLOCK_L: tl.constexpr,
    BK: tl.constexpr, BJ: tl.constexpr, NJ: tl.constexpr, S_REG: tl.constexpr, BJS: tl.constexpr,
    E: tl.constexpr, DB: tl.constexpr,
    USE_PIX: tl.constexpr, USE_TOK: tl.constexpr, TOK_LOWP: tl.constexpr,
    USE_EDGE: tl.constexpr, USE_OT: tl.constexpr, HAS_CAND: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr, FWS: tl.constexpr, DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    L: tl.constexpr = GH * GW
    W: tl.constexpr = GW * P
    LP: tl.constexpr = NJ * BJ
    # Per-program scratch, FWS floats (_scratch_floats) and BLOCK_L ints: the layout is there.
    fws = fws_ptr + pid.to(tl.int64) * FWS
    col_g = fws
    col_t = fws + GH * W
    col_q = fws + 2 * GH * W
    col_s = fws + 3 * GH * W
    ws_e = fws + 4 * GH * W
    ws_cen = ws_e + BLOCK_L
    ws_inv = ws_cen + BLOCK_L
    ws_tinv = ws_inv + BLOCK_L
    ws_s = ws_tinv + BLOCK_L
    ws_v = ws_s + BK * LP
    ws_order = iws_ptr + pid.to(tl.int64) * BLOCK_L
    lanes = tl.arange(0, BLOCK_L)
    lane_ok = lanes < L

    # A grid-stride loop with a fixed trip count, the same in every program.
    for it in range(ITERS):
        b = pid + it * nprog
        if b < B:
            b64 = b.to(tl.int64)
            img_b = img_ptr + b64 * s_ib
            tok_b = tok_ptr + b64 * s_tb
            cand_b = cand_ptr + b64 * k

            if FIRST:
                _edge_pass(img_b, s_ic, s_ih, s_iw, col_g, col_t, col_q, col_s, C, P, GH, W, NSEG, NSTRIP)
                tl.debug_barrier()
                _patch_stats(col_g, col_t, col_q, col_s, ws_e, ws_cen, ws_inv, C, P, GW, L, BLOCK_L)
                tl.debug_barrier()
                e = tl.load(ws_e + lanes, mask=lane_ok, other=0.0)
                key = _edge_keys(e, noise_ptr + b64 * s_nb, s_nl, edge_ptr + b64 * L, edge_weight,
                                 L, BLOCK_L, USE_EDGE)
                _order(key, ws_order, cand_b, k, BLOCK_L)
                tl.debug_barrier()

            red_b = red_ptr + b64 * L
            if HAS_CAND:
                rows = tl.arange(0, BK)
                vi = rows < k
                ci = tl.load(cand_b + rows, mask=vi, other=0).to(tl.int32)
                if FIRST and not LAST:
                    # The first of two launches: the pixel term, for the second to add.
                    for nj in range(NJ):
                        j = nj * BJ + tl.arange(0, BJ)
                        S = _similarity_block(img_b, s_ic, s_ih, s_iw, tok_b, s_tl, s_td, ws_cen, ws_inv, ws_tinv,
                                              ws_s, ci, vi, j, j < L, token_weight, True, False, True,
                                              C, P, GW, E, D, DB, BK, BJ, TOK_LOWP, DOT)
                        tl.store(ws_s + rows[:, None] * LP + j[None, :], S)
                if LAST:
                    if USE_TOK:
                        _token_norms(tok_b, s_tl, s_td, ws_tinv, L, D, BLOCK_L, DB)
                        tl.debug_barrier()
                    S = tl.zeros((BK, BJ), tl.float32)
                    for nj in range(NJ):
                        j = nj * BJ + tl.arange(0, BJ)
                        tile = ws_s + rows[:, None] * LP + j[None, :]
                        # Both terms when this launch is the only one; else
                        # the token term plus the first launch's pixel term.
                        S = _similarity_block(img_b, s_ic, s_ih, s_iw, tok_b, s_tl, s_td, ws_cen, ws_inv, ws_tinv,
                                              tile, ci, vi, j, j < L, token_weight,
                                              USE_PIX and FIRST, USE_TOK, USE_PIX and USE_TOK,
                                              C, P, GW, E, D, DB, BK, BJ, TOK_LOWP, DOT)
                        if not USE_OT:
                            tl.store(red_b + j, _max_redundancy(S, vi, j < L), mask=j < L)
                        elif NJ > 1 or not S_REG:
                            tl.store(tile, S)
                    if USE_OT:
                        if S_REG:
                            # All of S in one register tile (read back when it came in blocks).
                            lp = tl.arange(0, LP)
                            vj = lp < L
                            if NJ > 1:
                                tl.debug_barrier()
                                S = tl.load(ws_s + rows[:, None] * LP + lp[None, :])
                            red, bad = _sinkhorn_scaling(S, vi, vj, inv_k, inv_l, z_scale, ws_s, ws_v, L, T, BK, LP)
                            if bad > 0:
                                S = tl.load(ws_s + rows[:, None] * LP + lp[None, :])
                                red = _sinkhorn_log(S, vi, vj, z_scale, log2_a, log2_b, L, T)
                            tl.store(red_b + lp, red, mask=vj)
                        else:
                            tl.debug_barrier()
                            NJS: tl.constexpr = LP // BJS
                            bad = _sinkhorn_stream(ws_s, ws_v, ws_v + BK * LP, red_b, k, inv_k, inv_l, z_scale,
                                                   L, T, BK, BJS, NJS)
                            if bad > 0:
                                _sinkhorn_stream_log(ws_s, ws_v + BK * LP, red_b, k, z_scale, log2_a, log2_b, L, T,
                                                     BK, BJS, NJS)
            elif LAST:
                tl.store(red_b + lanes, tl.full((BLOCK_L,), -float("inf"), tl.float32), mask=lane_ok)
            if LAST:
                tl.debug_barrier()
                _select(ws_order, red_ptr + b64 * L, mask_ptr + b64 * L, keep_ptr + b64 * K, k, M, sim_threshold,
                        L, BLOCK_L)
            # The next image reuses this program's scratch.
            tl.debug_barrier()


def _arch(device) -> str:
    """``sm_XY`` of a CUDA device (torch caches the properties: no sync)."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _scratch_floats(GH: int, W: int, BLOCK_L: int, BK: int, LP: int, s_reg: bool) -> int:
    """fp32 scratch per program, in the order the kernel lays it out: column
    sums col_g, col_t, col_q, col_s (GH x W each); e, c, ι, ι^t (BLOCK_L
    each); S (BK x LP); K transposed (BK x LP); B or g (LP, only when
    Sinkhorn streams S). The int32 scratch is the selection order (BLOCK_L)."""
    return 4 * GH * W + 4 * BLOCK_L + 2 * BK * LP + (0 if s_reg else LP)


def _launch_config(B, C, H, W, P, D, k, alpha, tok_lowp, edge_weight, use_ot, ot_iters, tuning=None):
    """Grid size and the kernel's compile-time arguments for one call (also
    what ``bench.kernel_report`` compiles); ``FWS`` among them is the fp32
    scratch per program. ``tuning``: the launch settings
    (``pgs_kernels.triton_tuning``), laid over ``triton_tuning.DEFAULT``."""
    GH, GW = H // P, W // P
    L = GH * GW
    BLOCK_L = max(16, _pow2(L))
    # Pass 1: one segment of _SEG columns a warp, strips of at most 8 segments.
    nseg = min(8, _pow2(triton.cdiv(W, _SEG.value)))
    has_cand = k > 0
    BK = max(16, _pow2(k))
    # Similarity tiles of BK x BJ: _SIM_TILE elements (16 a thread), twice that
    # from 64 candidates on (fewer passes over the candidates' pixels; Sinkhorn
    # streams its own smaller tiles).
    BJ = max(16, min(BLOCK_L, (2 * _SIM_TILE if BK >= 64 else _SIM_TILE) // BK))
    # Token chunks of DB: wide for bf16/fp16 on the tensor cores while the tiles
    # fit; fp32 tokens (FMA) and the large tiles keep them narrow.
    DB = (64 if BK <= 32 else 32) if tok_lowp else 16
    NJ = triton.cdiv(L, BJ)
    LP = NJ * BJ
    s_reg = BK * LP <= _S_TILE
    # Sinkhorn streams S in tiles of its own, at most _S_TILE elements.
    BJS = BJ if BK * BJ <= _S_TILE else max(16, _S_TILE // BK)
    fws_cols = _scratch_floats(GH, W, BLOCK_L, BK, LP, s_reg)
    per_prog = 4 * fws_cols + 4 * BLOCK_L
    nprog = max(1, min(B, _SCRATCH_BUDGET // per_prog))
    meta = dict(
        ITERS=triton.cdiv(B, nprog), C=C, P=P, GH=GH, GW=GW, D=D, T=int(ot_iters),
        NSEG=nseg, NSTRIP=triton.cdiv(W, nseg * _SEG.value), BLOCK_L=BLOCK_L,
        BK=BK, BJ=BJ, NJ=NJ, S_REG=s_reg, BJS=BJS, E=16, DB=DB,
        USE_PIX=alpha < 1, USE_TOK=alpha > 0, TOK_LOWP=bool(tok_lowp),
        USE_EDGE=float(edge_weight) != 0.0, USE_OT=bool(use_ot), HAS_CAND=has_cand, FWS=fws_cols,
    )
    # Over DEFAULT, so that a partial setting still names every constexpr.
    meta.update(triton_tuning.DEFAULT)
    meta.update(tuning or {})
    return nprog, meta


def _inv_reg(ot_reg) -> float:
    """log2(e) / eps, the Sinkhorn scale the kernel takes; eps = 0 (which only
    a direct call of the raw operator can pass) scales by infinity as the
    device division would, so the kernel still writes a valid selection."""
    ot_reg = float(ot_reg)
    return _LOG2E / ot_reg if ot_reg != 0.0 else math.copysign(math.inf, ot_reg)


def _launch_plan(images, tokens, noise, patch_size, num_keep, num_candidates, sim_threshold,
                 token_weight, edge_weight, use_ot, ot_reg, ot_iters, compiled, tuning=None):
    """The outputs (allocated, not yet written) and the launches that fill
    them, each ``(kernel, grid, args, meta)``, for one call. ``compiled``: the
    kernel is compiled for a GPU (not interpreted), which decides how low
    precision tokens are multiplied. ``tuning``: launch settings
    (``triton_tuning``), by default the table's entry for this device and
    shape. ``bench.kernel_report`` compiles exactly these launches."""
    B, C, H, W = images.shape
    P = int(patch_size)
    L = (H // P) * (W // P)
    if L > MAX_PATCHES:
        raise ValueError(
            f"images: the Triton kernel supports at most {MAX_PATCHES} patches, got "
            f"H={H}, W={W}, patch_size={P} -> L={L}"
        )
    K = int(num_keep)
    k = int(num_candidates)
    M = L - K
    dev = images.device
    keep_idx = torch.empty((B, K), dtype=torch.int64, device=dev)
    mask = torch.empty((B, L), dtype=torch.bool, device=dev)
    edge = torch.empty((B, L), dtype=torch.float32, device=dev)
    cand = torch.empty((B, k), dtype=torch.int64, device=dev)
    red = torch.empty((B, L), dtype=torch.float32, device=dev)
    outputs = (keep_idx, mask, edge, cand, red)
    if B == 0:
        return outputs, []

    alpha = float(token_weight)
    use_tok = alpha > 0
    tok = tokens if use_tok else images  # a placeholder pointer when tokens are off
    if use_tok:
        D = tokens.shape[2]
        st = tokens.stride()
        # Tensor cores take bf16/fp16 as they are. The interpreter keeps bf16 as
        # raw uint16 bits and its dot would multiply those: bf16 gets the fp32
        # path there.
        tok_lowp = tokens.dtype == torch.float16 or (tokens.dtype == torch.bfloat16 and compiled)
    else:
        D, st, tok_lowp = 1, (0, 0, 0), False

    if tuning is None and images.is_cuda:
        tuning = triton_tuning.lookup(_arch(images.device), (H // P, W // P), D if use_tok else 0)
    nprog, meta = _launch_config(B, C, H, W, P, D, k, alpha, tok_lowp, edge_weight, use_ot, ot_iters, tuning)
    BLOCK_L = meta["BLOCK_L"]
    fws = torch.empty((nprog, meta["FWS"]), dtype=torch.float32, device=dev)
    iws = torch.empty((nprog, BLOCK_L), dtype=torch.int32, device=dev)

    si = images.stride()
    sn = noise.stride()
    args = (
        images, si[0], si[1], si[2], si[3],
        tok, st[0], st[1], st[2],
        noise, sn[0], sn[1],
        keep_idx, mask, edge, cand, red,
        fws, iws,
        B, M, K, k,
        float(sim_threshold), alpha, float(edge_weight), _inv_reg(ot_reg),
        -math.log2(k) if k > 0 else 0.0, -math.log2(L), 1.0 / k if k > 0 else 0.0, 1.0 / L,
    )
    if meta["USE_TOK"] and meta["USE_PIX"] and meta["HAS_CAND"] and meta["ITERS"] == 1:
        # Pixel and token tiles in separate launches: each fits two blocks an
        # SM without spilling, which one kernel holding both does not. The
        # second launch finds the first's per-program scratch, so this needs a
        # program per image.
        return outputs, [(_pgs_kernel, (nprog,), args, dict(meta, FIRST=True, LAST=False)),
                         (_pgs_kernel, (nprog,), args, dict(meta, FIRST=False, LAST=True))]
    return outputs, [(_pgs_kernel, (nprog,), args, dict(meta, FIRST=True, LAST=True))]


def pgs_select_triton(images, tokens, noise, patch_size, num_keep, num_candidates, sim_threshold,
                      token_weight, edge_weight, use_ot, ot_reg, ot_iters):
    """The ``pgs_kernels::pgs_select`` kernel for CUDA tensors (and CPU tensors
    under ``TRITON_INTERPRET=1``): same arguments and outputs as
    ``python_ref.pgs.pgs_select_core``. One or two launches (module
    docstring), no host sync."""
    outputs, launches = _launch_plan(images, tokens, noise, patch_size, num_keep, num_candidates,
                                     sim_threshold, token_weight, edge_weight, use_ot, ot_reg, ot_iters,
                                     compiled=images.is_cuda)
    _run(launches)
    return outputs


def _run(launches) -> None:
    """Runs the launches of :func:`_launch_plan`, on the images' CUDA device
    (the first argument) when they are there."""
    for kernel, grid, args, meta in launches:
        if args[0].is_cuda:
            with torch.cuda.device(args[0].device):
                kernel[grid](*args, **meta)
        else:
            kernel[grid](*args, **meta)
