// Native CPU kernel of pgs_kernels::pgs_select (the contract: SPEC.md; the
// oracle: python_ref.pgs.pgs_select_core). One image at a time, fp32 math,
// images spread over threads with at::parallel_for.
//
// Symbols (SPEC.md): B images of C x H x W, patch size P, grid gh x gw,
// L = gh gw patches, K kept, M = L - K dropped, k candidates, u noise,
// w_e edge weight, alpha token weight, eps = ot_reg, T = ot_iters,
// theta = sim_threshold.
//
//   Y       = mean_c images[c]                                  (H x W)
//   Gx, Gy  = 3x3 Sobel of Y, replicated border;  G = sqrt(Gx^2 + Gy^2)
//   e_j     = mean of G over patch j
//   ê_j     = (e_j - min_l e_l) / (max_l e_l - min_l e_l + 1e-6)
//   key_j   = u_j + w_e ê_j  (= u_j when w_e = 0);  NaN -> +inf
//   Cand    = the first k patches in the order (key_j, j), in that order
//   p̂_j     = x̃_j / (|x̃_j| + 1e-6),  x̃_j = x_j - mean(x_j)   (x_j: C P^2 pixels)
//   t̂_j     = t_j / (|t_j| + 1e-6)
//   S_ij    = (1 - alpha) <p̂_i, p̂_j> + alpha <t̂_i, t̂_j>       (i in Cand; a term
//             whose weight is 0 is skipped, so its input cannot bring NaN in)
//   Z       = S / eps;  g = 0;  T times:
//               f_i = -log k - logsumexp_j (Z_ij + g_j)
//               g_j = -log L - logsumexp_i (Z_ij + f_i)
//             (run as the equivalent scaling iteration, K = exp(Z - rowmax),
//             wherever fp32 holds all its numbers; see sinkhorn_scaling)
//   r_j     = L sum_i exp(Z_ij + f_i + g_j) S_ij     (use_ot)
//           = max_i S_ij                               (no OT);  -inf when k = 0
//   tier_j  = 0 (candidate), 1 (r_j > theta; NaN is not), 2 (otherwise)
//   drop the first M patches in the order (tier_j, key_j, j); keep the rest.
//
// logsumexp follows torch.logsumexp: the shift is the maximum unless that is
// +-inf, in which case it is 0, so an all -inf slice gives -inf and NaN
// propagates.

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

namespace pgs {
namespace {

constexpr double kEps = 1e-6;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Everything per image is written once over GCC vector types of VW floats and
// compiled three times (AVX-512, AVX2+FMA, baseline SSE2) through target
// attributes on the entry points below; the helpers are forced inline so that
// they take the target of the entry point that calls them.
#define PGS_INL inline __attribute__((always_inline))
#define PGS_INL_LAMBDA __attribute__((always_inline))

template <int VW>
struct VT {
  typedef float F __attribute__((vector_size(VW * sizeof(float))));
  typedef int32_t I __attribute__((vector_size(VW * sizeof(float))));
};

template <class V>
PGS_INL V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class V>
PGS_INL void vstore(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

// Lane-wise sqrt; with -fno-math-errno gcc makes it one vector sqrt.
template <int VW>
PGS_INL typename VT<VW>::F vsqrt(typename VT<VW>::F v) {
  typename VT<VW>::F r;
#pragma GCC unroll 16
  for (int l = 0; l < VW; ++l) r[l] = __builtin_sqrtf(v[l]);
  return r;
}

// Pairwise over lanes, so the order is fixed by VW alone.
template <int VW>
PGS_INL float hsum(typename VT<VW>::F v) {
  float a[VW];
  std::memcpy(a, &v, sizeof a);
#pragma GCC unroll 8
  for (int w = VW / 2; w >= 1; w /= 2) {
#pragma GCC unroll 16
    for (int l = 0; l < w; ++l) a[l] += a[l + w];
  }
  return a[0];
}

// Lanes l < n set, the rest clear.
template <int VW>
PGS_INL typename VT<VW>::I lanes_below(int64_t n) {
  typename VT<VW>::I idx;
  for (int l = 0; l < VW; ++l) idx[l] = l;
  return idx < static_cast<int32_t>(n);
}

// exp for fp32. Range reduction x = n ln2 + r with |r| <= ln2/2, degree-7
// Taylor for e^r (error ~5e-9 relative, below fp32 rounding), 2^n built in
// the exponent bits. The clamp to [-88, 89] makes n = -127 give the scale 0
// and n = 128 the scale inf, so that underflow to 0 and overflow to inf (also
// for -inf, +inf) need no further selects; NaN stays NaN through p.
template <int VW>
PGS_INL typename VT<VW>::F vexp(typename VT<VW>::F x) {
  using F = typename VT<VW>::F;
  using I = typename VT<VW>::I;
  const float hi = 89.0f, lo = -88.0f;
  F xc = x > hi ? F{} + hi : x;
  xc = xc < lo ? F{} + lo : xc;
  const F n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  F r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  F p = F{} + 1.9841270e-4f;
  p = p * r + 1.3888889e-3f;
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // A NaN n would convert to an arbitrary integer; 0 keeps the shift defined.
  const I ni = x != x ? I{} : __builtin_convertvector(n, I);
  const I bits = (ni + 127) << 23;
  return p * (F)bits;
}

// log for fp32 (Cephes logf: m in [sqrt(1/2), sqrt(2)), degree-8 polynomial,
// ~1 ulp). log 0 = -inf, log inf = inf, negative or NaN -> NaN; denormals are
// scaled into the normal range first.
template <int VW>
PGS_INL typename VT<VW>::F vlog(typename VT<VW>::F x0) {
  using F = typename VT<VW>::F;
  using I = typename VT<VW>::I;
  const I tiny = x0 < 1.17549435e-38f;
  const F x = tiny ? x0 * 8388608.0f : x0;  // 2^23
  const I xb = (I)x;
  I e = ((xb >> 23) & 0xff) - 126;
  e = tiny ? e - 23 : e;
  const I mb = (xb & 0x807fffff) | 0x3f000000;
  F m = (F)mb;  // [0.5, 1)
  const I small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? (m + m) - 1.0f : m - 1.0f;
  const F z = m * m;
  F y = F{} + 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const F fe = __builtin_convertvector(e, F);
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  F r = m + y;
  r = r + fe * 0.693359375f;
  r = x0 == 0.0f ? F{} - kInf : r;
  r = x0 == kInf ? F{} + kInf : r;
  r = (x0 < 0.0f || x0 != x0) ? F{} + std::numeric_limits<float>::quiet_NaN() : r;
  return r;
}

// torch.logsumexp's shift: the maximum, or 0 where the maximum is +-inf.
template <int VW>
PGS_INL typename VT<VW>::F vshift(typename VT<VW>::F m) {
  using F = typename VT<VW>::F;
  return (m == kInf || m == -kInf) ? F{} : m;
}

struct Geometry {
  int64_t C, H, W, P, gh, gw, L;
};

// Channel sum of image row y (c = 0 first). The Sobel is linear, so the
// channel mean's Sobel is this row's divided by C, which is done once per
// patch sum instead of once per pixel.
template <int VW>
PGS_INL void sum_row(const float* __restrict img, int64_t sc, int64_t sy, const Geometry& g, int64_t y,
                     float* __restrict dst) {
  using F = typename VT<VW>::F;
  const int64_t W = g.W, nv = W / VW * VW;
  const float* src = img + y * sy;
  if (g.C == 3) {
    const float *s1 = src + sc, *s2 = src + 2 * sc;
    for (int64_t x = 0; x < nv; x += VW) {
      vstore(dst + x, (vload<F>(src + x) + vload<F>(s1 + x)) + vload<F>(s2 + x));
    }
    for (int64_t x = nv; x < W; ++x) dst[x] = (src[x] + s1[x]) + s2[x];
    return;
  }
  for (int64_t x = 0; x < nv; x += VW) vstore(dst + x, vload<F>(src + x));
  for (int64_t x = nv; x < W; ++x) dst[x] = src[x];
  for (int64_t c = 1; c < g.C; ++c) {
    const float* s = src + c * sc;
    for (int64_t x = 0; x < nv; x += VW) vstore(dst + x, vload<F>(dst + x) + vload<F>(s + x));
    for (int64_t x = nv; x < W; ++x) dst[x] += s[x];
  }
}

// Sobel magnitude of the channel sum, summed per patch. The channel-sum rows
// live in a ring of three, so the image is read once and no mean image is
// stored. The Sobel is separable: V = up + 2 mid + down gives
// Gx(x) = V(x+1) - V(x-1); D = down - up gives Gy(x) = D(x-1) + 2 D(x) + D(x+1);
// both come from the three ring rows in one loop. Each ring row has one
// replicated element on either side (the replicated border in x; in y it is
// the choice of rows). G is summed over the P rows of a patch row per column
// in fp32, then over the P columns of a patch in double.
// scratch: 4 W + 6 floats.
template <int VW>
PGS_INL void edge_sums(const float* img, int64_t sc, int64_t sy, const Geometry& g, double* esum,
                       float* scratch, float* pmean, float* mvec) {
  using F = typename VT<VW>::F;
  const int64_t H = g.H, W = g.W, P = g.P, gw = g.gw, nv = W / VW * VW;
  const int64_t rs = W + 2;                 // ring row stride
  float* ring = scratch;                    // 3 (W + 2)
  float* __restrict acc = ring + 3 * rs;    // W
  auto fill = [&](int64_t y) {
    float* r = ring + (y % 3) * rs;
    sum_row<VW>(img, sc, sy, g, y, r + 1);
    r[0] = r[1];
    r[W + 1] = r[W];
  };
  fill(0);
  if (H > 1) fill(1);
  for (int64_t y = 0; y < H; ++y) {
    if (y >= 1 && y + 1 < H) fill(y + 1);
    // Element x of a row is at [x + 1]; so these point one before it.
    const float* __restrict up = ring + (std::max<int64_t>(y - 1, 0) % 3) * rs;
    const float* __restrict mid = ring + (y % 3) * rs;
    const float* __restrict dn = ring + (std::min<int64_t>(y + 1, H - 1) % 3) * rs;
    const bool first = y % P == 0;
    for (int64_t x = 0; x < nv; x += VW) {
      const F ul = vload<F>(up + x), uc = vload<F>(up + x + 1), ur = vload<F>(up + x + 2);
      const F dl = vload<F>(dn + x), dc = vload<F>(dn + x + 1), dr = vload<F>(dn + x + 2);
      const F gx = ((ur + 2.0f * vload<F>(mid + x + 2)) + dr) - ((ul + 2.0f * vload<F>(mid + x)) + dl);
      const F gy = ((dl - ul) + 2.0f * (dc - uc)) + (dr - ur);
      const F gm = vsqrt<VW>(gx * gx + gy * gy);
      vstore(acc + x, first ? gm : vload<F>(acc + x) + gm);
    }
    for (int64_t x = nv; x < W; ++x) {
      const float gx = ((up[x + 2] + 2.0f * mid[x + 2]) + dn[x + 2]) - ((up[x] + 2.0f * mid[x]) + dn[x]);
      const float gy = ((dn[x] - up[x]) + 2.0f * (dn[x + 1] - up[x + 1])) + (dn[x + 2] - up[x + 2]);
      const float gm = std::sqrt(gx * gx + gy * gy);
      acc[x] = first ? gm : acc[x] + gm;
    }
    // With pmean (P % VW == 0): mean(x_j - v0_j) of every patch j, for
    // center_patch's centering in the similarity sweep, while the row is in L1;
    // v0_j is the patch's first pixel (channel 0). One vector per patch column
    // accumulates over the band's rows and channels.
    if (pmean) {
      // sum_c (x_c - v0) = (channel sum) - C v0, from the ring row already at
      // hand instead of C image rows. C v0 is added up in sum_row's order, so a
      // constant patch still gives exactly zero.
      const float* v0row = img + (y / P) * P * sy;
      if (first) std::fill(mvec, mvec + gw * VW, 0.0f);
      const float* ysum = mid + 1;
      for (int64_t pc = 0; pc < gw; ++pc) {
        const float v0 = v0row[pc * P];
        float cv0 = v0;
        for (int64_t c = 1; c < g.C; ++c) cv0 += v0;
        F a = vload<F>(mvec + pc * VW);
        for (int64_t t = 0; t < P; t += VW) a += vload<F>(ysum + pc * P + t) - cv0;
        vstore(mvec + pc * VW, a);
      }
      if (y % P == P - 1) {
        const float dim = static_cast<float>(g.C * P * P);
        for (int64_t pc = 0; pc < gw; ++pc) pmean[(y / P) * gw + pc] = hsum<VW>(vload<F>(mvec + pc * VW)) / dim;
      }
    }
    if (y % P == P - 1) {
      double* erow = esum + (y / P) * gw;
      for (int64_t pc = 0; pc < gw; ++pc) {
        double s = 0.0;
        for (int64_t t = 0; t < P; ++t) s += static_cast<double>(acc[pc * P + t]);
        erow[pc] = s;
      }
    }
  }
}

// Patch j's C P^2 pixels ((channel, row, column) order) into out, centered:
// x~ = x - mean(x) with the mean taken as x_0 + mean(x - x_0): a constant patch
// centers to exactly zero (zero similarity, as in the fp64 reference), and the
// shift keeps fp32 cancellation small for patches with a large offset. out has
// dpad (a multiple of VW) floats; the lanes past C P^2 are zero. Returns |x~|^2.
template <int VW>
PGS_INL float center_patch(const float* img, int64_t sc, int64_t sy, const Geometry& g, int64_t j,
                           int64_t dim, int64_t dpad, float* __restrict out) {
  using F = typename VT<VW>::F;
  const int64_t P = g.P;
  const float* base = img + (j / g.gw) * P * sy + (j % g.gw) * P;
  float* o = out;
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t r = 0; r < P; ++r, o += P) {
      const float* src = base + c * sc + r * sy;
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

template <int VW>
PGS_INL void pack_panel(const float* const* a, int64_t k, int64_t n, float* __restrict out) {
  using F = typename VT<VW>::F;
  const int64_t npad = (n + VW - 1) / VW * VW, nv = n / VW * VW, nblocks = block_count<VW>(k);
  for (int64_t blk = 0, i0 = 0; blk < nblocks; ++blk) {
    const int nb = block_size<VW>(k, nblocks, blk);
    float* o = out + i0 * npad;
    for (int64_t t = 0; t < nv; t += VW) {
      for (int i = 0; i < nb; ++i) vstore(o + i * VW, vload<F>(a[i0 + i] + t));
      o += nb * VW;
    }
    if (nv < n) {
      for (int i = 0; i < nb; ++i) {
        for (int l = 0; l < VW; ++l) o[i * VW + l] = nv + l < n ? a[i0 + i][nv + l] : 0.0f;
      }
    }
    i0 += nb;
  }
}

// Where the R input rows of a sweep come from.
//   Contig: R rows of n floats (tokens, or patches already centered into a
//           buffer); the last n % VW read through a zeroed copy.
//   Patch:  R patches read in place from the image (P % VW == 0), centered on
//           the fly as (x - v0) - mean, in center_patch's (c, row, column) order.
template <int VW, int R>
struct Contig {
  const float* x[R];
  int64_t n;
};
template <int VW, int R>
struct Patch {
  const float* base[R];
  const int64_t* seg;  // offsets of the C P pixel rows of a patch from its first pixel
  int64_t nseg, P;
  float v0[R], mean[R];
};

// The accumulators of one panel block: acc[r][i] += a_i x_r and qa[r] += x_r^2,
// one vector of x_r at a time; each panel vector is loaded once for R rows.
template <int VW, int NB, int R>
struct PanelAcc {
  using F = typename VT<VW>::F;
  F acc[R][NB];
  F qa[R];
  const float* __restrict pa;

  PGS_INL explicit PanelAcc(const float* panel) : pa(panel) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      qa[r] = F{};
#pragma GCC unroll 16
      for (int i = 0; i < NB; ++i) acc[r][i] = F{};
    }
  }
  PGS_INL void step(const F* xv) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) qa[r] += xv[r] * xv[r];
#pragma GCC unroll 16
    for (int i = 0; i < NB; ++i) {
      const F a = vload<F>(pa + i * VW);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r][i] += a * xv[r];
    }
    pa += NB * VW;
  }
  // out[r NB + i] = <a_i, x_r>, q[r] = |x_r|^2.
  PGS_INL void finish(float* out, float* q) const {
    for (int r = 0; r < R; ++r) {
      q[r] = hsum<VW>(qa[r]);
      for (int i = 0; i < NB; ++i) out[r * NB + i] = hsum<VW>(acc[r][i]);
    }
  }
};

template <int VW, int NB, int R>
PGS_INL void panel_dots(const Contig<VW, R>& s, const float* pa, float* out, float* q) {
  using F = typename VT<VW>::F;
  PanelAcc<VW, NB, R> k(pa);
  const int64_t n = s.n, nv = n / VW * VW;
  for (int64_t t = 0; t < nv; t += VW) {
    F xv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) xv[r] = vload<F>(s.x[r] + t);
    k.step(xv);
  }
  if (nv < n) {
    F xv[R];
    for (int r = 0; r < R; ++r) {
      float tmp[VW] = {};
      std::memcpy(tmp, s.x[r] + nv, (n - nv) * sizeof(float));
      xv[r] = vload<F>(tmp);
    }
    k.step(xv);
  }
  k.finish(out, q);
}

template <int VW, int NB, int R>
PGS_INL void panel_dots(const Patch<VW, R>& s, const float* pa, float* out, float* q) {
  using F = typename VT<VW>::F;
  PanelAcc<VW, NB, R> k(pa);
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
    k.step(xv);
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
  k.finish(out, q);
}

// S[i ld + j0 + r] = <a_i, x_r> for all k candidates (block by block) and the
// R rows of s; q[r] = |x_r|^2.
template <int VW, int R, class Src>
PGS_INL void sweep_dots(const Src& s, const float* panel, int64_t k, int64_t npad, float* S, int64_t ld,
                        int64_t j0, float* q) {
  const int64_t nblocks = block_count<VW>(k);
  float d[R * kMaxBlock];
  for (int64_t blk = 0, i0 = 0; blk < nblocks; ++blk) {
    const int nb = block_size<VW>(k, nblocks, blk);
    const float* pa = panel + i0 * npad;
    switch (nb) {
#define PGS_CASE(N)                                   \
  case N:                                             \
    if (N <= max_block<VW>()) panel_dots<VW, (N <= max_block<VW>() ? N : 1), R>(s, pa, d, q); \
    break;
      PGS_CASE(1) PGS_CASE(2) PGS_CASE(3) PGS_CASE(4) PGS_CASE(5) PGS_CASE(6)
      PGS_CASE(7) PGS_CASE(8) PGS_CASE(9) PGS_CASE(10) PGS_CASE(11) PGS_CASE(12)
#undef PGS_CASE
      default: break;
    }
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < nb; ++i) S[(i0 + i) * ld + j0 + r] = d[r * nb + i];
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

PGS_INL float inverse_norm(float q) {
  return static_cast<float>(1.0 / (std::sqrt(static_cast<double>(q)) + kEps));
}

// r_j = max_i S_ij, NaN propagating like torch.amax. S: k x Lp.
PGS_INL void max_redundancy(const float* S, int64_t k, int64_t L, int64_t Lp, float* r) {
  for (int64_t j = 0; j < L; ++j) r[j] = -kInf;
  for (int64_t i = 0; i < k; ++i) {
    const float* row = S + i * Lp;
    for (int64_t j = 0; j < L; ++j) {
      const float v = row[j];
      const float m = r[j];
      r[j] = (v > m || v != v) ? v : m;
    }
  }
}

// The same T iterations with the potentials exponentiated. With
//   c_i = max_j Z_ij,  K_ij = exp(Z_ij - c_i),  A_i = exp(f_i + c_i),  B_j = exp(g_j)
// the f step f_i = log_a - logsumexp_j (Z_ij + g_j) is A_i = (1/k) / sum_j K_ij B_j,
// the g step is B_j = (1/L) / sum_i K_ij A_i, and Pi_ij = K_ij A_i B_j, so
// r_j = L B_j sum_i K_ij A_i S_ij. A mat-vec per half step instead of k L exp
// and log, which is most of the kernel's arithmetic otherwise. It is taken
// only where fp32 holds every quantity as a normal number: S finite, every
// K_ij >= e^-80 (Z_ij - c_i >= -80) and every sum in [1e-30, 1e30]. Else it
// returns false before writing r, and the log-domain loop below runs (small
// eps, NaN inputs). work: k*Lp + kp + Lp floats.
template <int VW>
PGS_INL bool sinkhorn_scaling(const float* S, int64_t k, int64_t L, int64_t Lp, float eps, int64_t T, float* r,
                              float* work) {
  using F = typename VT<VW>::F;
  using I = typename VT<VW>::I;
  const int64_t kp = (k + VW - 1) / VW * VW;
  float* Kt = work;       // k x Lp
  float* A = Kt + k * Lp;  // kp
  float* B = A + kp;       // Lp
  const auto last = lanes_below<VW>(L - (Lp - VW));  // valid lanes of the last vector
  for (int64_t i = 0; i < k; ++i) {
    const float* s = S + i * Lp;
    float* kr = Kt + i * Lp;
    float c = -kInf, lo = kInf;
    for (int64_t j = 0; j < L; ++j) {
      const float z = s[j] / eps;
      if (!std::isfinite(z)) return false;
      kr[j] = z;
      c = std::max(c, z);
      lo = std::min(lo, z);
    }
    if (lo - c < -80.0f) return false;
    for (int64_t j = 0; j < Lp; j += VW) {
      const F e = vexp<VW>(vload<F>(kr + j) - c);
      vstore(kr + j, j + VW < Lp ? e : (last ? e : F{}));
    }
  }
  for (int64_t j = 0; j < Lp; ++j) B[j] = j < L ? 1.0f : 0.0f;
  const float a = static_cast<float>(1.0 / static_cast<double>(k));
  const float b = static_cast<float>(1.0 / static_cast<double>(L));
  const F lo_ok = F{} + 1e-30f, hi_ok = F{} + 1e30f;
  I bad{};
  for (int64_t it = 0; it < T; ++it) {
    for (int64_t i = 0; i < k; ++i) {
      const float* kr = Kt + i * Lp;
      F s0{}, s1{};
      int64_t j = 0;
      for (; j + 2 * VW <= Lp; j += 2 * VW) {
        s0 += vload<F>(kr + j) * vload<F>(B + j);
        s1 += vload<F>(kr + j + VW) * vload<F>(B + j + VW);
      }
      if (j < Lp) s0 += vload<F>(kr + j) * vload<F>(B + j);
      const float s = hsum<VW>(s0 + s1);
      if (!(s >= 1e-30f && s <= 1e30f)) return false;
      A[i] = a / s;
    }
    for (int64_t j = 0; j < Lp; j += VW) {
      F s{};
      for (int64_t i = 0; i < k; ++i) s += vload<F>(Kt + i * Lp + j) * A[i];
      const auto valid = j + VW < Lp ? (I{} - 1) : last;
      bad |= valid & ~((s >= lo_ok) & (s <= hi_ok));
      vstore(B + j, valid ? b / s : F{});
    }
    bool any = false;
    for (int l = 0; l < VW; ++l) any |= bad[l] != 0;
    if (any) return false;
  }
  const float Lf = static_cast<float>(L);
  for (int64_t j = 0; j < Lp; j += VW) {
    F acc{};
    for (int64_t i = 0; i < k; ++i) acc += (vload<F>(Kt + i * Lp + j) * A[i]) * vload<F>(S + i * Lp + j);
    const F rv = (acc * vload<F>(B + j)) * Lf;
    if (j + VW <= L) {
      vstore(r + j, rv);
    } else {
      for (int64_t l = 0; j + l < L; ++l) r[j + l] = rv[l];
    }
  }
  return true;
}

// Log-domain Sinkhorn (exactly T iterations, f then g) and r_j = L sum_i Pi_ij S_ij.
// S: k x Lp (Lp a multiple of VW, padding zero). Z's padding is -inf, so it
// adds nothing to the f sums; g's padding is held at 0 so that -inf + g stays
// -inf. work: k*Lp + 3*kp + 2*Lp floats, kp = k rounded up to VW.
template <int VW>
PGS_INL void sinkhorn_redundancy(const float* S, int64_t k, int64_t L, int64_t Lp, float eps, int64_t T,
                                 float* r, float* work) {
  if (sinkhorn_scaling<VW>(S, k, L, Lp, eps, T, r, work)) return;
  using F = typename VT<VW>::F;
  const int64_t kp = (k + VW - 1) / VW * VW;
  float* Z = work;
  float* f = Z + k * Lp;   // kp
  float* fs = f + kp;      // kp: per-row sums, then shifts
  float* g = fs + kp;      // Lp
  float* cs = g + Lp;      // Lp
  float* shv = cs + Lp;    // kp
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < L; ++j) Z[i * Lp + j] = S[i * Lp + j] / eps;
    for (int64_t j = L; j < Lp; ++j) Z[i * Lp + j] = -kInf;
  }
  const float log_a = static_cast<float>(-std::log(static_cast<double>(k)));
  const float log_b = static_cast<float>(-std::log(static_cast<double>(L)));
  for (int64_t j = 0; j < Lp; ++j) g[j] = 0.0f;
  for (int64_t i = k; i < kp; ++i) fs[i] = 1.0f, shv[i] = 0.0f;

  for (int64_t it = 0; it < T; ++it) {
    // f_i = log_a - logsumexp_j (Z_ij + g_j)
    for (int64_t i = 0; i < k; ++i) {
      const float* z = Z + i * Lp;
      F mv = F{} - kInf;
      for (int64_t j = 0; j < Lp; j += VW) {
        const F v = vload<F>(z + j) + vload<F>(g + j);
        mv = mv < v ? v : mv;
      }
      float m = -kInf;
      for (int l = 0; l < VW; ++l) m = m < mv[l] ? mv[l] : m;
      const float sh = std::isinf(m) ? 0.0f : m;
      F sv{};
      for (int64_t j = 0; j < Lp; j += VW) sv += vexp<VW>((vload<F>(z + j) + vload<F>(g + j)) - sh);
      fs[i] = hsum<VW>(sv);
      shv[i] = sh;
    }
    for (int64_t i = 0; i < kp; i += VW) {
      vstore(f + i, log_a - (vload<F>(shv + i) + vlog<VW>(vload<F>(fs + i))));
    }
    // g_j = log_b - logsumexp_i (Z_ij + f_i)
    for (int64_t j = 0; j < Lp; j += VW) {
      F m = F{} - kInf;
      for (int64_t i = 0; i < k; ++i) {
        const F v = vload<F>(Z + i * Lp + j) + f[i];
        m = v > m ? v : m;
      }
      m = vshift<VW>(m);
      F s{};
      for (int64_t i = 0; i < k; ++i) s += vexp<VW>((vload<F>(Z + i * Lp + j) + f[i]) - m);
      vstore(g + j, log_b - (m + vlog<VW>(s)));
    }
    for (int64_t j = L; j < Lp; ++j) g[j] = 0.0f;
  }

  const float Lf = static_cast<float>(L);
  for (int64_t j = 0; j < Lp; j += VW) {
    const F gj = vload<F>(g + j);
    F acc{};
    for (int64_t i = 0; i < k; ++i) {
      acc += vexp<VW>((vload<F>(Z + i * Lp + j) + f[i]) + gj) * vload<F>(S + i * Lp + j);
    }
    vstore(cs + j, acc * Lf);
  }
  for (int64_t j = 0; j < L; ++j) r[j] = cs[j];
}

struct Params {
  Geometry g;
  int64_t K, k, D, T;
  float theta, alpha, eps;
  double edge_weight, token_weight;
  bool use_ot, want_pixels, want_tokens;
};

// 64-byte aligned storage: with malloc's 16-byte alignment every AVX-512 load
// from these buffers would straddle two cache lines.
template <class T>
struct CacheLineAlloc {
  using value_type = T;
  CacheLineAlloc() = default;
  template <class U>
  CacheLineAlloc(const CacheLineAlloc<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <class U>
  bool operator==(const CacheLineAlloc<U>&) const { return true; }
  template <class U>
  bool operator!=(const CacheLineAlloc<U>&) const { return false; }
};
using FloatBuf = std::vector<float, CacheLineAlloc<float>>;

// Per-thread work space.
struct Buffers {
  FloatBuf img, Tk, S, Dt, sob, ot, invp, invt, xr, cbuf, panel, pmean, mvec;
  std::vector<double> esum, key;
  std::vector<int64_t> idx, seg;
  std::vector<const float*> cptr;
  std::vector<uint8_t> tier;
};

// One image's inputs as fp32: pixels with unit column stride, tokens with unit
// feature stride (anything else was converted before).
struct ImageIn {
  const float* img;
  int64_t sc, sy;
  const float* tok;
  int64_t ld;
  const float* u;
  const float* next_img;  // the next image of this thread's range (fp32, read in place), or null
};

// Into L2 (prefetcht1): the lines of n floats at p.
PGS_INL void prefetch_l2(const float* p, int64_t n) {
  for (int64_t t = 0; t < n; t += 16) __builtin_prefetch(p + t, 0, 2);
}

struct ImageOut {
  float* edge;
  int64_t* cand;
  float* red;
  bool* mask;
  int64_t* keep;
};

template <int VW>
PGS_INL void process_image(const Params& prm, const ImageIn& in, const ImageOut& out, Buffers& buf) {
  const Geometry& g = prm.g;
  const int64_t L = g.L, k = prm.k, K = prm.K;
  const int64_t Lp = (L + VW - 1) / VW * VW;

  // Step 1: edge energy.
  const bool patch_direct = prm.want_pixels && k > 0 && g.P % VW == 0;
  edge_sums<VW>(in.img, in.sc, in.sy, g, buf.esum.data(), buf.sob.data(),
                patch_direct ? buf.pmean.data() : nullptr, buf.mvec.data());
  const double inv_pp = 1.0 / (static_cast<double>(g.C) * static_cast<double>(g.P * g.P));
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  bool any_nan = false;
  for (int64_t j = 0; j < L; ++j) {
    const double e = buf.esum[j] * inv_pp;
    buf.esum[j] = e;
    any_nan |= std::isnan(e);
    lo = std::min(lo, e);
    hi = std::max(hi, e);
  }
  const double span = hi - lo + kEps;
  for (int64_t j = 0; j < L; ++j) {
    // torch.amin/amax propagate NaN, which turns the whole row to NaN.
    const double en = any_nan ? std::numeric_limits<double>::quiet_NaN() : (buf.esum[j] - lo) / span;
    out.edge[j] = static_cast<float>(en);
    buf.esum[j] = en;
  }

  // Step 2: keys and candidates. Keys stay in double so that the fp32 edge
  // carries no extra rounding into the order.
  for (int64_t j = 0; j < L; ++j) {
    double key = static_cast<double>(in.u[j]);
    if (prm.edge_weight != 0.0) key += prm.edge_weight * buf.esum[j];
    buf.key[j] = std::isnan(key) ? std::numeric_limits<double>::infinity() : key;
  }
  const double* key = buf.key.data();
  int64_t* idx = buf.idx.data();
  std::iota(idx, idx + L, int64_t{0});
  auto by_key = [key](int64_t a, int64_t c) { return key[a] < key[c] || (key[a] == key[c] && a < c); };
  std::partial_sort(idx, idx + k, idx + L, by_key);
  const int64_t* cand = out.cand;
  std::copy(idx, idx + k, out.cand);

  // Steps 3 and 4: similarity to the candidates, redundancy. Raw dot products
  // go to S (pixels) and Dt (tokens), k x Lp, and are scaled once all norms
  // are known, so a candidate's norm is the one its own row got in the sweep.
  float* r = out.red;
  if (k == 0) {
    std::fill(r, r + L, -kInf);
  } else {
    float* S = buf.S.data();
    const float** cp = buf.cptr.data();
    constexpr int R = sweep_rows<VW>();
    float q[R] = {};
    // The last sweep over this image's data streams from L2; meanwhile the next
    // image's rows come into L2 for its edge pass, a share per step.
    const bool last_is_tokens = prm.want_tokens;
    auto prefetch_next = [&](int64_t j0, int64_t nr) {
      if (!in.next_img) return;
      const int64_t rows = g.C * g.H;
      for (int64_t row = j0 * rows / L; row < (j0 + nr) * rows / L; ++row) {
        prefetch_l2(in.next_img + (row / g.H) * in.sc + (row % g.H) * in.sy, g.W);
      }
    };
    if (prm.want_pixels) {
      const int64_t dim = g.C * g.P * g.P, dpad = (dim + VW - 1) / VW * VW;
      float* invp = buf.invp.data();
      for (int64_t i = 0; i < k; ++i) {
        float* ci = buf.cbuf.data() + i * dpad;
        center_patch<VW>(in.img, in.sc, in.sy, g, cand[i], dim, dpad, ci);
        cp[i] = ci;
      }
      float* panel = buf.panel.data();
      pack_panel<VW>(cp, k, dpad, panel);
      const int64_t P = g.P;
      for_row_groups<R>(L, [&](auto rows, int64_t j0) PGS_INL_LAMBDA {
        constexpr int NR = decltype(rows)::value;
        if (!last_is_tokens) prefetch_next(j0, NR);
        if (patch_direct) {
          // Read in place: no copy of the patch, and the mean came with the edge pass.
          Patch<VW, NR> s;
          s.seg = buf.seg.data(), s.nseg = g.C * P, s.P = P;
          for (int r = 0; r < NR; ++r) {
            const int64_t j = j0 + r;
            s.base[r] = in.img + (j / g.gw) * P * in.sy + (j % g.gw) * P;
            s.v0[r] = s.base[r][0];
            s.mean[r] = buf.pmean[j];
          }
          sweep_dots<VW, NR>(s, panel, k, dpad, S, Lp, j0, q);
        } else {
          Contig<VW, NR> s;
          s.n = dpad;
          for (int r = 0; r < NR; ++r) {
            float* xr = buf.xr.data() + r * dpad;
            center_patch<VW>(in.img, in.sc, in.sy, g, j0 + r, dim, dpad, xr);
            s.x[r] = xr;
          }
          sweep_dots<VW, NR>(s, panel, k, dpad, S, Lp, j0, q);
        }
        for (int r = 0; r < NR; ++r) invp[j0 + r] = inverse_norm(q[r]);
      });
      const float w = static_cast<float>(1.0 - prm.token_weight);
      for (int64_t i = 0; i < k; ++i) {
        const float ci = invp[cand[i]];
        float* row = S + i * Lp;
        for (int64_t j = 0; j < L; ++j) row[j] = w * (ci * invp[j]) * row[j];
      }
    }
    if (prm.want_tokens) {
      const int64_t D = prm.D, Dpad = (D + VW - 1) / VW * VW;
      float* Dt = buf.Dt.data();
      float* invt = buf.invt.data();
      for (int64_t i = 0; i < k; ++i) cp[i] = in.tok + cand[i] * in.ld;
      float* panel = buf.panel.data();
      pack_panel<VW>(cp, k, D, panel);
      for_row_groups<R>(L, [&](auto rows, int64_t j0) PGS_INL_LAMBDA {
        constexpr int NR = decltype(rows)::value;
        prefetch_next(j0, NR);
        Contig<VW, NR> s;
        s.n = D;
        for (int r = 0; r < NR; ++r) s.x[r] = in.tok + (j0 + r) * in.ld;
        sweep_dots<VW, NR>(s, panel, k, Dpad, Dt, Lp, j0, q);
        for (int r = 0; r < NR; ++r) invt[j0 + r] = inverse_norm(q[r]);
      });
      const float a = prm.alpha;
      for (int64_t i = 0; i < k; ++i) {
        const float ci = invt[cand[i]];
        float* row = S + i * Lp;
        const float* drow = Dt + i * Lp;
        if (prm.want_pixels) {
          for (int64_t j = 0; j < L; ++j) row[j] = row[j] + a * (ci * invt[j]) * drow[j];
        } else {
          for (int64_t j = 0; j < L; ++j) row[j] = a * (ci * invt[j]) * drow[j];
        }
      }
    }
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = L; j < Lp; ++j) S[i * Lp + j] = 0.0f;
    }
    if (prm.use_ot) {
      sinkhorn_redundancy<VW>(S, k, L, Lp, prm.eps, prm.T, r, buf.ot.data());
    } else {
      max_redundancy(S, k, L, Lp, r);
    }
  }

  // Step 5: drop the first M in the order (tier, key, j).
  uint8_t* tier = buf.tier.data();
  for (int64_t j = 0; j < L; ++j) tier[j] = r[j] > prm.theta ? 1 : 2;
  for (int64_t i = 0; i < k; ++i) tier[cand[i]] = 0;
  const int64_t M = L - K;
  bool* mask_b = out.mask;
  std::fill(mask_b, mask_b + L, false);
  if (M > 0) {
    std::iota(idx, idx + L, int64_t{0});
    auto by_tier = [key, tier](int64_t a, int64_t c) {
      if (tier[a] != tier[c]) return tier[a] < tier[c];
      return key[a] < key[c] || (key[a] == key[c] && a < c);
    };
    if (M < L) std::nth_element(idx, idx + M, idx + L, by_tier);
    for (int64_t t = 0; t < M; ++t) mask_b[idx[t]] = true;
  }
  int64_t n = 0;
  for (int64_t j = 0; j < L; ++j) {
    if (!mask_b[j]) out.keep[n++] = j;
  }
}

// Entry points per instruction set; process_image and its helpers are inlined
// into each with that target.
using ProcessFn = void (*)(const Params&, const ImageIn&, const ImageOut&, Buffers&);

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target("arch=x86-64-v4"))) void process_v4(const Params& p, const ImageIn& i, const ImageOut& o,
                                                          Buffers& b) {
  process_image<16>(p, i, o, b);
}
__attribute__((target("arch=x86-64-v3"))) void process_v3(const Params& p, const ImageIn& i, const ImageOut& o,
                                                          Buffers& b) {
  process_image<8>(p, i, o, b);
}
#endif
void process_base(const Params& p, const ImageIn& i, const ImageOut& o, Buffers& b) {
  process_image<4>(p, i, o, b);
}

int vector_width() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return 16;
  if (__builtin_cpu_supports("x86-64-v3")) return 8;
#endif
  return 4;
}

ProcessFn pick_process() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  switch (vector_width()) {
    case 16: return process_v4;
    case 8: return process_v3;
    default: break;
  }
#endif
  return process_base;
}

// ---------------------------------------------------------------------------
// Input conversion: any dtype, any strides -> contiguous fp32.

template <typename T>
void copy_row_float(const T* src, int64_t stride, int64_t n, float* dst) {
  if (stride == 1) {
    for (int64_t t = 0; t < n; ++t) dst[t] = static_cast<float>(src[t]);
  } else {
    for (int64_t t = 0; t < n; ++t) dst[t] = static_cast<float>(src[t * stride]);
  }
}

template <typename F>
void with_float_type(at::ScalarType s, const F& f) {
  switch (s) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK_TYPE(false, "pgs_select: unsupported dtype ", s);
  }
}

// ---------------------------------------------------------------------------

bool is_float_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pgs_select_cpu(
    const at::Tensor& images, const std::optional<at::Tensor>& tokens_opt, const at::Tensor& noise_in,
    int64_t patch_size, int64_t num_keep, int64_t num_candidates, double sim_threshold,
    double token_weight, double edge_weight, bool use_ot, double ot_reg, int64_t ot_iters) {
  // torch.ops can be called directly, so check everything the Python layer does.
  TORCH_CHECK_VALUE(images.dim() == 4, "pgs_select: images must have shape (B, C, H, W), got ",
                    images.dim(), " dims ", images.sizes());
  TORCH_CHECK_VALUE(images.device().is_cpu(), "pgs_select (native): images must be a CPU tensor, got ",
                    images.device());
  TORCH_CHECK_TYPE(is_float_dtype(images.scalar_type()),
                   "pgs_select: images must be float16, bfloat16, float32 or float64, got ", images.scalar_type());
  TORCH_CHECK_VALUE(patch_size >= 1, "pgs_select: patch_size must be >= 1, got ", patch_size);
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t P = patch_size;
  TORCH_CHECK_VALUE(C >= 1, "pgs_select: images must have at least one channel, got C=", C);
  TORCH_CHECK_VALUE(H % P == 0, "pgs_select: images: H=", H, " is not divisible by patch_size=", P);
  TORCH_CHECK_VALUE(W % P == 0, "pgs_select: images: W=", W, " is not divisible by patch_size=", P);
  const int64_t gh = H / P, gw = W / P, L = gh * gw;
  TORCH_CHECK_VALUE(L >= 1, "pgs_select: images: H=", H, ", W=", W, " hold no ", P, "x", P, " patch");
  TORCH_CHECK_VALUE(noise_in.dim() == 2 && noise_in.size(0) == B && noise_in.size(1) == L,
                    "pgs_select: noise must have shape (B, L) = (", B, ", ", L, "), got ", noise_in.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(noise_in.scalar_type()), "pgs_select: noise must be floating point, got ",
                   noise_in.scalar_type());
  TORCH_CHECK_VALUE(noise_in.device().is_cpu(), "pgs_select (native): noise must be a CPU tensor, got ",
                    noise_in.device());
  TORCH_CHECK_VALUE(num_keep >= 0 && num_keep <= L, "pgs_select: num_keep must be in [0, L=", L, "], got ",
                    num_keep);
  TORCH_CHECK_VALUE(num_candidates >= 0 && num_candidates <= L, "pgs_select: num_candidates must be in [0, L=",
                    L, "], got ", num_candidates);
  TORCH_CHECK_VALUE(token_weight >= 0.0 && token_weight <= 1.0, "pgs_select: token_weight must be in [0, 1], got ",
                    token_weight);
  TORCH_CHECK_VALUE(edge_weight >= 0.0 && std::isfinite(edge_weight),
                    "pgs_select: edge_weight must be finite and >= 0, got ", edge_weight);
  TORCH_CHECK_VALUE(ot_reg > 0.0 && std::isfinite(ot_reg), "pgs_select: ot_reg must be finite and > 0, got ",
                    ot_reg);
  TORCH_CHECK_VALUE(ot_iters >= 1, "pgs_select: ot_iters must be >= 1, got ", ot_iters);
  TORCH_CHECK_VALUE(!std::isnan(sim_threshold), "pgs_select: sim_threshold must not be NaN");

  const bool want_tokens = token_weight > 0.0;
  at::Tensor tokens;
  int64_t D = 0;
  if (want_tokens) {
    TORCH_CHECK_VALUE(tokens_opt.has_value() && tokens_opt->defined(), "pgs_select: token_weight=",
                      token_weight, " > 0 needs tokens, got tokens=None");
    tokens = *tokens_opt;
    TORCH_CHECK_VALUE(tokens.dim() == 3 && tokens.size(0) == B && tokens.size(1) == L && tokens.size(2) >= 1,
                      "pgs_select: tokens must have shape (B, L, D) = (", B, ", ", L, ", D>=1), got ",
                      tokens.sizes());
    TORCH_CHECK_TYPE(is_float_dtype(tokens.scalar_type()), "pgs_select: tokens must be floating point, got ",
                     tokens.scalar_type());
    TORCH_CHECK_VALUE(tokens.device().is_cpu(), "pgs_select (native): tokens must be a CPU tensor, got ",
                      tokens.device());
    D = tokens.size(2);
  }

  const int64_t K = num_keep, k = num_candidates;
  const auto i64 = images.options().dtype(at::kLong);
  at::Tensor keep = at::empty({B, K}, i64);
  at::Tensor mask = at::empty({B, L}, images.options().dtype(at::kBool));
  at::Tensor edge = at::empty({B, L}, images.options().dtype(at::kFloat));
  at::Tensor cand = at::empty({B, k}, i64);
  at::Tensor red = at::empty({B, L}, images.options().dtype(at::kFloat));
  if (B == 0) return {keep, mask, edge, cand, red};

  // .to and .contiguous return the tensor itself when nothing is to be done.
  const at::Tensor noise = noise_in.to(at::kFloat).contiguous();
  Params prm{{C, H, W, P, gh, gw, L}, K, k, D, ot_iters, static_cast<float>(sim_threshold),
             static_cast<float>(token_weight), static_cast<float>(ot_reg),
             edge_weight, token_weight, use_ot, token_weight < 1.0, want_tokens};

  const float* u_all = noise.data_ptr<float>();
  int64_t* keep_all = keep.data_ptr<int64_t>();
  bool* mask_all = mask.data_ptr<bool>();
  float* edge_all = edge.data_ptr<float>();
  int64_t* cand_all = cand.data_ptr<int64_t>();
  float* red_all = red.data_ptr<float>();
  const int64_t ist[4] = {images.stride(0), images.stride(1), images.stride(2), images.stride(3)};
  // fp32 pixels with unit column stride and fp32 tokens with unit feature
  // stride are read where they lie; anything else is converted per image.
  const bool img_direct = images.scalar_type() == at::kFloat && ist[3] == 1;
  const bool tok_direct = want_tokens && tokens.scalar_type() == at::kFloat && tokens.stride(2) == 1;
  static const ProcessFn process = pick_process();

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    // Sized for the widest vectors (16 floats), whichever entry point runs.
    auto up16 = [](int64_t n) { return (n + 15) / 16 * 16; };
    const int64_t Lp = up16(L), kp = up16(k), dpad = up16(C * P * P);
    Buffers buf;
    if (!img_direct) buf.img.resize(C * H * W);
    if (want_tokens && !tok_direct) buf.Tk.resize(L * D);
    buf.S.resize(std::max<int64_t>(k * Lp, 1));
    if (want_tokens) buf.Dt.resize(std::max<int64_t>(k * Lp, 1));
    buf.sob.resize(4 * W + 6);
    buf.ot.resize(k * Lp + 3 * kp + 2 * Lp + 16);
    buf.invp.resize(L);
    buf.invt.resize(L);
    if (prm.want_pixels) {
      buf.xr.resize(2 * dpad);
      buf.cbuf.resize(std::max<int64_t>(k, 1) * dpad);
    }
    buf.panel.resize(std::max<int64_t>(k, 1) * std::max(dpad, up16(D)));
    buf.pmean.resize(L);
    buf.mvec.resize(gw * 16);
    buf.esum.resize(L);
    buf.key.resize(L);
    buf.idx.resize(L);
    buf.seg.resize(C * P);
    // Offsets of a patch's C P pixel rows from its first pixel, in the layout
    // the kernel reads (the tensor's own, or the converted copy's).
    const int64_t sc = img_direct ? ist[1] : H * W, sy = img_direct ? ist[2] : W;
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t row = 0; row < P; ++row) buf.seg[c * P + row] = c * sc + row * sy;
    }
    buf.cptr.resize(std::max<int64_t>(k, 1));
    buf.tier.resize(L);

    for (int64_t b = b0; b < b1; ++b) {
      ImageIn in{};
      if (img_direct) {
        in.img = images.const_data_ptr<float>() + b * ist[0];
        in.sc = sc;
        in.sy = sy;
      } else {
        with_float_type(images.scalar_type(), [&](auto zero) {
          using T = decltype(zero);
          const T* base = static_cast<const T*>(images.const_data_ptr()) + b * ist[0];
          for (int64_t c = 0; c < C; ++c) {
            for (int64_t y = 0; y < H; ++y) {
              copy_row_float(base + c * ist[1] + y * ist[2], ist[3], W, buf.img.data() + (c * H + y) * W);
            }
          }
        });
        in.img = buf.img.data();
        in.sc = sc;
        in.sy = sy;
      }
      if (tok_direct) {
        in.tok = tokens.const_data_ptr<float>() + b * tokens.stride(0);
        in.ld = tokens.stride(1);
      } else if (want_tokens) {
        with_float_type(tokens.scalar_type(), [&](auto zero) {
          using T = decltype(zero);
          const T* base = static_cast<const T*>(tokens.const_data_ptr()) + b * tokens.stride(0);
          for (int64_t j = 0; j < L; ++j) {
            copy_row_float(base + j * tokens.stride(1), tokens.stride(2), D, buf.Tk.data() + j * D);
          }
        });
        in.tok = buf.Tk.data();
        in.ld = D;
      }
      in.u = u_all + b * L;
      in.next_img = img_direct && b + 1 < b1 ? images.const_data_ptr<float>() + (b + 1) * ist[0] : nullptr;
      const ImageOut out{edge_all + b * L, cand_all + b * k, red_all + b * L, mask_all + b * L,
                         keep_all + b * K};
      process(prm, in, out, buf);
    }
  });
  return {keep, mask, edge, cand, red};
}

}  // namespace
}  // namespace pgs

// Must stay identical to pgs_kernels.op.SCHEMA (tests/test_native.py compares).
// The schema is defined once, in Python (pgs_kernels/op.py), before this
// module is imported; here only the CPU kernel is registered for it.
TORCH_LIBRARY_IMPL(pgs_kernels, CPU, m) { m.impl("pgs_select", &pgs::pgs_select_cpu); }

// The operator lives in the dispatcher; importing the Python module runs the
// registrations above. Its one function says which compiled variant the
// kernel dispatches to on this CPU, so that benchmarks can record it.
static PyObject* simd_width(PyObject*, PyObject*) { return PyLong_FromLong(pgs::vector_width()); }

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"simd_width", simd_width, METH_NOARGS,
       "Floats per vector of the kernel variant this CPU runs: 16 (AVX-512), 8 (AVX2+FMA), 4 (baseline)."},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods, nullptr, nullptr,
                                   nullptr, nullptr};
  return PyModule_Create(&def);
}
