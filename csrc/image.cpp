// One image, steps 1 to 5; steps 2 (keys, candidates) and 5 (selection) are here.
//
//   ê_j     = (e_j - min_l e_l) / (max_l e_l - min_l e_l + 1e-6)
//   key_j   = u_j + w_e ê_j  (= u_j when w_e = 0);  NaN -> +inf
//   Cand    = the first k patches in the order (key_j, j), in that order
//   r_j     = -inf for every j when k = 0
//   tier_j  = 0 (candidate), 1 (r_j > theta; NaN is not), 2 (otherwise)
//   drop the first M patches in the order (tier_j, key_j, j); keep the rest.

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "pgs.h"

namespace pgs {

Kernels kernels_for(int width) {
  return Kernels{width, edge_pass_for(width), similarity_for(width), redundancy_for(width)};
}

void process_image(const Kernels& kn, const Params& prm, const ImageIn& in, const ImageOut& out,
                   const Workspace& ws_in) {
  const Geometry& g = prm.g;
  const int64_t L = g.L, k = prm.k, K = prm.K;
  const int64_t Lp = (L + kn.width - 1) / kn.width * kn.width;
  // Step timing (benchmarks only): t marks the end of the last step.
  const bool timed = step_timing();
  int64_t ns[kSteps] = {}, t = timed ? now_ns() : 0;
  Workspace ws = ws_in;
  ws.step_ns = timed ? ns : nullptr;
  auto lap = [&](Step s) {
    if (!timed) return;
    const int64_t now = now_ns();
    ns[s] += now - t;
    t = now;
  };

  // Step 1: edge energy, e_j = (Sobel sum over patch j) / P^2.
  const bool patch_direct = prm.want_pixels && k > 0 && g.P % kn.width == 0;
  kn.edge_pass(g, in, ws, patch_direct);
  lap(kEdge);
  const double inv_count = 1.0 / static_cast<double>(g.P * g.P);
  const double* sobel_sum = ws.sobel_sum;
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  bool any_nan = false;
  for (int64_t j = 0; j < L; ++j) {
    const double e = sobel_sum[j] * inv_count;
    any_nan |= std::isnan(e);
    lo = std::min(lo, e);
    hi = std::max(hi, e);
  }
  const double span = hi - lo + kEps;

  // Step 2: keys and candidates. Keys stay in double so that the fp32 edge
  // carries no extra rounding into the order.
  double* key = ws.key;
  for (int64_t j = 0; j < L; ++j) {
    // torch.amin/amax propagate NaN, which turns the whole row to NaN.
    const double edge =
        any_nan ? std::numeric_limits<double>::quiet_NaN() : (sobel_sum[j] * inv_count - lo) / span;
    out.edge[j] = static_cast<float>(edge);
    double key_j = static_cast<double>(in.noise[j]);
    if (prm.edge_weight != 0.0) key_j += prm.edge_weight * edge;
    key[j] = std::isnan(key_j) ? std::numeric_limits<double>::infinity() : key_j;
  }
  lap(kStats);
  int64_t* order = ws.order;
  std::iota(order, order + L, int64_t{0});
  auto by_key = [key](int64_t a, int64_t c) { return key[a] < key[c] || (key[a] == key[c] && a < c); };
  std::partial_sort(order, order + k, order + L, by_key);
  std::copy(order, order + k, out.cand);
  const int64_t* cand = out.cand;
  lap(kOrder);

  // Steps 3 and 4: similarity to the candidates, redundancy.
  float* r = out.red;
  if (k == 0) {
    std::fill(r, r + L, -std::numeric_limits<float>::infinity());
  } else {
    kn.similarity(prm, in, cand, patch_direct, ws, Lp);
    lap(kSimilarity);
    kn.redundancy(ws.sim, k, L, Lp, prm.use_ot, prm.eps, prm.T, ws.sinkhorn_work, r);
  }
  lap(kSinkhorn);

  // Step 5: drop the first M in the order (tier, key, j).
  uint8_t* tier = ws.tier;
  for (int64_t j = 0; j < L; ++j) tier[j] = r[j] > prm.theta ? 1 : 2;
  for (int64_t i = 0; i < k; ++i) tier[cand[i]] = 0;
  const int64_t M = L - K;
  std::fill(out.mask, out.mask + L, false);
  if (M > 0) {
    std::iota(order, order + L, int64_t{0});
    auto by_tier = [key, tier](int64_t a, int64_t c) {
      if (tier[a] != tier[c]) return tier[a] < tier[c];
      return key[a] < key[c] || (key[a] == key[c] && a < c);
    };
    if (M < L) std::nth_element(order, order + M, order + L, by_tier);
    for (int64_t t = 0; t < M; ++t) out.mask[order[t]] = true;
  }
  int64_t n = 0;
  for (int64_t j = 0; j < L; ++j) {
    if (!out.mask[j]) out.keep[n++] = j;
  }
  lap(kSelect);
  if (timed) add_step_ns(ns);
}

}  // namespace pgs
