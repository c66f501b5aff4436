// Step 1, the edge pass: per patch, the sum of the Sobel magnitude of the
// channel mean (image.cpp turns the sums into ê), and, for the similarity
// sweep, each patch's mean offset from its first pixel.
//
//   Y      = mean_c images[c]                                  (H x W)
//   Gx, Gy = 3x3 Sobel of Y, replicated border;  G = sqrt(Gx^2 + Gy^2)
//   e_j    = mean of G over patch j

#include <algorithm>

#include "pgs.h"
#include "simd.h"

namespace pgs {
namespace {

// Channel mean of image row y: the channel sum (c = 0 first) times 1/C. The
// mean rather than the sum keeps the Sobel within fp32 for pixels C times
// larger (the sum's gradient would square to inf from |pixel| ~ 1e18 / C).
template <int VW>
PGS_INL void mean_row(const ImageIn& in, const Geometry& g, float inv_c, int64_t y, float* __restrict dst) {
  using F = typename VT<VW>::F;
  const int64_t W = g.W, nv = W / VW * VW, sc = in.channel_stride;
  const float* src = in.pixels + y * in.row_stride;
  if (g.C == 1) {
    std::copy(src, src + W, dst);
    return;
  }
  if (g.C == 3) {
    const float *s1 = src + sc, *s2 = src + 2 * sc;
    for (int64_t x = 0; x < nv; x += VW) {
      vstore(dst + x, ((vload<F>(src + x) + vload<F>(s1 + x)) + vload<F>(s2 + x)) * inv_c);
    }
    for (int64_t x = nv; x < W; ++x) dst[x] = ((src[x] + s1[x]) + s2[x]) * inv_c;
    return;
  }
  for (int64_t x = 0; x < nv; x += VW) vstore(dst + x, vload<F>(src + x));
  for (int64_t x = nv; x < W; ++x) dst[x] = src[x];
  for (int64_t c = 1; c + 1 < g.C; ++c) {
    const float* s = src + c * sc;
    for (int64_t x = 0; x < nv; x += VW) vstore(dst + x, vload<F>(dst + x) + vload<F>(s + x));
    for (int64_t x = nv; x < W; ++x) dst[x] += s[x];
  }
  const float* s = src + (g.C - 1) * sc;
  for (int64_t x = 0; x < nv; x += VW) vstore(dst + x, (vload<F>(dst + x) + vload<F>(s + x)) * inv_c);
  for (int64_t x = nv; x < W; ++x) dst[x] = (dst[x] + s[x]) * inv_c;
}

// v0's channel mean, computed as mean_row computes a pixel's: a constant
// patch's row mean minus this is exactly zero.
PGS_INL float mean_of_equal(float v0, int64_t C, float inv_c) {
  if (C == 1) return v0;
  float sum = v0;
  for (int64_t c = 1; c < C; ++c) sum += v0;
  return sum * inv_c;
}

// Sobel magnitude of the channel mean, summed per patch. The channel-mean rows
// live in a ring of three, so the image is read once and no mean image is
// stored. The Sobel is separable: V = up + 2 mid + down gives
// Gx(x) = V(x+1) - V(x-1); D = down - up gives Gy(x) = D(x-1) + 2 D(x) + D(x+1);
// both come from the three ring rows in one loop. Each ring row has one
// replicated element on either side (the replicated border in x; in y it is
// the choice of rows). G is summed over the P rows of a patch row per column
// in fp32, then over the P columns of a patch in double.
template <int VW>
PGS_INL void edge_pass(const Geometry& g, const ImageIn& in, const Workspace& ws, bool patch_means) {
  using F = typename VT<VW>::F;
  const int64_t H = g.H, W = g.W, P = g.P, gw = g.gw, nv = W / VW * VW;
  const int64_t rs = W + 2;  // ring row stride
  float* ring = ws.mean_rows;
  const float inv_c = static_cast<float>(1.0 / static_cast<double>(g.C));
  float* __restrict band = ws.band_sobel;
  auto fill = [&](int64_t y) {
    float* row = ring + (y % 3) * rs;
    mean_row<VW>(in, g, inv_c, y, row + 1);
    row[0] = row[1];
    row[W + 1] = row[W];
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
      vstore(band + x, first ? gm : vload<F>(band + x) + gm);
    }
    for (int64_t x = nv; x < W; ++x) {
      const float gx = ((up[x + 2] + 2.0f * mid[x + 2]) + dn[x + 2]) - ((up[x] + 2.0f * mid[x]) + dn[x]);
      const float gy = ((dn[x] - up[x]) + 2.0f * (dn[x + 1] - up[x + 1])) + (dn[x + 2] - up[x + 2]);
      const float gm = std::sqrt(gx * gx + gy * gy);
      band[x] = first ? gm : band[x] + gm;
    }
    // With patch_means (P % VW == 0): mean(x_j - v0_j) of every patch j, for
    // the similarity sweep's centering, while the row is in L1; v0_j is the
    // patch's first pixel (channel 0). One vector per patch column
    // accumulates over the band's rows.
    if (patch_means) {
      // mean_c (x_c - v0) = (channel mean) - v0, from the ring row already at
      // hand instead of C image rows; v0's mean is taken as the ring's are,
      // so a constant patch still gives exactly zero.
      const float* v0_row = in.pixels + (y / P) * P * in.row_stride;
      float* sums = ws.shifted_sums;
      if (first) std::fill(sums, sums + gw * VW, 0.0f);
      const float* ymean = mid + 1;
      for (int64_t pc = 0; pc < gw; ++pc) {
        const float v0_mean = mean_of_equal(v0_row[pc * P], g.C, inv_c);
        F a = vload<F>(sums + pc * VW);
        for (int64_t t = 0; t < P; t += VW) a += vload<F>(ymean + pc * P + t) - v0_mean;
        vstore(sums + pc * VW, a);
      }
      if (y % P == P - 1) {
        const float dim = static_cast<float>(P * P);
        for (int64_t pc = 0; pc < gw; ++pc) {
          ws.patch_mean[(y / P) * gw + pc] = hsum<VW>(vload<F>(sums + pc * VW)) / dim;
        }
      }
    }
    if (y % P == P - 1) {
      double* sobel_row = ws.sobel_sum + (y / P) * gw;
      for (int64_t pc = 0; pc < gw; ++pc) {
        double s = 0.0;
        for (int64_t t = 0; t < P; ++t) s += static_cast<double>(band[pc * P + t]);
        sobel_row[pc] = s;
      }
    }
  }
}

#if PGS_X86_VARIANTS
PGS_TARGET_AVX512 void edge_pass_avx512(const Geometry& g, const ImageIn& in, const Workspace& ws, bool pm) {
  edge_pass<16>(g, in, ws, pm);
}
PGS_TARGET_AVX2 void edge_pass_avx2(const Geometry& g, const ImageIn& in, const Workspace& ws, bool pm) {
  edge_pass<8>(g, in, ws, pm);
}
#endif
void edge_pass_base(const Geometry& g, const ImageIn& in, const Workspace& ws, bool pm) {
  edge_pass<4>(g, in, ws, pm);
}

}  // namespace

EdgePassFn edge_pass_for(int width) {
#if PGS_X86_VARIANTS
  if (width == 16) return edge_pass_avx512;
  if (width == 8) return edge_pass_avx2;
#endif
  return edge_pass_base;
}

}  // namespace pgs
