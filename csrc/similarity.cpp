// Step 3, the similarity of each candidate to every patch:
//
//   x~_j = x_j - mean(x_j)  (x_j: patch j's C P^2 pixels),  p̂_j = x~_j / (|x~_j| + 1e-6)
//   t̂_j  = t_j / (|t_j| + 1e-6)
//   S_ij = (1 - alpha) <p̂_i, p̂_j> + alpha <t̂_i, t̂_j>       (i in Cand)
//
// A term whose weight is 0 is skipped, so its input cannot bring NaN in. The
// raw dot products <x~_i, x~_j> and <t_i, t_j> come from one sweep over the
// patches against the candidates packed in a panel, which yields each patch's
// squared norm on the way; they are scaled once all norms are known, so a
// candidate's norm is the one its own row got in the sweep.

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "pgs.h"
#include "simd.h"

namespace pgs {
namespace {

// Patch j's C P^2 pixels ((channel, row, column) order) into out, centered:
// x~ = x - mean(x) with the mean taken as x_0 + mean(x - x_0): a constant patch
// centers to exactly zero (zero similarity, as in the fp64 reference), and the
// shift keeps fp32 cancellation small for patches with a large offset. out has
// dpad (a multiple of VW) floats; the lanes past C P^2 are zero. Returns |x~|^2.
template <int VW>
PGS_INL float center_patch(const ImageIn& in, const Geometry& g, int64_t j, int64_t dim, int64_t dpad,
                           float* __restrict out) {
  using F = typename VT<VW>::F;
  const int64_t P = g.P;
  const float* base = in.pixels + (j / g.gw) * P * in.row_stride + (j % g.gw) * P;
  float* o = out;
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t r = 0; r < P; ++r, o += P) {
      const float* src = base + c * in.channel_stride + r * in.row_stride;
      if (P % VW == 0) {
        for (int64_t t = 0; t < P; t += VW) vstore(o + t, vload<F>(src + t));
      } else {
        for (int64_t t = 0; t < P; ++t) o[t] = src[t];
      }
    }
  }
  const float v0 = out[0];
  const int64_t nfull = dim / VW * VW, n4 = dim / (4 * VW) * (4 * VW);
  const auto tail = lanes_below<VW>(dim - nfull);
  // Four named accumulators (an indexed array would live in memory), so the
  // adds are four chains, not one.
  F s0{}, s1{}, s2{}, s3{};
  int64_t t = 0;
  for (; t < n4; t += 4 * VW) {
    s0 += vload<F>(out + t) - v0;
    s1 += vload<F>(out + t + VW) - v0;
    s2 += vload<F>(out + t + 2 * VW) - v0;
    s3 += vload<F>(out + t + 3 * VW) - v0;
  }
  for (; t < nfull; t += VW) s0 += vload<F>(out + t) - v0;
  if (nfull < dpad) {
    const F d = vload<F>(out + nfull) - v0;
    s1 += tail ? d : F{};
  }
  const float mean = hsum<VW>((s0 + s1) + (s2 + s3)) / static_cast<float>(dim);
  F q0{}, q1{}, q2{}, q3{};
  t = 0;
  for (; t < n4; t += 4 * VW) {
    const F c0 = (vload<F>(out + t) - v0) - mean;
    const F c1 = (vload<F>(out + t + VW) - v0) - mean;
    const F c2 = (vload<F>(out + t + 2 * VW) - v0) - mean;
    const F c3 = (vload<F>(out + t + 3 * VW) - v0) - mean;
    vstore(out + t, c0);
    vstore(out + t + VW, c1);
    vstore(out + t + 2 * VW, c2);
    vstore(out + t + 3 * VW, c3);
    q0 += c0 * c0;
    q1 += c1 * c1;
    q2 += c2 * c2;
    q3 += c3 * c3;
  }
  for (; t < nfull; t += VW) {
    const F c = (vload<F>(out + t) - v0) - mean;
    vstore(out + t, c);
    q0 += c * c;
  }
  if (nfull < dpad) {
    F c = (vload<F>(out + nfull) - v0) - mean;
    c = tail ? c : F{};
    vstore(out + nfull, c);
    q1 += c * c;
  }
  return hsum<VW>((q0 + q1) + (q2 + q3));
}

// The k candidate rows packed for the sweeps below: in blocks of nb <= kMaxBlock
// rows (near-equal sizes), each block vector by vector, candidate-minor:
//   panel[i0 npad + (t / VW) nb VW + i VW + l] = a_{i0 + i}[t + l]
// (zero past n; npad = n rounded up to VW). The sweep then reads one stream
// with constant offsets instead of nb pointers, which would not fit in the
// general registers beside everything else.
template <int VW>
constexpr int max_block() {
  return VW >= 16 ? 10 : 12;  // R * NB accumulators + the rest within 32 (AVX-512) or 16 registers
}
template <int VW>
constexpr int sweep_rows() {
  return VW >= 16 ? 2 : 1;  // input rows per pass: each panel load feeds R FMAs
}
constexpr int kMaxBlock = 12;

template <int VW>
PGS_INL int64_t block_count(int64_t k) {
  return (k + max_block<VW>() - 1) / max_block<VW>();
}
template <int VW>
PGS_INL int block_size(int64_t k, int64_t nblocks, int64_t blk) {
  return static_cast<int>(k / nblocks + (blk < k % nblocks ? 1 : 0));
}

template <int VW, class T>
PGS_INL void pack_panel(const T* const* a, int64_t k, int64_t n, float* __restrict out) {
  const int64_t npad = (n + VW - 1) / VW * VW, nv = n / VW * VW, nblocks = block_count<VW>(k);
  for (int64_t blk = 0, i0 = 0; blk < nblocks; ++blk) {
    const int nb = block_size<VW>(k, nblocks, blk);
    float* o = out + i0 * npad;
    for (int64_t t = 0; t < nv; t += VW) {
      for (int i = 0; i < nb; ++i) vstore(o + i * VW, load_as_float<VW>(a[i0 + i] + t));
      o += nb * VW;
    }
    if (nv < n) {
      for (int i = 0; i < nb; ++i) {
        for (int l = 0; l < VW; ++l) o[i * VW + l] = nv + l < n ? to_float(a[i0 + i][nv + l]) : 0.0f;
      }
    }
    i0 += nb;
  }
}

// Where the R input rows of a sweep come from.
//   Contig: R rows of n floats (tokens, or patches already centered into a
//           buffer), or of n bf16 (tokens) widened as they are loaded; the
//           last n % VW read through a zeroed copy.
//   Patch:  R patches read in place from the image (P % VW == 0), centered on
//           the fly as (x - v0) - mean, in center_patch's (c, row, column) order.
template <int VW, int R, class T = float>
struct Contig {
  const T* x[R];
  int64_t n;
};
template <int VW, int R>
struct Patch {
  const float* base[R];
  const int64_t* seg;  // offsets of the C P pixel rows of a patch from its first pixel
  int64_t nseg, P;
  float v0[R], mean[R];
};

// The accumulators of one panel block: dot[r][i] += a_i x_r and sq[r] += x_r^2,
// one vector of x_r at a time; each panel vector is loaded once for R rows.
template <int VW, int NB, int R>
struct PanelAcc {
  using F = typename VT<VW>::F;
  F dot[R][NB];
  F sq[R];
  const float* __restrict pa;

  PGS_INL explicit PanelAcc(const float* panel) : pa(panel) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      sq[r] = F{};
#pragma GCC unroll 16
      for (int i = 0; i < NB; ++i) dot[r][i] = F{};
    }
  }
  PGS_INL void step(const F* xv) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) sq[r] += xv[r] * xv[r];
#pragma GCC unroll 16
    for (int i = 0; i < NB; ++i) {
      const F a = vload<F>(pa + i * VW);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) dot[r][i] += a * xv[r];
    }
    pa += NB * VW;
  }
  // out[r NB + i] = <a_i, x_r>, sq_norm[r] = |x_r|^2.
  PGS_INL void finish(float* out, float* sq_norm) const {
    for (int r = 0; r < R; ++r) {
      sq_norm[r] = hsum<VW>(sq[r]);
      for (int i = 0; i < NB; ++i) out[r * NB + i] = hsum<VW>(dot[r][i]);
    }
  }
};

template <int VW, int NB, int R, class T>
PGS_INL void panel_dots(const Contig<VW, R, T>& s, const float* pa, float* out, float* sq_norm) {
  using F = typename VT<VW>::F;
  PanelAcc<VW, NB, R> acc(pa);
  const int64_t n = s.n, nv = n / VW * VW;
  for (int64_t t = 0; t < nv; t += VW) {
    F xv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) xv[r] = load_as_float<VW>(s.x[r] + t);
    acc.step(xv);
  }
  if (nv < n) {
    F xv[R];
    for (int r = 0; r < R; ++r) {
      T tmp[VW] = {};
      std::memcpy(tmp, s.x[r] + nv, (n - nv) * sizeof(T));
      xv[r] = load_as_float<VW>(tmp);
    }
    acc.step(xv);
  }
  acc.finish(out, sq_norm);
}

template <int VW, int NB, int R>
PGS_INL void panel_dots(const Patch<VW, R>& s, const float* pa, float* out, float* sq_norm) {
  using F = typename VT<VW>::F;
  PanelAcc<VW, NB, R> acc(pa);
  F v0[R], mean[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    v0[r] = F{} + s.v0[r];
    mean[r] = F{} + s.mean[r];
  }
  // One flat loop over the pixel rows (one vector each when P == VW): the
  // nested (channel, row) loops cost as much bookkeeping as arithmetic.
  auto row = [&](int64_t off) PGS_INL_LAMBDA {
    F xv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) xv[r] = (vload<F>(s.base[r] + off) - v0[r]) - mean[r];
    acc.step(xv);
  };
  // The vectors of a pixel row unrolled for the usual P / VW, so that the
  // row loop's bookkeeping is paid once per pixel row, not once per vector.
  auto rows = [&](auto per_row) PGS_INL_LAMBDA {
    constexpr int PV = decltype(per_row)::value;
    for (int64_t g = 0; g < s.nseg; ++g) {
      const int64_t off = s.seg[g];
#pragma GCC unroll 4
      for (int t = 0; t < PV; ++t) row(off + t * VW);
    }
  };
  switch (s.P / VW) {
    case 1: rows(std::integral_constant<int, 1>{}); break;
    case 2: rows(std::integral_constant<int, 2>{}); break;
    case 4: rows(std::integral_constant<int, 4>{}); break;
    default:
      for (int64_t g = 0; g < s.nseg; ++g) {
        for (int64_t t = 0; t < s.P; t += VW) row(s.seg[g] + t);
      }
  }
  acc.finish(out, sq_norm);
}

// dots[i ld + j0 + r] = <a_i, x_r> for all k candidates (block by block) and
// the R rows of s; sq_norm[r] = |x_r|^2.
template <int VW, int R, class Src>
PGS_INL void sweep_dots(const Src& s, const float* panel, int64_t k, int64_t npad, float* dots, int64_t ld,
                        int64_t j0, float* sq_norm) {
  const int64_t nblocks = block_count<VW>(k);
  float block_dots[R * kMaxBlock];
  for (int64_t blk = 0, i0 = 0; blk < nblocks; ++blk) {
    const int nb = block_size<VW>(k, nblocks, blk);
    const float* pa = panel + i0 * npad;
    switch (nb) {
#define PGS_CASE(N)                                                                       \
  case N:                                                                                 \
    if (N <= max_block<VW>()) {                                                           \
      panel_dots<VW, (N <= max_block<VW>() ? N : 1), R>(s, pa, block_dots, sq_norm);     \
    }                                                                                     \
    break;
      PGS_CASE(1) PGS_CASE(2) PGS_CASE(3) PGS_CASE(4) PGS_CASE(5) PGS_CASE(6)
      PGS_CASE(7) PGS_CASE(8) PGS_CASE(9) PGS_CASE(10) PGS_CASE(11) PGS_CASE(12)
#undef PGS_CASE
      default: break;
    }
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < nb; ++i) dots[(i0 + i) * ld + j0 + r] = block_dots[r * nb + i];
    }
    i0 += nb;
  }
}

// fn(std::integral_constant<int, NR>, j0) over rows 0..L-1 in groups of R,
// the rows left over one at a time.
template <int R, class Fn>
PGS_INL void for_row_groups(int64_t L, const Fn& fn) {
  int64_t j0 = 0;
  for (; j0 + R <= L; j0 += R) fn(std::integral_constant<int, R>{}, j0);
  for (; j0 < L; ++j0) fn(std::integral_constant<int, 1>{}, j0);
}

// 1 / (|v| + 1e-6) from q = |v|^2; 0 where q overflowed to inf.
PGS_INL float inverse_norm(float q) {
  return static_cast<float>(1.0 / (std::sqrt(static_cast<double>(q)) + kEps));
}

// <v_i / (|v_i| + 1e-6), v_j / (|v_j| + 1e-6)> from the raw dot product d and
// the inverse norms c_i, c_j. (c_i d) c_j stays within fp32 wherever the
// norms do (|c_i d| <= |v_j|), where c_i c_j would underflow from norms of
// ~1e19. A vector whose squared norm overflowed (c = 0) counts as zero, as
// v / (|v| + 1e-6) with |v| = inf makes it in fp32, so d's inf or NaN does
// not come through; a NaN c still does (c_i c_j).
PGS_INL float cosine(float ci, float d, float cj) {
  return (ci == 0.0f || cj == 0.0f) ? ci * cj : (ci * d) * cj;
}

// Into L2 (prefetcht1): the lines of n floats at p.
PGS_INL void prefetch_l2(const float* p, int64_t n) {
  for (int64_t t = 0; t < n; t += 16) __builtin_prefetch(p + t, 0, 2);
}

template <int VW>
PGS_INL void similarity(const Params& prm, const ImageIn& in, const int64_t* cand, bool patch_direct,
                        const Workspace& ws, int64_t Lp) {
  const Geometry& g = prm.g;
  const int64_t L = g.L, k = prm.k;
  const float** cand_vectors = ws.cand_vectors;
  constexpr int R = sweep_rows<VW>();
  float sq_norm[R] = {};
  // The last sweep over this image's data streams from L2; meanwhile the next
  // image's rows come into L2 for its edge pass, a share per step.
  const bool last_is_tokens = prm.want_tokens;
  auto prefetch_next = [&](int64_t j0, int64_t nr) {
    if (!in.next_pixels) return;
    const int64_t rows = g.C * g.H;
    for (int64_t row = j0 * rows / L; row < (j0 + nr) * rows / L; ++row) {
      prefetch_l2(in.next_pixels + (row / g.H) * in.channel_stride + (row % g.H) * in.row_stride, g.W);
    }
  };
  if (prm.want_pixels) {
    const int64_t dim = g.C * g.P * g.P, dpad = round_up<VW>(dim);
    for (int64_t i = 0; i < k; ++i) {
      float* centered = ws.centered_cands + i * dpad;
      center_patch<VW>(in, g, cand[i], dim, dpad, centered);
      cand_vectors[i] = centered;
    }
    pack_panel<VW>(cand_vectors, k, dpad, ws.panel);
    const int64_t P = g.P;
    for_row_groups<R>(L, [&](auto rows, int64_t j0) PGS_INL_LAMBDA {
      constexpr int NR = decltype(rows)::value;
      if (!last_is_tokens) prefetch_next(j0, NR);
      if (patch_direct) {
        // Read in place: no copy of the patch, and the mean came with the edge pass.
        Patch<VW, NR> s;
        s.seg = ws.row_offsets, s.nseg = g.C * P, s.P = P;
        for (int r = 0; r < NR; ++r) {
          const int64_t j = j0 + r;
          s.base[r] = in.pixels + (j / g.gw) * P * in.row_stride + (j % g.gw) * P;
          s.v0[r] = s.base[r][0];
          s.mean[r] = ws.patch_mean[j];
        }
        sweep_dots<VW, NR>(s, ws.panel, k, dpad, ws.pixel_dots, Lp, j0, sq_norm);
      } else {
        Contig<VW, NR> s;
        s.n = dpad;
        for (int r = 0; r < NR; ++r) {
          float* centered = ws.centered_rows + r * dpad;
          center_patch<VW>(in, g, j0 + r, dim, dpad, centered);
          s.x[r] = centered;
        }
        sweep_dots<VW, NR>(s, ws.panel, k, dpad, ws.pixel_dots, Lp, j0, sq_norm);
      }
      for (int r = 0; r < NR; ++r) ws.inv_pixel_norm[j0 + r] = inverse_norm(sq_norm[r]);
    });
  }
  if (prm.want_tokens) {
    const int64_t t_start = ws.step_ns ? now_ns() : 0;
    const int64_t D = prm.D, Dpad = round_up<VW>(D);
    // fp32 or bf16: the same sweep, the bf16 widened exactly as it is loaded.
    auto token_sweep = [&](const auto* tokens, const auto** cand_rows) PGS_INL_LAMBDA {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(tokens)>>;
      for (int64_t i = 0; i < k; ++i) cand_rows[i] = tokens + cand[i] * in.token_stride;
      pack_panel<VW>(cand_rows, k, D, ws.panel);
      for_row_groups<R>(L, [&](auto rows, int64_t j0) PGS_INL_LAMBDA {
        constexpr int NR = decltype(rows)::value;
        prefetch_next(j0, NR);
        Contig<VW, NR, T> s;
        s.n = D;
        for (int r = 0; r < NR; ++r) s.x[r] = tokens + (j0 + r) * in.token_stride;
        sweep_dots<VW, NR>(s, ws.panel, k, Dpad, ws.token_dots, Lp, j0, sq_norm);
        for (int r = 0; r < NR; ++r) ws.inv_token_norm[j0 + r] = inverse_norm(sq_norm[r]);
      });
      // A token with an infinite element has |t| = inf too, but t / |t| holds
      // inf / inf = NaN, which the contract carries into S: not a zero vector.
      for (int64_t j = 0; j < L; ++j) {
        if (ws.inv_token_norm[j] != 0.0f) continue;
        const T* t = tokens + j * in.token_stride;
        if (std::any_of(t, t + D, [](T v) { return std::isinf(to_float(v)); })) {
          ws.inv_token_norm[j] = std::numeric_limits<float>::quiet_NaN();
        }
      }
    };
    if (in.tokens_bf16) {
      token_sweep(in.tokens_bf16, ws.cand_bf16);
    } else {
      token_sweep(in.tokens, cand_vectors);
    }
    if (ws.step_ns) ws.step_ns[kTokenSweep] += now_ns() - t_start;
  }
  const float* inv_p = ws.inv_pixel_norm;
  const float* inv_t = ws.inv_token_norm;
  const float wp = prm.one_minus_alpha, wt = prm.alpha;
  for (int64_t i = 0; i < k; ++i) {
    float* row = ws.sim + i * Lp;
    if (prm.want_pixels) {
      const float ci = inv_p[cand[i]];
      const float* dots = ws.pixel_dots + i * Lp;
      for (int64_t j = 0; j < L; ++j) row[j] = wp * cosine(ci, dots[j], inv_p[j]);
    }
    if (prm.want_tokens) {
      const float ci = inv_t[cand[i]];
      const float* dots = ws.token_dots + i * Lp;
      if (prm.want_pixels) {
        for (int64_t j = 0; j < L; ++j) row[j] = row[j] + wt * cosine(ci, dots[j], inv_t[j]);
      } else {
        for (int64_t j = 0; j < L; ++j) row[j] = wt * cosine(ci, dots[j], inv_t[j]);
      }
    }
    for (int64_t j = L; j < Lp; ++j) row[j] = 0.0f;
  }
}

#if PGS_X86_VARIANTS
PGS_TARGET_AVX512 void similarity_avx512(const Params& prm, const ImageIn& in, const int64_t* cand, bool direct,
                                         const Workspace& ws, int64_t Lp) {
  similarity<16>(prm, in, cand, direct, ws, Lp);
}
PGS_TARGET_AVX2 void similarity_avx2(const Params& prm, const ImageIn& in, const int64_t* cand, bool direct,
                                     const Workspace& ws, int64_t Lp) {
  similarity<8>(prm, in, cand, direct, ws, Lp);
}
#endif
void similarity_base(const Params& prm, const ImageIn& in, const int64_t* cand, bool direct, const Workspace& ws,
                     int64_t Lp) {
  similarity<4>(prm, in, cand, direct, ws, Lp);
}

}  // namespace

SimilarityFn similarity_for(int width) {
#if PGS_X86_VARIANTS
  if (width == 16) return similarity_avx512;
  if (width == 8) return similarity_avx2;
#endif
  return similarity_base;
}

}  // namespace pgs
