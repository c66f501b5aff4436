// Vector math of the native kernel: GCC vector types of VW floats and the few
// functions on them that the steps need (loads, horizontal sums, exp, log).
//
// Each step is written once as a template over VW and compiled into one entry
// point per instruction set (16 floats: AVX-512, 8: AVX2+FMA, 4: baseline
// SSE2) through target attributes; everything here is forced inline, so it
// takes the target of the entry point that calls it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// Target attributes and the CPU checks behind them are GCC's, on x86-64;
// elsewhere only the baseline variant is built.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PGS_X86_VARIANTS 1
#define PGS_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define PGS_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define PGS_X86_VARIANTS 0
#endif

#define PGS_INL inline __attribute__((always_inline))
#define PGS_INL_LAMBDA __attribute__((always_inline))

namespace pgs {

constexpr float kInf = std::numeric_limits<float>::infinity();

template <int VW>
struct VT {
  typedef float F __attribute__((vector_size(VW * sizeof(float))));
  typedef int32_t I __attribute__((vector_size(VW * sizeof(float))));
  typedef double D __attribute__((vector_size(VW * sizeof(double))));  // VW doubles
  typedef uint16_t H __attribute__((vector_size(VW * sizeof(uint16_t))));  // VW bf16 (their bits)
};

// Unaligned vector load and store of floats or doubles (memcpy: no
// alignment or aliasing assumption, one vector move after optimisation).
template <class V, class T>
PGS_INL V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class V, class T>
PGS_INL void vstore(T* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

// bf16 to fp32, exactly: the 16 bits become the upper half of the float.
PGS_INL float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// VW floats from p (fp32, or bf16 widened in registers).
template <int VW>
PGS_INL typename VT<VW>::F load_as_float(const float* p) {
  return vload<typename VT<VW>::F>(p);
}
template <int VW>
PGS_INL typename VT<VW>::F load_as_float(const uint16_t* p) {
  using I = typename VT<VW>::I;
  const I wide = __builtin_convertvector(vload<typename VT<VW>::H>(p), I) << 16;
  return (typename VT<VW>::F)wide;
}
PGS_INL float to_float(float v) { return v; }
PGS_INL float to_float(uint16_t b) { return bf16_to_float(b); }

// n rounded up to a multiple of VW.
template <int VW>
PGS_INL int64_t round_up(int64_t n) {
  return (n + VW - 1) / VW * VW;
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
  typename VT<VW>::I lane;
  for (int l = 0; l < VW; ++l) lane[l] = l;
  return lane < static_cast<int32_t>(n);
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

}  // namespace pgs
