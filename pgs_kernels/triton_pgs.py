r"""Fused Triton kernel of PGS selection (SPEC.md; symbols as there).

For image ``b`` with grid ``gh x gw``, ``L = gh gw`` patches, ``k`` candidates,
``K`` kept and ``M = L - K`` dropped, one program computes

1. ``Y`` = channel mean; Sobel ``G = sqrt(Gx² + Gy²)`` with a replicated
   border; ``e_j`` = mean of ``G`` over patch ``j``;
   ``ê_j = (e_j - min e) / (max e - min e + 1e-6)``;
2. ``key_j = u_j + w_e ê_j`` (NaN -> +inf), ``rank_j = #{l : (key_l, l) <
   (key_j, j)}``; candidate ``i`` is the patch with ``rank = i < k``;
3. ``S_ij = (1-α) <x̃_i, x̃_j> / ((‖x̃_i‖+1e-6)(‖x̃_j‖+1e-6))
   + α <t_i, t_j> / ((‖t_i‖+1e-6)(‖t_j‖+1e-6))``, ``x̃ = x - mean(x)``;
4. with OT, ``T`` log-domain Sinkhorn steps from ``g = 0``
   (``f_i = log(1/k) - LSE_j(S_ij/ε + g_j)``, ``g_j = log(1/L) - LSE_i(S_ij/ε + f_i)``,
   done in base 2) and ``r_j = L Σ_i exp(S_ij/ε + f_i + g_j) S_ij``;
   without, ``r_j = max_i S_ij``; ``k = 0`` gives ``r = -inf``;
5. ``tier_j`` = 0 (candidate), 1 (``r_j > θ``) or 2; the composite integer
   ``c_j = tier_j L + rank_j`` orders patches by ``(tier, key, j)``; patch ``j``
   is dropped when ``#{l : c_l < c_j} < M``; a kept patch goes to slot
   ``#{kept l < j}`` of ``keep_idx`` (an exclusive prefix sum).

Design. One program per image (``grid = (B,)``, or fewer programs striding
over the batch when the scratch for huge ``k·L`` would not fit a budget):
every step needs per-image reductions (min/max of ``e``, ranks over all
patches, Sinkhorn row and column sums), so keeping an image inside one
program makes the whole selection one launch with no host sync and no
cross-program communication. Pixels are read in two passes, which the
candidate dependency forces. Pass 1 streams the image once with a rolling
three-row Sobel window and also takes each patch's mean and centered norm of
``x - x[first pixel]``, Chan-combined per row (a constant patch gets exactly
zero, so zero similarity; near-constant ones lose no precision). Pass 2 (the ``k x L`` similarity) streams it again in ``(elements x patches)``
tiles against the candidates' tiles with ``tl.dot`` (fp32 ``ieee``; bf16/fp16
tokens go to the tensor cores in their own dtype, whose products are exact in
the fp32 accumulator). Per-patch vectors that must be re-read in another
layout (``e``, means, norms, keys, ranks) and ``S`` itself go through a small
per-program scratch in global memory (L1/L2 resident), separated by
``tl.debug_barrier`` (CTA barrier, which also orders global memory within the
CTA). When ``k`` candidates fit one ``BK x BLOCK_L`` tile, ``S`` stays in
registers for all ``T`` Sinkhorn steps; otherwise each step streams the
candidate blocks from scratch with an online column log-sum-exp.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["pgs_select_triton", "MAX_PATCHES"]

MAX_PATCHES = 1024
_EPS = 1e-6
_LOG2E = 1.4426950408889634
# Scratch per call is capped; past it, fewer programs stride over the batch.
_SCRATCH_BUDGET = 128 << 20
# Largest ``BK x BLOCK_L`` tile of S held in registers through Sinkhorn.
_S_TILE = 16384


@triton.jit
def _sobel_row(img_b, s_c, s_h, s_w, C: tl.constexpr, inv_c, yrow, xl, xc, xr, ok, shift, P: tl.constexpr):
    """One pixel row of a block of patches: channel-mean ``Y`` at ``x-1, x, x+1``
    and the mean and sum of squared deviations of the row's ``C·P`` values
    minus ``shift`` (channels merged with Chan's update)."""
    yl = tl.zeros(xc.shape, tl.float32)
    yc = tl.zeros(xc.shape, tl.float32)
    yr = tl.zeros(xc.shape, tl.float32)
    mean = tl.zeros((xc.shape[0],), tl.float32)
    m2 = tl.zeros((xc.shape[0],), tl.float32)
    for c in range(C):
        base = img_b + c * s_c + yrow * s_h
        vl = tl.load(base + xl * s_w, mask=ok, other=0.0).to(tl.float32)
        vc = tl.load(base + xc * s_w, mask=ok, other=0.0).to(tl.float32)
        vr = tl.load(base + xr * s_w, mask=ok, other=0.0).to(tl.float32)
        yl += vl
        yc += vc
        yr += vr
        vs = tl.where(ok, vc - shift[:, None], 0.0)
        cm = tl.sum(vs, axis=1) / P
        dv = tl.where(ok, vs - cm[:, None], 0.0)
        w = 1.0 / (c + 1.0)
        delta = cm - mean
        mean += delta * w
        m2 += tl.sum(dv * dv, axis=1) + delta * delta * (c * P * w)
    return yl * inv_c, yc * inv_c, yr * inv_c, mean, m2


@triton.jit
def _sobel_mag(ul, uc, ur, ml, mr, dl, dc, dr):
    gx = (ur + 2.0 * mr + dr) - (ul + 2.0 * ml + dl)
    gy = (dl + 2.0 * dc + dr) - (ul + 2.0 * uc + ur)
    return tl.sqrt(gx * gx + gy * gy)


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
def _pgs_kernel(
    img_ptr, s_ib, s_ic, s_ih, s_iw,
    tok_ptr, s_tb, s_tl, s_td,
    noise_ptr, s_nb, s_nl,
    keep_ptr, mask_ptr, edge_ptr, cand_ptr, red_ptr,
    fws_ptr, iws_ptr,
    B, H, W, gw, M, K, k,
    sim_threshold, token_weight, edge_weight, z_scale, log2_a, log2_b,
    # Loop bounds are compile-time constants (one compile per shape; training
    # shapes are fixed), which also lets the interpreter run the loops.
    ITERS: tl.constexpr, C: tl.constexpr, L: tl.constexpr, D: tl.constexpr, T: tl.constexpr,
    P: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BJ_A: tl.constexpr,
    RB: tl.constexpr, BK: tl.constexpr, NUM_KB: tl.constexpr, BJ: tl.constexpr,
    E: tl.constexpr, DB: tl.constexpr,
    USE_PIX: tl.constexpr, USE_TOK: tl.constexpr, TOK_LOWP: tl.constexpr,
    USE_EDGE: tl.constexpr, USE_OT: tl.constexpr, HAS_CAND: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    INF: tl.constexpr = float("inf")
    KPAD: tl.constexpr = NUM_KB * BK

    # Per-program scratch: fp32 [e | shifted mean | centered norm | key | f (KPAD) | S (KPAD x BLOCK_L)],
    # int32 [rank | c].
    fws = fws_ptr + pid.to(tl.int64) * (4 * BLOCK_L + KPAD + KPAD * BLOCK_L)
    ws_e = fws
    ws_mu = fws + BLOCK_L
    ws_nrm = fws + 2 * BLOCK_L
    ws_key = fws + 3 * BLOCK_L
    ws_f = fws + 4 * BLOCK_L
    ws_s = fws + 4 * BLOCK_L + KPAD
    iws = iws_ptr + pid.to(tl.int64) * (2 * BLOCK_L)
    ws_rank = iws
    ws_c = iws + BLOCK_L

    lanes = tl.arange(0, BLOCK_L)
    lane_ok = lanes < L
    inv_c = 1.0 / C

    # A grid-stride loop written with a fixed trip count, so that every
    # program runs the same loop (and the interpreter can run it too).
    for it in range(ITERS):
        b = pid + it * nprog
        if b < B:
            b64 = b.to(tl.int64)
            img_b = img_ptr + b64 * s_ib

            # ---- 1. edge energy, patch means and centered norms (pass 1 over pixels)
            lo = tl.full((), INF, tl.float32)
            hi = tl.full((), -INF, tl.float32)
            nan_e = tl.zeros((), tl.int32)
            px = tl.arange(0, BLOCK_P)
            for jb in range(0, L, BJ_A):
                j = jb + tl.arange(0, BJ_A)
                jok = j < L
                ok = jok[:, None] & (px < P)[None, :]
                y0 = (j // gw) * P
                xc = ((j % gw) * P)[:, None] + px[None, :]
                xl = tl.maximum(xc - 1, 0)
                xr = tl.minimum(xc + 1, W - 1)
                # Statistics of x - x[first pixel]: exact zeros for a constant patch
                # (zero similarity, as SPEC says), and no cancellation for flat ones.
                shift = tl.load(img_b + y0 * s_ih + ((j % gw) * P) * s_iw, mask=jok, other=0.0).to(tl.float32)
                ul, uc, ur, _m, _v = _sobel_row(img_b, s_ic, s_ih, s_iw, C, inv_c,
                                                tl.maximum(y0 - 1, 0)[:, None], xl, xc, xr, ok, shift, P)
                ml, mc, mr, mean, m2 = _sobel_row(img_b, s_ic, s_ih, s_iw, C, inv_c,
                                                  y0[:, None], xl, xc, xr, ok, shift, P)
                gsum = tl.zeros((BJ_A,), tl.float32)
                for r in range(P - 1):
                    dl, dc, dr, rm, rv = _sobel_row(img_b, s_ic, s_ih, s_iw, C, inv_c,
                                                    (y0 + r + 1)[:, None], xl, xc, xr, ok, shift, P)
                    g = _sobel_mag(ul, uc, ur, ml, mr, dl, dc, dr)
                    gsum += tl.sum(tl.where(ok, g, 0.0), axis=1)
                    # Chan's update over rows: (r + 1) rows so far, one more of C·P values.
                    w = 1.0 / (r + 2.0)
                    delta = rm - mean
                    mean += delta * w
                    m2 += rv + delta * delta * ((r + 1.0) * C * P * w)
                    ul, uc, ur = ml, mc, mr
                    ml, mc, mr = dl, dc, dr
                dl, dc, dr, _m, _v = _sobel_row(img_b, s_ic, s_ih, s_iw, C, inv_c,
                                                tl.minimum(y0 + P, H - 1)[:, None], xl, xc, xr, ok, shift, P)
                g = _sobel_mag(ul, uc, ur, ml, mr, dl, dc, dr)
                gsum += tl.sum(tl.where(ok, g, 0.0), axis=1)
                e = gsum / (P * P)
                lo = tl.minimum(lo, tl.min(tl.where(jok, e, INF), axis=0))
                hi = tl.maximum(hi, tl.max(tl.where(jok, e, -INF), axis=0))
                nan_e += tl.sum((jok & (e != e)).to(tl.int32), axis=0)
                tl.store(ws_e + j, e, mask=jok)
                tl.store(ws_mu + j, mean, mask=jok)
                tl.store(ws_nrm + j, tl.sqrt(m2), mask=jok)
            tl.debug_barrier()

            e = tl.load(ws_e + lanes, mask=lane_ok, other=0.0)
            edge = (e - lo) / (hi - lo + 1e-6)
            # min/max of a NaN is NaN in the reference: every ê becomes NaN.
            edge = tl.where(nan_e > 0, float("nan"), edge)
            tl.store(edge_ptr + b64 * L + lanes, edge, mask=lane_ok)
            key = tl.load(noise_ptr + b64 * s_nb + lanes * s_nl, mask=lane_ok, other=0.0).to(tl.float32)
            if USE_EDGE:
                key = key + edge_weight * edge
            key = tl.where(key != key, INF, key)
            key = tl.where(key == 0.0, 0.0, key)  # -0 ties with +0, as in a stable sort
            key = tl.where(lane_ok, key, INF)
            tl.store(ws_key + lanes, key, mask=lane_ok)
            tl.debug_barrier()

            # ---- 2. rank in (key, j) order; candidates go to their rank slot
            for jb in range(0, L, RB):
                jr = jb + tl.arange(0, RB)
                jrok = jr < L
                kj = tl.load(ws_key + jr, mask=jrok, other=INF)
                before = (key[None, :] < kj[:, None]) | ((key[None, :] == kj[:, None]) & (lanes[None, :] < jr[:, None]))
                rank = tl.sum((before & lane_ok[None, :]).to(tl.int32), axis=1)
                tl.store(ws_rank + jr, rank, mask=jrok)
                tl.store(cand_ptr + b64 * k + rank, jr.to(tl.int64), mask=jrok & (rank < k))
            tl.debug_barrier()

            # ---- 3./4. similarity to the candidates and redundancy
            if HAS_CAND:
                for kb in range(NUM_KB):
                    ci_lane = kb * BK + tl.arange(0, BK)
                    vi = ci_lane < k
                    ci = tl.load(cand_ptr + b64 * k + ci_lane, mask=vi, other=0).to(tl.int32)
                    cy0 = (ci // gw) * P
                    cx0 = (ci % gw) * P
                    if USE_PIX:
                        mu_i = tl.load(ws_mu + ci, mask=vi, other=0.0)
                        sh_i = tl.load(img_b + cy0 * s_ih + cx0 * s_iw, mask=vi, other=0.0).to(tl.float32)
                        nr_i = tl.load(ws_nrm + ci, mask=vi, other=0.0)
                    for jb in range(0, L, BJ):
                        j = jb + tl.arange(0, BJ)
                        vj = j < L
                        s = tl.zeros((BK, BJ), tl.float32)
                        if USE_PIX:
                            mu_j = tl.load(ws_mu + j, mask=vj, other=0.0)
                            nr_j = tl.load(ws_nrm + j, mask=vj, other=0.0)
                            py0 = (j // gw) * P
                            px0 = (j % gw) * P
                            sh_j = tl.load(img_b + py0 * s_ih + px0 * s_iw, mask=vj, other=0.0).to(tl.float32)
                            acc = tl.zeros((BK, BJ), tl.float32)
                            for c in range(C):
                                for e0 in range(0, P * P, E):
                                    el = e0 + tl.arange(0, E)
                                    eok = el < P * P
                                    ey = el // P
                                    ex = el % P
                                    am = vi[:, None] & eok[None, :]
                                    a = tl.load(img_b + c * s_ic + (cy0[:, None] + ey[None, :]) * s_ih
                                                + (cx0[:, None] + ex[None, :]) * s_iw, mask=am, other=0.0)
                                    a = tl.where(am, (a.to(tl.float32) - sh_i[:, None]) - mu_i[:, None], 0.0)
                                    bm = eok[:, None] & vj[None, :]
                                    bt = tl.load(img_b + c * s_ic + (py0[None, :] + ey[:, None]) * s_ih
                                                 + (px0[None, :] + ex[:, None]) * s_iw, mask=bm, other=0.0)
                                    bt = tl.where(bm, (bt.to(tl.float32) - sh_j[None, :]) - mu_j[None, :], 0.0)
                                    acc = tl.dot(a, bt, acc, input_precision="ieee")
                            s = acc / ((nr_i + 1e-6)[:, None] * (nr_j + 1e-6)[None, :])
                            if USE_TOK:
                                s = s * (1.0 - token_weight)
                        if USE_TOK:
                            tok_b = tok_ptr + b64 * s_tb
                            acc_t = tl.zeros((BK, BJ), tl.float32)
                            nt_i = tl.zeros((BK,), tl.float32)
                            nt_j = tl.zeros((BJ,), tl.float32)
                            for d0 in range(0, D, DB):
                                d = d0 + tl.arange(0, DB)
                                dok = d < D
                                ta = tl.load(tok_b + ci[:, None] * s_tl + d[None, :] * s_td,
                                             mask=vi[:, None] & dok[None, :], other=0.0)
                                tb = tl.load(tok_b + j[None, :] * s_tl + d[:, None] * s_td,
                                             mask=dok[:, None] & vj[None, :], other=0.0)
                                if TOK_LOWP:
                                    acc_t = tl.dot(ta, tb, acc_t)
                                    ta = ta.to(tl.float32)
                                    tb = tb.to(tl.float32)
                                else:
                                    ta = ta.to(tl.float32)
                                    tb = tb.to(tl.float32)
                                    acc_t = tl.dot(ta, tb, acc_t, input_precision="ieee")
                                nt_i += tl.sum(ta * ta, axis=1)
                                nt_j += tl.sum(tb * tb, axis=0)
                            st = acc_t / ((tl.sqrt(nt_i) + 1e-6)[:, None] * (tl.sqrt(nt_j) + 1e-6)[None, :])
                            if USE_PIX:
                                s = s + token_weight * st
                            else:
                                s = st
                        tl.store(ws_s + ci_lane[:, None] * BLOCK_L + j[None, :], s,
                                 mask=vi[:, None] & vj[None, :])
                tl.debug_barrier()

                rows = tl.arange(0, BK)
                if NUM_KB == 1:
                    # S fits one register tile: it stays there for all T steps.
                    vi = rows < k
                    sm = vi[:, None] & lane_ok[None, :]
                    S = tl.load(ws_s + rows[:, None] * BLOCK_L + lanes[None, :], mask=sm, other=0.0)
                    if USE_OT:
                        z = S * z_scale
                        g = tl.where(lane_ok, 0.0, -INF)
                        f = tl.zeros((BK,), tl.float32)
                        for _t in range(T):
                            f = tl.where(vi, log2_a - _lse2(z + g[None, :], 1), -INF)
                            g = tl.where(lane_ok, log2_b - _lse2(z + f[:, None], 0), -INF)
                        plan = tl.exp2(z + f[:, None] + g[None, :])
                        red = L * tl.sum(plan * S, axis=0)
                    else:
                        red = tl.max(tl.where(sm, S, -INF), axis=0)
                        nan_s = tl.sum(((S != S) & sm).to(tl.int32), axis=0)
                        red = tl.where(nan_s > 0, float("nan"), red)
                else:
                    if USE_OT:
                        g = tl.where(lane_ok, 0.0, -INF)
                        for _t in range(T):
                            cm = tl.full((BLOCK_L,), -INF, tl.float32)
                            cs = tl.zeros((BLOCK_L,), tl.float32)
                            for kb in range(NUM_KB):
                                ri = kb * BK + rows
                                vi = ri < k
                                S = tl.load(ws_s + ri[:, None] * BLOCK_L + lanes[None, :],
                                            mask=vi[:, None] & lane_ok[None, :], other=0.0)
                                z = S * z_scale
                                f = tl.where(vi, log2_a - _lse2(z + g[None, :], 1), -INF)
                                tl.store(ws_f + ri, f)
                                # Online log-sum-exp over candidate blocks for g.
                                x = z + f[:, None]
                                nm = tl.maximum(cm, tl.max(x, axis=0))
                                nm = tl.where(nm == -INF, 0.0, nm)
                                cs = cs * tl.exp2(cm - nm) + tl.sum(tl.exp2(x - nm[None, :]), axis=0)
                                cm = nm
                            g = tl.where(lane_ok, log2_b - (cm + tl.log2(cs)), -INF)
                        tl.debug_barrier()
                        red = tl.zeros((BLOCK_L,), tl.float32)
                        for kb in range(NUM_KB):
                            ri = kb * BK + rows
                            vi = ri < k
                            S = tl.load(ws_s + ri[:, None] * BLOCK_L + lanes[None, :],
                                        mask=vi[:, None] & lane_ok[None, :], other=0.0)
                            f = tl.load(ws_f + ri)
                            plan = tl.exp2(S * z_scale + f[:, None] + g[None, :])
                            red += tl.sum(plan * S, axis=0)
                        red = red * L
                    else:
                        red = tl.full((BLOCK_L,), -INF, tl.float32)
                        nan_s = tl.zeros((BLOCK_L,), tl.int32)
                        for kb in range(NUM_KB):
                            ri = kb * BK + rows
                            sm = (ri < k)[:, None] & lane_ok[None, :]
                            S = tl.load(ws_s + ri[:, None] * BLOCK_L + lanes[None, :], mask=sm, other=0.0)
                            red = tl.maximum(red, tl.max(tl.where(sm, S, -INF), axis=0))
                            nan_s += tl.sum(((S != S) & sm).to(tl.int32), axis=0)
                        red = tl.where(nan_s > 0, float("nan"), red)
            else:
                red = tl.full((BLOCK_L,), -INF, tl.float32)
            tl.store(red_ptr + b64 * L + lanes, red, mask=lane_ok)

            # ---- 5. drop the first M in (tier, key, j) order; keep_idx ascending
            rank = tl.load(ws_rank + lanes, mask=lane_ok, other=0)
            tier = tl.where(rank < k, 0, tl.where(red > sim_threshold, 1, 2))
            cval = tier * L + rank  # distinct over the patches: a strict total order
            tl.store(ws_c + lanes, cval, mask=lane_ok)
            tl.debug_barrier()
            for jb in range(0, L, RB):
                jr = jb + tl.arange(0, RB)
                jrok = jr < L
                cj = tl.load(ws_c + jr, mask=jrok, other=0)
                pos = tl.sum(((cval[None, :] < cj[:, None]) & lane_ok[None, :]).to(tl.int32), axis=1)
                tl.store(mask_ptr + b64 * L + jr, pos < M, mask=jrok)
            tl.debug_barrier()
            dropped = tl.load(mask_ptr + b64 * L + lanes, mask=lane_ok, other=1).to(tl.int32)
            kept = tl.where(lane_ok, 1 - dropped, 0)
            slot = tl.cumsum(kept, axis=0) - kept
            tl.store(keep_ptr + b64 * K + slot, lanes.to(tl.int64), mask=kept > 0)
            # The next image reuses this program's scratch.
            tl.debug_barrier()


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _launch_config(B, C, L, P, D, k, alpha, tok_lowp, edge_weight, use_ot, ot_iters):
    """Grid size, fp32 scratch columns per program and the kernel's
    compile-time arguments for one call (also used by the compile test)."""
    BLOCK_L = max(16, _pow2(L))
    BLOCK_P = _pow2(P)
    BJ_A = min(BLOCK_L, max(1, 1024 // BLOCK_P))
    RB = max(1, min(BLOCK_L, 4096 // BLOCK_L))
    has_cand = k > 0
    kp = max(16, _pow2(k))
    BK = min(kp, max(16, _S_TILE // BLOCK_L))  # one register tile of S when k is small
    NUM_KB = triton.cdiv(k, BK) if has_cand else 0
    kpad = NUM_KB * BK
    # Similarity tiles: (BK x E) @ (E x BJ) and (BK x DB) @ (DB x BJ). Small
    # K-chunks keep the fp32 FMA dot and the pipelined loads near 128
    # registers a thread (ptxas for sm_90, no spills at L = 196 with 8 warps
    # and L = 1024 with 16), i.e. 16 resident warps an SM.
    BJ = min(BLOCK_L, 32)
    E = 16
    DB = min(32, max(16, _pow2(D)))
    fws_cols = 4 * BLOCK_L + kpad + kpad * BLOCK_L
    per_prog = 4 * fws_cols + 4 * 2 * BLOCK_L
    nprog = max(1, min(B, _SCRATCH_BUDGET // per_prog))
    meta = dict(
        ITERS=triton.cdiv(B, nprog), C=C, L=L, D=D, T=int(ot_iters),
        P=P, BLOCK_P=BLOCK_P, BLOCK_L=BLOCK_L, BJ_A=BJ_A, RB=RB, BK=BK, NUM_KB=NUM_KB, BJ=BJ,
        E=E, DB=DB, USE_PIX=alpha < 1, USE_TOK=alpha > 0, TOK_LOWP=bool(tok_lowp),
        USE_EDGE=float(edge_weight) != 0.0, USE_OT=bool(use_ot), HAS_CAND=has_cand,
        num_warps=8 if BLOCK_L <= 256 else 16,
    )
    return nprog, fws_cols, meta


def _launch_plan(images, tokens, noise, patch_size, num_keep, num_candidates, sim_threshold,
                 token_weight, edge_weight, use_ot, ot_reg, ot_iters, compiled):
    """The outputs (allocated, not yet written) and the launches that fill
    them, each ``(kernel, grid, args, meta)``, for one call. ``compiled``: the
    kernel is compiled for a GPU (not interpreted), which decides how low
    precision tokens are multiplied. ``bench.kernel_report`` compiles exactly
    these launches."""
    B, C, H, W = images.shape
    P = int(patch_size)
    gw = W // P
    L = (H // P) * gw
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
    if use_tok and tokens is None:
        raise ValueError(f"token_weight={token_weight} > 0 needs tokens, got tokens=None")
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

    nprog, fws_cols, meta = _launch_config(B, C, L, P, D, k, alpha, tok_lowp, edge_weight, use_ot, ot_iters)
    BLOCK_L = meta["BLOCK_L"]
    fws = torch.empty((nprog, fws_cols), dtype=torch.float32, device=dev)
    iws = torch.empty((nprog, 2 * BLOCK_L), dtype=torch.int32, device=dev)

    si = images.stride()
    sn = noise.stride()
    log2_a = -math.log2(k) if k > 0 else 0.0
    args = (
        images, si[0], si[1], si[2], si[3],
        tok, st[0], st[1], st[2],
        noise, sn[0], sn[1],
        keep_idx, mask, edge, cand, red,
        fws, iws,
        B, H, W, gw, M, K, k,
        float(sim_threshold), alpha, float(edge_weight), _LOG2E / float(ot_reg), log2_a, -math.log2(L),
    )
    return outputs, [(_pgs_kernel, (nprog,), args, meta)]


def pgs_select_triton(images, tokens, noise, patch_size, num_keep, num_candidates, sim_threshold,
                      token_weight, edge_weight, use_ot, ot_reg, ot_iters):
    """The ``pgs_kernels::pgs_select`` kernel for CUDA tensors (and CPU tensors
    under ``TRITON_INTERPRET=1``): same arguments and outputs as
    ``python_ref.pgs.pgs_select_core``. One launch, no host sync."""
    outputs, launches = _launch_plan(images, tokens, noise, patch_size, num_keep, num_candidates,
                                     sim_threshold, token_weight, edge_weight, use_ot, ot_reg, ot_iters,
                                     compiled=images.is_cuda)
    for kernel, grid, args, meta in launches:
        if images.is_cuda:
            with torch.cuda.device(images.device):
                kernel[grid](*args, **meta)
        else:
            kernel[grid](*args, **meta)
    return outputs
