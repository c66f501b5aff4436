// Declarations shared by the files of the native CPU kernel of
// pgs_kernels::pgs_select (the contract: docs/algorithm.md; the oracle:
// python_ref.pgs.pgs_select_core).
//
// Symbols (docs/algorithm.md): B images of C x H x W, patch size P, grid gh x gw,
// L = gh gw patches, K kept, M = L - K dropped, k candidates, D token
// features, u noise, w_e edge weight, alpha token weight, eps = ot_reg,
// T = ot_iters, theta = sim_threshold.
//
// One image at a time (image.cpp), images spread over threads (op.cpp):
//   step 1, edge.cpp        Sobel energy of every patch
//   steps 2, 5, image.cpp   keys and candidates; tiers and the selection
//   step 3, similarity.cpp  S_ij, candidate i against every patch j
//   step 4, sinkhorn.cpp    redundancy r_j from S
// Steps 1, 3 and 4 are compiled once per vector width (simd.h); kernels_for
// picks one width for all three.
#pragma once

#include <cstdint>

namespace pgs {

constexpr double kEps = 1e-6;  // the contract's guard in norms and in the min-max
constexpr int kMaxWidth = 16;  // floats per vector of the widest variant

struct Geometry {
  int64_t C, H, W, P, gh, gw, L;
};

struct Params {
  Geometry g;
  int64_t K, k, D, T;
  float theta, alpha, one_minus_alpha, eps;
  double edge_weight;
  bool use_ot, want_pixels, want_tokens;  // want_pixels: alpha < 1; want_tokens: alpha > 0
};

// One image's inputs: fp32 pixels with unit column stride, fp32 or bf16
// tokens with unit feature stride (anything else is converted before).
struct ImageIn {
  const float* pixels;
  int64_t channel_stride, row_stride;
  const float* tokens;          // fp32 tokens, or null when tokens_bf16 is set
  const uint16_t* tokens_bf16;  // bf16 tokens (the bits), read in place and widened in registers
  int64_t token_stride;  // between the tokens of two patches
  const float* noise;
  const float* next_pixels;  // the next image of this thread's range (read in place), or null
};

struct ImageOut {
  float* edge;
  int64_t* cand;
  float* red;
  bool* mask;
  int64_t* keep;
};

// Per-thread work space (op.cpp sizes it, for the widest variant). Lp is L
// rounded up to the running variant's vector width, dpad likewise C P^2.
struct Workspace {
  // Step 1.
  float* mean_rows;       // 3 (W + 2): ring of channel-mean rows, one replicated pixel either side
  float* band_sobel;      // W: G summed per column over the pixel rows of one patch row
  float* shifted_sums;    // gw kMaxWidth: per patch column of a band, lane sums of x - v0_j
  float* patch_mean;      // L: mean(x_j - v0_j), v0_j the patch's first pixel
  double* sobel_sum;      // L: G summed over patch j
  // Steps 2 and 5.
  double* key;            // L
  int64_t* order;         // L: patch indices, partly sorted
  uint8_t* tier;          // L
  // Step 3.
  int64_t* row_offsets;   // C P: offset of each pixel row of a patch from its first pixel
  const float** cand_vectors;  // k: the candidates' centered pixels, then their tokens
  const uint16_t** cand_bf16;  // k: the candidates' bf16 tokens
  float* centered_cands;  // k dpad
  float* centered_rows;   // 2 dpad: the patches of one sweep, centered, when not read in place
  float* panel;           // k max(dpad, D rounded up): candidate vectors packed for a sweep
  float* pixel_dots;      // k Lp: <x~_i, x~_j>
  float* token_dots;      // k Lp: <t_i, t_j>
  float* inv_pixel_norm;  // L: 1 / (|x~_j| + 1e-6)
  float* inv_token_norm;  // L: 1 / (|t_j| + 1e-6)
  float* sim;             // k Lp: S, zero past L
  // Step 4.
  float* sinkhorn_work;   // 2 k Lp + 5 kp + 3 Lp floats, kp = k rounded up
  // Step timing (benchmarks): kSteps counters of this image, or null.
  int64_t* step_ns;
};

// Step 1: ws.sobel_sum[j] = sum over patch j of the Sobel magnitude of the
// channel mean; with patch_means also ws.patch_mean.
using EdgePassFn = void (*)(const Geometry& g, const ImageIn& in, const Workspace& ws, bool patch_means);

// Step 3: ws.sim (k x Lp) = S for the candidates cand; patch_direct (the
// patches are read in place, P a multiple of the vector width) needs the
// patch means of the edge pass.
using SimilarityFn = void (*)(const Params& prm, const ImageIn& in, const int64_t* cand, bool patch_direct,
                              const Workspace& ws, int64_t Lp);

// Step 4: r (L) from S (k x Lp, zero past L): with OT, r_j = L sum_i Pi_ij S_ij
// after T Sinkhorn iterations at eps; without, r_j = max_i S_ij.
using RedundancyFn = void (*)(const float* S, int64_t k, int64_t L, int64_t Lp, bool use_ot, float eps, int64_t T,
                              float* work, float* r);

EdgePassFn edge_pass_for(int width);
SimilarityFn similarity_for(int width);
RedundancyFn redundancy_for(int width);

struct Kernels {
  int width;  // floats per vector: 16, 8 or 4
  EdgePassFn edge_pass;
  SimilarityFn similarity;
  RedundancyFn redundancy;
};

// The widest variant that this CPU runs and that ATen's CPU capability
// (ATEN_CPU_CAPABILITY) allows.
int simd_width();
Kernels kernels_for(int width);

// Per-step timing for benchmarks (bench/native_speed.py): off unless
// switched on through _C.step_profile; then every image adds the steady-clock
// nanoseconds of each step, summed over threads, to process-wide counters.
// kTokenSweep is the part of kSimilarity spent on the token dot products.
enum Step : int { kConvert, kEdge, kStats, kOrder, kSimilarity, kSinkhorn, kSelect, kTokenSweep, kSteps };
bool step_timing();
void add_step_ns(const int64_t* ns);  // kSteps values
int64_t now_ns();

// Steps 1 to 5 for one image.
void process_image(const Kernels& kn, const Params& prm, const ImageIn& in, const ImageOut& out,
                   const Workspace& ws);

}  // namespace pgs
