// Step 4, the redundancy of every patch with respect to the candidates.
//
//   Z = S / eps;  g = 0;  T times:
//       f_i = -log k - logsumexp_j (Z_ij + g_j)
//       g_j = -log L - logsumexp_i (Z_ij + f_i)
//   (run as the equivalent scaling iteration, K = exp(Z - rowmax), wherever
//   fp32 holds all its numbers; see sinkhorn_scaling)
//   r_j = L sum_i exp(Z_ij + f_i + g_j) S_ij     (use_ot)
//       = max_i S_ij                               (no OT)
//
// logsumexp follows torch.logsumexp: the shift is the maximum unless that is
// +-inf, in which case it is 0, so an all -inf slice gives -inf and NaN
// propagates.

#include <algorithm>

#include "pgs.h"
#include "simd.h"

namespace pgs {
namespace {

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
//   c_i = max_j Z_ij,  E_ij = exp(Z_ij - c_i),  U_i = exp(f_i + c_i),  V_j = exp(g_j)
// the f step f_i = log_a - logsumexp_j (Z_ij + g_j) is U_i = (1/k) / sum_j E_ij V_j,
// the g step is V_j = (1/L) / sum_i E_ij U_i, and Pi_ij = E_ij U_i V_j, so
// r_j = L V_j sum_i E_ij U_i S_ij. A mat-vec per half step instead of k L exp
// and log, which is most of the kernel's arithmetic otherwise. It is taken
// only where fp32 holds every quantity as a normal number: S finite, every
// E_ij >= e^-80 (Z_ij - c_i >= -80) and every sum in [1e-30, 1e30]. Else it
// returns false before writing r, and the log-domain loop below runs (small
// eps, NaN inputs). work: k*Lp + kp + Lp floats.
template <int VW>
PGS_INL bool sinkhorn_scaling(const float* S, int64_t k, int64_t L, int64_t Lp, float eps, int64_t T, float* r,
                              float* work) {
  using F = typename VT<VW>::F;
  using I = typename VT<VW>::I;
  const int64_t kp = round_up<VW>(k);
  float* E = work;        // k x Lp
  float* U = E + k * Lp;  // kp
  float* V = U + kp;      // Lp
  const auto last = lanes_below<VW>(L - (Lp - VW));  // valid lanes of the last vector
  for (int64_t i = 0; i < k; ++i) {
    const float* s_row = S + i * Lp;
    float* e_row = E + i * Lp;
    float c = -kInf, lo = kInf;
    for (int64_t j = 0; j < L; ++j) {
      const float z = s_row[j] / eps;
      if (!std::isfinite(z)) return false;
      e_row[j] = z;
      c = std::max(c, z);
      lo = std::min(lo, z);
    }
    if (lo - c < -80.0f) return false;
    for (int64_t j = 0; j < Lp; j += VW) {
      const F e = vexp<VW>(vload<F>(e_row + j) - c);
      vstore(e_row + j, j + VW < Lp ? e : (last ? e : F{}));
    }
  }
  for (int64_t j = 0; j < Lp; ++j) V[j] = j < L ? 1.0f : 0.0f;
  const float a = static_cast<float>(1.0 / static_cast<double>(k));
  const float b = static_cast<float>(1.0 / static_cast<double>(L));
  const F lo_ok = F{} + 1e-30f, hi_ok = F{} + 1e30f;
  I bad{};
  for (int64_t it = 0; it < T; ++it) {
    for (int64_t i = 0; i < k; ++i) {
      const float* e_row = E + i * Lp;
      F s0{}, s1{};
      int64_t j = 0;
      for (; j + 2 * VW <= Lp; j += 2 * VW) {
        s0 += vload<F>(e_row + j) * vload<F>(V + j);
        s1 += vload<F>(e_row + j + VW) * vload<F>(V + j + VW);
      }
      if (j < Lp) s0 += vload<F>(e_row + j) * vload<F>(V + j);
      const float s = hsum<VW>(s0 + s1);
      if (!(s >= 1e-30f && s <= 1e30f)) return false;
      U[i] = a / s;
    }
    for (int64_t j = 0; j < Lp; j += VW) {
      F s{};
      for (int64_t i = 0; i < k; ++i) s += vload<F>(E + i * Lp + j) * U[i];
      const auto valid = j + VW < Lp ? (I{} - 1) : last;
      bad |= valid & ~((s >= lo_ok) & (s <= hi_ok));
      vstore(V + j, valid ? b / s : F{});
    }
    bool any = false;
    for (int l = 0; l < VW; ++l) any |= bad[l] != 0;
    if (any) return false;
  }
  const float Lf = static_cast<float>(L);
  for (int64_t j = 0; j < Lp; j += VW) {
    F acc{};
    for (int64_t i = 0; i < k; ++i) acc += (vload<F>(E + i * Lp + j) * U[i]) * vload<F>(S + i * Lp + j);
    const F rv = (acc * vload<F>(V + j)) * Lf;
    if (j + VW <= L) {
      vstore(r + j, rv);
    } else {
      for (int64_t l = 0; j + l < L; ++l) r[j + l] = rv[l];
    }
  }
  return true;
}

// Log-domain Sinkhorn (exactly T iterations, f then g) and r_j = L sum_i Pi_ij S_ij.
// f and g grow like 1/eps (1e4 at eps = 1e-4): held in fp32 they would be
// rounded by ~1e-3 in every iteration, which over hundreds of iterations moves
// r by 1e-3. So they are held in double, and every iteration forms the log
// plan LP_ij = Z_ij + f_i + g_j afresh in double, rounded to fp32 only once
// it is small where it carries mass (O(log kL)); the logsumexp runs on LP in
// fp32, and the g step sees the f step's change added to LP in fp32:
//   f step: f_i += log_a - logsumexp_j LP_ij      (from f = g = 0)
//   g step: g_j += log_b - logsumexp_i LP_ij
// S: k x Lp (Lp a multiple of VW, padding zero). Z's padding is -inf, so it
// adds nothing to the f sums; g's padding is held at 0 so that -inf + g stays
// -inf. work: 2 k Lp + 5 kp + 3 Lp floats, kp = k rounded up to VW, 64-byte
// aligned.
template <int VW>
PGS_INL void sinkhorn_log_domain(const float* S, int64_t k, int64_t L, int64_t Lp, float eps, int64_t T,
                                 float* r, float* work) {
  using F = typename VT<VW>::F;
  using I = typename VT<VW>::I;
  using D = typename VT<VW>::D;
  const int64_t kp = round_up<VW>(k);
  double* f = reinterpret_cast<double*>(work);  // kp
  double* g = f + kp;                           // Lp
  float* Z = reinterpret_cast<float*>(g + Lp);  // k x Lp
  float* LP = Z + k * Lp;                       // k x Lp
  float* row_sum = LP + k * Lp;                 // kp: per row, sum of exp(LP - shift)
  float* row_shift = row_sum + kp;              // kp
  float* row_step = row_shift + kp;             // kp: the f step's change of f_i
  float* col_r = row_step + kp;                 // Lp
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < L; ++j) Z[i * Lp + j] = S[i * Lp + j] / eps;
    for (int64_t j = L; j < Lp; ++j) Z[i * Lp + j] = -kInf;
  }
  const float log_a = static_cast<float>(-std::log(static_cast<double>(k)));
  const float log_b = static_cast<float>(-std::log(static_cast<double>(L)));
  std::fill(f, f + kp, 0.0);
  std::fill(g, g + Lp, 0.0);
  for (int64_t i = k; i < kp; ++i) row_sum[i] = 1.0f, row_shift[i] = 0.0f;
  const auto last = lanes_below<VW>(L - (Lp - VW));  // valid lanes of the last vector
  // LP_ij for the VW columns from j on, stored; the f_i + g_j are added in double.
  auto log_plan = [&](int64_t i, int64_t j) PGS_INL_LAMBDA {
    const D fg = vload<D>(g + j) + f[i];
    const F lp = __builtin_convertvector(__builtin_convertvector(vload<F>(Z + i * Lp + j), D) + fg, F);
    vstore(LP + i * Lp + j, lp);
    return lp;
  };

  for (int64_t it = 0; it < T; ++it) {
    // f_i += log_a - logsumexp_j LP_ij
    for (int64_t i = 0; i < k; ++i) {
      const float* row = LP + i * Lp;
      F mv = F{} - kInf;
      for (int64_t j = 0; j < Lp; j += VW) {
        const F v = log_plan(i, j);
        mv = mv < v ? v : mv;
      }
      float m = -kInf;
      for (int l = 0; l < VW; ++l) m = m < mv[l] ? mv[l] : m;
      const float sh = std::isinf(m) ? 0.0f : m;
      F sv{};
      for (int64_t j = 0; j < Lp; j += VW) sv += vexp<VW>(vload<F>(row + j) - sh);
      row_sum[i] = hsum<VW>(sv);
      row_shift[i] = sh;
    }
    for (int64_t i = 0; i < kp; i += VW) {
      const F step = log_a - (vload<F>(row_shift + i) + vlog<VW>(vload<F>(row_sum + i)));
      vstore(row_step + i, step);
      for (int l = 0; l < VW && i + l < k; ++l) f[i + l] += static_cast<double>(step[l]);
    }
    // g_j += log_b - logsumexp_i LP_ij
    for (int64_t j = 0; j < Lp; j += VW) {
      F m = F{} - kInf;
      for (int64_t i = 0; i < k; ++i) {
        const F v = vload<F>(LP + i * Lp + j) + row_step[i];
        vstore(LP + i * Lp + j, v);
        m = v > m ? v : m;
      }
      m = vshift<VW>(m);
      F s{};
      for (int64_t i = 0; i < k; ++i) s += vexp<VW>(vload<F>(LP + i * Lp + j) - m);
      const auto valid = j + VW < Lp ? (I{} - 1) : last;
      const F step = valid ? log_b - (m + vlog<VW>(s)) : F{};
      vstore(g + j, vload<D>(g + j) + __builtin_convertvector(step, D));
    }
  }

  // After the g step L sum_i Pi_ij = 1, so r_j = sum_i Pi_ij S_ij / sum_i Pi_ij;
  // dividing by the column's mass as computed cancels the rounding its
  // entries share.
  for (int64_t j = 0; j < Lp; j += VW) {
    F acc{}, mass{};
    for (int64_t i = 0; i < k; ++i) {
      const F p = vexp<VW>(log_plan(i, j));
      acc += p * vload<F>(S + i * Lp + j);
      mass += p;
    }
    vstore(col_r + j, acc / mass);
  }
  for (int64_t j = 0; j < L; ++j) r[j] = col_r[j];
}

// r_j = L sum_i Pi_ij S_ij after T Sinkhorn iterations: the scaling form where
// fp32 holds it, else the log domain.
template <int VW>
PGS_INL void sinkhorn_redundancy(const float* S, int64_t k, int64_t L, int64_t Lp, float eps, int64_t T,
                                 float* r, float* work) {
  if (sinkhorn_scaling<VW>(S, k, L, Lp, eps, T, r, work)) return;
  sinkhorn_log_domain<VW>(S, k, L, Lp, eps, T, r, work);
}

template <int VW>
PGS_INL void redundancy(const float* S, int64_t k, int64_t L, int64_t Lp, bool use_ot, float eps, int64_t T,
                        float* work, float* r) {
  if (use_ot) {
    sinkhorn_redundancy<VW>(S, k, L, Lp, eps, T, r, work);
  } else {
    max_redundancy(S, k, L, Lp, r);
  }
}

#if PGS_X86_VARIANTS
PGS_TARGET_AVX512 void redundancy_avx512(const float* S, int64_t k, int64_t L, int64_t Lp, bool use_ot, float eps,
                                         int64_t T, float* work, float* r) {
  redundancy<16>(S, k, L, Lp, use_ot, eps, T, work, r);
}
PGS_TARGET_AVX2 void redundancy_avx2(const float* S, int64_t k, int64_t L, int64_t Lp, bool use_ot, float eps,
                                     int64_t T, float* work, float* r) {
  redundancy<8>(S, k, L, Lp, use_ot, eps, T, work, r);
}
#endif
void redundancy_base(const float* S, int64_t k, int64_t L, int64_t Lp, bool use_ot, float eps, int64_t T,
                     float* work, float* r) {
  redundancy<4>(S, k, L, Lp, use_ot, eps, T, work, r);
}

}  // namespace

RedundancyFn redundancy_for(int width) {
#if PGS_X86_VARIANTS
  if (width == 16) return redundancy_avx512;
  if (width == 8) return redundancy_avx2;
#endif
  return redundancy_base;
}

}  // namespace pgs
