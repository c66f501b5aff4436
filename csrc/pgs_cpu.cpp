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
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

// The hot loops get AVX-512 and AVX2+FMA clones next to the baseline one; the loader
// picks per machine, so one build serves every x86-64 CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define PGS_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PGS_HOT
#endif

namespace pgs {
namespace {

constexpr double kEps = 1e-6;
constexpr float kInf = std::numeric_limits<float>::infinity();

// exp for fp32 that gcc vectorizes (libm's expf is a call per element). Range
// reduction x = n ln2 + r with |r| <= ln2/2, degree-7 Taylor for e^r (error
// ~5e-9 relative, below fp32 rounding), 2^n built in the exponent bits.
// Saturates to 0 below -87 (glibc would give denormals down to -103, which
// never matter next to the terms they are summed with) and to +inf above 88.
static inline __attribute__((always_inline)) float fast_exp(float x) {
  const float hi = 88.0f, lo = -87.0f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;  // NaN passes through both
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  float p = 1.9841270e-4f;
  p = p * r + 1.3888889e-3f;
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  y = x < lo ? 0.0f : y;
  y = x > hi ? kInf : y;
  return y;
}

// torch.logsumexp's shift: the maximum, or 0 where the maximum is +-inf.
static inline float lse_shift(float m) { return std::isinf(m) ? 0.0f : m; }

// Sobel magnitude summed per patch (double sums, so the mean over P^2 pixels
// loses nothing). The Sobel is separable: V = up + 2 mid + down gives
// Gx(x) = V(x+1) - V(x-1); D = down - up gives Gy(x) = D(x-1) + 2 D(x) + D(x+1).
// A replicated border makes V and D replicate too, hence the padded rows.
PGS_HOT void sobel_patch_sums(const float* Y, int64_t H, int64_t W, int64_t P, int64_t gw,
                              double* esum, float* scratch) {
  float* V = scratch;          // W + 2
  float* D = scratch + W + 2;  // W + 2
  float* G = D + W + 2;        // W
  for (int64_t y = 0; y < H; ++y) {
    const float* up = Y + std::max<int64_t>(y - 1, 0) * W;
    const float* mid = Y + y * W;
    const float* dn = Y + std::min<int64_t>(y + 1, H - 1) * W;
    for (int64_t x = 0; x < W; ++x) {
      V[x + 1] = (up[x] + 2.0f * mid[x]) + dn[x];
      D[x + 1] = dn[x] - up[x];
    }
    V[0] = V[1];
    V[W + 1] = V[W];
    D[0] = D[1];
    D[W + 1] = D[W];
    for (int64_t x = 0; x < W; ++x) {
      const float gx = V[x + 2] - V[x];
      const float gy = (D[x] + 2.0f * D[x + 1]) + D[x + 2];
      G[x] = std::sqrt(gx * gx + gy * gy);
    }
    double* erow = esum + (y / P) * gw;
    for (int64_t pc = 0; pc < gw; ++pc) {
      const float* seg = G + pc * P;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t t = 0; t < P; ++t) s += seg[t];
      erow[pc] += s;
    }
  }
}

// Pixel rows: x <- x - mean(x) in place; inv[j] = 1 / (|x~_j| + 1e-6).
// The mean is taken as x_0 + mean(x - x_0): a constant patch then centers to
// exactly zero (zero similarity, as in the fp64 reference), and the shift
// keeps fp32 cancellation small for patches with a large offset.
PGS_HOT void center_rows(float* X, int64_t n, int64_t dim, float* inv) {
  for (int64_t j = 0; j < n; ++j) {
    float* v = X + j * dim;
    const float v0 = v[0];
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t t = 0; t < dim; ++t) s += v[t] - v0;
    const float mean = s / static_cast<float>(dim);
    float q = 0.0f;
#pragma omp simd reduction(+ : q)
    for (int64_t t = 0; t < dim; ++t) {
      const float c = (v[t] - v0) - mean;
      v[t] = c;
      q += c * c;
    }
    inv[j] = static_cast<float>(1.0 / (std::sqrt(static_cast<double>(q)) + kEps));
  }
}

// inv[j] = 1 / (|V_j| + 1e-6) for rows j of V (row stride ld).
PGS_HOT void inverse_norms(const float* V, int64_t ld, int64_t n, int64_t dim, float* inv) {
  for (int64_t j = 0; j < n; ++j) {
    const float* v = V + j * ld;
    float q = 0.0f;
#pragma omp simd reduction(+ : q)
    for (int64_t t = 0; t < dim; ++t) q += v[t] * v[t];
    inv[j] = static_cast<float>(1.0 / (std::sqrt(static_cast<double>(q)) + kEps));
  }
}

// Register tile: two rows V_j, V_j+1 against NB <= 5 candidates. Each step
// loads NB + 2 vectors for 2 NB independent FMAs; the 8 + 2 or 1 + 1 tilings
// are bound by loads or by the FMA latency instead.
#define PGS_DOTS_CASE(NB)                                                              \
  case NB: {                                                                           \
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, s4 = 0.f;                            \
    float t0 = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f, t4 = 0.f;                            \
    _Pragma("omp simd reduction(+ : s0, s1, s2, s3, s4, t0, t1, t2, t3, t4)")          \
    for (int64_t t = 0; t < dim; ++t) {                                                \
      const float x0t = x0[t], x1t = x1[t];                                            \
      if (NB > 0) { const float c = a[0][t]; s0 += c * x0t; t0 += c * x1t; }           \
      if (NB > 1) { const float c = a[1][t]; s1 += c * x0t; t1 += c * x1t; }           \
      if (NB > 2) { const float c = a[2][t]; s2 += c * x0t; t2 += c * x1t; }           \
      if (NB > 3) { const float c = a[3][t]; s3 += c * x0t; t3 += c * x1t; }           \
      if (NB > 4) { const float c = a[4][t]; s4 += c * x0t; t4 += c * x1t; }           \
    }                                                                                  \
    d0[0] = s0; d0[1] = s1; d0[2] = s2; d0[3] = s3; d0[4] = s4;                        \
    d1[0] = t0; d1[1] = t1; d1[2] = t2; d1[3] = t3; d1[4] = t4;                        \
    break;                                                                             \
  }

// S[i, j] (+)= w inv[cand_i] inv[j] <V_cand_i, V_j> for the k candidates and
// all L rows of V (row stride ld).
PGS_HOT void candidate_dots(const float* V, int64_t ld, int64_t L, int64_t dim, const float* inv,
                            const int64_t* cand, int64_t k, float w, bool accumulate, float* S) {
  // Candidate blocks of near-equal size (10 = 5 + 5, not 5 + 4 + 1).
  const int64_t nblocks = (k + 4) / 5;
  for (int64_t j = 0; j < L; j += 2) {
    const bool pair = j + 1 < L;
    const float* x0 = V + j * ld;
    const float* x1 = pair ? x0 + ld : x0;  // an odd last row is done twice, one result kept
    for (int64_t blk = 0, i0 = 0; blk < nblocks; ++blk) {
      const int nb = static_cast<int>(k / nblocks + (blk < k % nblocks ? 1 : 0));
      const float* a[5];
      for (int q = 0; q < 5; ++q) a[q] = V + cand[i0 + (q < nb ? q : 0)] * ld;
      float d0[5], d1[5];
      switch (nb) {
        PGS_DOTS_CASE(5)
        PGS_DOTS_CASE(4)
        PGS_DOTS_CASE(3)
        PGS_DOTS_CASE(2)
        PGS_DOTS_CASE(1)
        default: break;
      }
      for (int q = 0; q < nb; ++q) {
        const int64_t i = i0 + q;
        const float ci = inv[cand[i]];
        float* out = S + i * L + j;
        const float v0 = w * (ci * inv[j]) * d0[q];
        out[0] = accumulate ? out[0] + v0 : v0;
        if (pair) {
          const float v1 = w * (ci * inv[j + 1]) * d1[q];
          out[1] = accumulate ? out[1] + v1 : v1;
        }
      }
      i0 += nb;
    }
  }
}

// r_j = max_i S_ij, NaN propagating like torch.amax.
PGS_HOT void max_redundancy(const float* S, int64_t k, int64_t L, float* r) {
  for (int64_t j = 0; j < L; ++j) r[j] = -kInf;
  for (int64_t i = 0; i < k; ++i) {
    const float* row = S + i * L;
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) {
      const float v = row[j];
      const float m = r[j];
      r[j] = (v > m || v != v) ? v : m;
    }
  }
}

// Log-domain Sinkhorn (exactly T iterations, f then g) and r_j = L sum_i Pi_ij S_ij.
// work: k*L + 2*k + 3*L floats.
PGS_HOT void sinkhorn_redundancy(const float* S, int64_t k, int64_t L, float eps, int64_t T,
                                 float* r, float* work) {
  float* Z = work;
  float* f = Z + k * L;
  float* tmp = f + k;
  float* g = tmp + std::max(k, L);
  float* cm = g + L;
  float* cs = cm + L;
  const int64_t kl = k * L;
#pragma omp simd
  for (int64_t t = 0; t < kl; ++t) Z[t] = S[t] / eps;
  const float log_a = static_cast<float>(-std::log(static_cast<double>(k)));
  const float log_b = static_cast<float>(-std::log(static_cast<double>(L)));
  for (int64_t j = 0; j < L; ++j) g[j] = 0.0f;

  for (int64_t it = 0; it < T; ++it) {
    for (int64_t i = 0; i < k; ++i) {
      const float* z = Z + i * L;
      float m = -kInf;
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < L; ++j) m = std::max(m, z[j] + g[j]);
      const float sh = lse_shift(m);
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < L; ++j) s += fast_exp((z[j] + g[j]) - sh);
      f[i] = log_a - (sh + std::log(s));
    }
    for (int64_t j = 0; j < L; ++j) {
      cm[j] = -kInf;
      cs[j] = 0.0f;
    }
    for (int64_t i = 0; i < k; ++i) {
      const float* z = Z + i * L;
      const float fi = f[i];
#pragma omp simd
      for (int64_t j = 0; j < L; ++j) {
        const float v = z[j] + fi;
        cm[j] = v > cm[j] ? v : cm[j];
      }
    }
    for (int64_t j = 0; j < L; ++j) cm[j] = lse_shift(cm[j]);
    for (int64_t i = 0; i < k; ++i) {
      const float* z = Z + i * L;
      const float fi = f[i];
#pragma omp simd
      for (int64_t j = 0; j < L; ++j) cs[j] += fast_exp((z[j] + fi) - cm[j]);
    }
    for (int64_t j = 0; j < L; ++j) g[j] = log_b - (cm[j] + std::log(cs[j]));
  }

  for (int64_t j = 0; j < L; ++j) tmp[j] = 0.0f;
  for (int64_t i = 0; i < k; ++i) {
    const float* z = Z + i * L;
    const float* s = S + i * L;
    const float fi = f[i];
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) tmp[j] += fast_exp((z[j] + fi) + g[j]) * s[j];
  }
  const float Lf = static_cast<float>(L);
  for (int64_t j = 0; j < L; ++j) r[j] = Lf * tmp[j];
}

// ---------------------------------------------------------------------------
// Input conversion: any dtype, any strides -> contiguous fp32 work buffers.

struct Geometry {
  int64_t C, H, W, P, gh, gw, L;
};

template <typename T>
void copy_row_float(const T* src, int64_t stride, int64_t n, float* dst) {
  if (stride == 1) {
    for (int64_t t = 0; t < n; ++t) dst[t] = static_cast<float>(src[t]);
  } else {
    for (int64_t t = 0; t < n; ++t) dst[t] = static_cast<float>(src[t * stride]);
  }
}

// One strided row of n values as fp32: an fp32 row with unit stride is used
// where it lies, anything else is converted into buf.
template <typename T>
const float* row_as_float(const T* src, int64_t stride, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) return src;
  }
  copy_row_float(src, stride, n, buf);
  return buf;
}

// Writes Y (H x W, channel mean) and, when want_pixels, X (L x C P^2, patch
// j's pixels in (channel, row, column) order). rowbuf: W floats.
template <typename T>
void load_image(const T* base, const int64_t* st, const Geometry& g, bool want_pixels, float* X,
                float* Y, float* rowbuf) {
  const int64_t C = g.C, H = g.H, W = g.W, P = g.P, gw = g.gw, PP = P * P;
  const float Cf = static_cast<float>(C);
  // Row-major over y with the channels inside, so that the Y row being
  // summed stays in L1.
  for (int64_t y = 0; y < H; ++y) {
    float* yr = Y + y * W;
    for (int64_t c = 0; c < C; ++c) {
      const float* v = row_as_float(base + c * st[0] + y * st[1], st[2], W, rowbuf);
      if (c == 0) {
        std::memcpy(yr, v, sizeof(float) * W);
      } else {
        for (int64_t x = 0; x < W; ++x) yr[x] += v[x];
      }
      if (want_pixels) {
        float* dst = X + ((y / P) * gw * C + c) * PP + (y % P) * P;
        for (int64_t pc = 0; pc < gw; ++pc) std::memcpy(dst + pc * C * PP, v + pc * P, sizeof(float) * P);
      }
    }
    if (C > 1) {
      for (int64_t x = 0; x < W; ++x) yr[x] /= Cf;
    }
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

struct Params {
  Geometry g;
  int64_t K, k, D, T;
  float theta, alpha, w_e, eps;
  bool use_ot;
};

struct Buffers {
  std::vector<float> X, Y, Tk, S, sob, ot, inv;
  std::vector<double> esum, key;
  std::vector<int64_t> idx;
  std::vector<uint8_t> tier;
};

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

  const at::Tensor noise = noise_in.to(at::kFloat).contiguous();
  Params prm{{C, H, W, P, gh, gw, L}, K, k, D, ot_iters, static_cast<float>(sim_threshold),
             static_cast<float>(token_weight), static_cast<float>(edge_weight), static_cast<float>(ot_reg),
             use_ot};
  const bool want_pixels = token_weight < 1.0;

  const float* u_all = noise.data_ptr<float>();
  int64_t* keep_all = keep.data_ptr<int64_t>();
  bool* mask_all = mask.data_ptr<bool>();
  float* edge_all = edge.data_ptr<float>();
  int64_t* cand_all = cand.data_ptr<int64_t>();
  float* red_all = red.data_ptr<float>();
  const int64_t ist[4] = {images.stride(0), images.stride(1), images.stride(2), images.stride(3)};

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    Buffers buf;
    const int64_t dimp = C * P * P;
    buf.Y.resize(H * W);
    if (want_pixels) buf.X.resize(L * dimp);
    if (want_tokens) buf.Tk.resize(L * D);
    buf.S.resize(std::max<int64_t>(k * L, 1));
    buf.sob.resize(3 * W + 4);  // Sobel rows; also the row buffer of load_image
    buf.ot.resize(k * L + 2 * k + 4 * L + 4);
    buf.inv.resize(L);
    buf.esum.resize(L);
    buf.key.resize(L);
    buf.idx.resize(L);
    buf.tier.resize(L);

    for (int64_t b = b0; b < b1; ++b) {
      const Geometry& g = prm.g;
      with_float_type(images.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        const T* base = static_cast<const T*>(images.const_data_ptr()) + b * ist[0];
        load_image<T>(base, ist + 1, g, want_pixels, buf.X.data(), buf.Y.data(), buf.sob.data());
      });

      // Step 1: edge energy.
      std::fill(buf.esum.begin(), buf.esum.end(), 0.0);
      sobel_patch_sums(buf.Y.data(), H, W, P, gw, buf.esum.data(), buf.sob.data());
      const double inv_pp = 1.0 / static_cast<double>(P * P);
      double lo = std::numeric_limits<double>::infinity(), hi = -lo;
      bool any_nan = false;
      for (int64_t j = 0; j < L; ++j) {
        const double e = buf.esum[j] * inv_pp;
        buf.esum[j] = e;
        any_nan |= std::isnan(e);
        lo = std::min(lo, e);
        hi = std::max(hi, e);
      }
      float* edge_b = edge_all + b * L;
      const double span = hi - lo + kEps;
      for (int64_t j = 0; j < L; ++j) {
        // torch.amin/amax propagate NaN, which turns the whole row to NaN.
        const double en = any_nan ? std::numeric_limits<double>::quiet_NaN() : (buf.esum[j] - lo) / span;
        edge_b[j] = static_cast<float>(en);
        buf.esum[j] = en;
      }

      // Step 2: keys and candidates. Keys stay in double so that the fp32
      // edge carries no extra rounding into the order.
      const float* u = u_all + b * L;
      for (int64_t j = 0; j < L; ++j) {
        double key = static_cast<double>(u[j]);
        if (prm.w_e != 0.0f) key += static_cast<double>(edge_weight) * buf.esum[j];
        buf.key[j] = std::isnan(key) ? std::numeric_limits<double>::infinity() : key;
      }
      const double* key = buf.key.data();
      int64_t* idx = buf.idx.data();
      std::iota(idx, idx + L, int64_t{0});
      auto by_key = [key](int64_t a, int64_t c) { return key[a] < key[c] || (key[a] == key[c] && a < c); };
      std::partial_sort(idx, idx + k, idx + L, by_key);
      int64_t* cand_b = cand_all + b * k;
      std::copy(idx, idx + k, cand_b);

      // Steps 3 and 4: similarity to the candidates, redundancy.
      float* r = red_all + b * L;
      if (k == 0) {
        std::fill(r, r + L, -kInf);
      } else {
        float* S = buf.S.data();
        bool have = false;
        if (want_pixels) {
          center_rows(buf.X.data(), L, dimp, buf.inv.data());
          candidate_dots(buf.X.data(), dimp, L, dimp, buf.inv.data(), cand_b, k,
                         static_cast<float>(1.0 - token_weight), false, S);
          have = true;
        }
        if (want_tokens) {
          // fp32 tokens with unit stride are read where they lie.
          const float* Tv = nullptr;
          int64_t ld = D;
          if (tokens.scalar_type() == at::kFloat && tokens.stride(2) == 1) {
            Tv = tokens.const_data_ptr<float>() + b * tokens.stride(0);
            ld = tokens.stride(1);
          } else {
            with_float_type(tokens.scalar_type(), [&](auto zero) {
              using T = decltype(zero);
              const T* base = static_cast<const T*>(tokens.const_data_ptr()) + b * tokens.stride(0);
              for (int64_t j = 0; j < L; ++j) {
                copy_row_float(base + j * tokens.stride(1), tokens.stride(2), D, buf.Tk.data() + j * D);
              }
            });
            Tv = buf.Tk.data();
          }
          inverse_norms(Tv, ld, L, D, buf.inv.data());
          candidate_dots(Tv, ld, L, D, buf.inv.data(), cand_b, k, prm.alpha, have, S);
        }
        if (use_ot) {
          sinkhorn_redundancy(S, k, L, prm.eps, prm.T, r, buf.ot.data());
        } else {
          max_redundancy(S, k, L, r);
        }
      }

      // Step 5: drop the first M in the order (tier, key, j).
      uint8_t* tier = buf.tier.data();
      for (int64_t j = 0; j < L; ++j) tier[j] = r[j] > prm.theta ? 1 : 2;
      for (int64_t i = 0; i < k; ++i) tier[cand_b[i]] = 0;
      const int64_t M = L - K;
      bool* mask_b = mask_all + b * L;
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
      int64_t* keep_b = keep_all + b * K;
      int64_t n = 0;
      for (int64_t j = 0; j < L; ++j) {
        if (!mask_b[j]) keep_b[n++] = j;
      }
    }
  });
  return {keep, mask, edge, cand, red};
}

}  // namespace
}  // namespace pgs

// Must stay identical to pgs_kernels.op.SCHEMA (tests/test_native.py compares).
TORCH_LIBRARY(pgs_kernels, m) {
  m.def(
      "pgs_select(Tensor images, Tensor? tokens, Tensor noise, int patch_size, int num_keep, "
      "int num_candidates, float sim_threshold, float token_weight, float edge_weight, "
      "bool use_ot, float ot_reg, int ot_iters) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pgs_kernels, CPU, m) { m.impl("pgs_select", &pgs::pgs_select_cpu); }

// The operator lives in the dispatcher; the Python module only has to exist
// so that importing it runs the registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr,
                                   nullptr, nullptr};
  return PyModule_Create(&def);
}
