// The operator's CPU kernel: the checks that keep memory safe, outputs,
// per-thread work space, images spread over threads with at::parallel_for,
// and the registration for the private schema that pgs_kernels/op.py defines.

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "pgs.h"
#include "simd.h"

namespace pgs {

// ATen's capability (the CPU's best, or lower as ATEN_CPU_CAPABILITY says)
// caps the variant, so that one switch governs ATen's kernels and this one.
int simd_width() {
  static const int width = [] {
    const std::string capability = at::get_cpu_capability();
    const int allowed = capability == "AVX512" ? 16 : capability == "AVX2" ? 8 : 4;
    int supported = 4;
#if PGS_X86_VARIANTS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) {
      supported = 16;
    } else if (__builtin_cpu_supports("x86-64-v3")) {
      supported = 8;
    }
#endif
    return std::min(allowed, supported);
  }();
  return width;
}

namespace {
std::atomic<bool> g_step_timing{false};
std::atomic<int64_t> g_step_ns[kSteps];
}  // namespace

bool step_timing() { return g_step_timing.load(std::memory_order_relaxed); }

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

void add_step_ns(const int64_t* ns) {
  for (int s = 0; s < kSteps; ++s) g_step_ns[s].fetch_add(ns[s], std::memory_order_relaxed);
}

namespace {

// Work space memory from ATen's CPU allocator (64-byte aligned, so that no
// vector load from a buffer start straddles two cache lines); the tensors
// live as long as this object.
class Arena {
 public:
  template <class T>
  T* take(int64_t n) {
    storage_.push_back(at::empty({std::max<int64_t>(n, 1) * static_cast<int64_t>(sizeof(T))}, at::kByte));
    return static_cast<T*>(storage_.back().data_ptr());
  }

 private:
  std::vector<at::Tensor> storage_;
};

// Sized for the widest vectors (kMaxWidth floats), whichever variant runs.
// sc, sy: channel and row stride of the pixels the kernel reads.
Workspace make_workspace(const Params& prm, int64_t sc, int64_t sy, Arena& arena) {
  const Geometry& g = prm.g;
  auto pad = [](int64_t n) { return (n + kMaxWidth - 1) / kMaxWidth * kMaxWidth; };
  const int64_t L = g.L, k = std::max<int64_t>(prm.k, 1), Lp = pad(L), kp = pad(prm.k);
  const int64_t dpad = pad(g.C * g.P * g.P);
  Workspace ws{};
  ws.mean_rows = arena.take<float>(3 * (g.W + 2));
  ws.band_sobel = arena.take<float>(g.W);
  ws.shifted_sums = arena.take<float>(g.gw * kMaxWidth);
  ws.patch_mean = arena.take<float>(L);
  ws.sobel_sum = arena.take<double>(L);
  ws.key = arena.take<double>(L);
  ws.order = arena.take<int64_t>(L);
  ws.tier = arena.take<uint8_t>(L);
  ws.row_offsets = arena.take<int64_t>(g.C * g.P);
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t row = 0; row < g.P; ++row) ws.row_offsets[c * g.P + row] = c * sc + row * sy;
  }
  ws.cand_vectors = arena.take<const float*>(k);
  ws.cand_bf16 = arena.take<const uint16_t*>(k);
  if (prm.want_pixels) {
    ws.centered_cands = arena.take<float>(k * dpad);
    ws.centered_rows = arena.take<float>(2 * dpad);
    ws.pixel_dots = arena.take<float>(k * Lp);
  }
  ws.panel = arena.take<float>(k * std::max(dpad, pad(prm.D)));
  if (prm.want_tokens) ws.token_dots = arena.take<float>(k * Lp);
  ws.inv_pixel_norm = arena.take<float>(L);
  ws.inv_token_norm = arena.take<float>(L);
  ws.sim = arena.take<float>(k * Lp);
  ws.sinkhorn_work = arena.take<float>(2 * prm.k * Lp + 5 * kp + 3 * Lp);
  return ws;
}

// This kernel is reached through pgs_kernels.op.native_kernel, which checks
// every argument with the messages of pgs_kernels/contract.py. What is
// checked here is only what keeps memory safe on a direct call of the private
// operator, so each failure names the condition, not the argument.
#define PGS_REQUIRE(cond)                                                                                  \
  TORCH_CHECK(cond, "pgs_kernels::_pgs_select_native: ", #cond,                                             \
              " does not hold; call torch.ops.pgs_kernels.pgs_select, whose checks name the argument")

bool supported_image_dtype(at::ScalarType s) { return s == at::kFloat || s == at::kHalf || s == at::kBFloat16; }

Geometry check_args(const at::Tensor& images, const std::optional<at::Tensor>& tokens, const at::Tensor& noise,
                    int64_t patch_size, int64_t num_keep, int64_t num_candidates, double token_weight) {
  PGS_REQUIRE(images.dim() == 4 && images.device().is_cpu() && supported_image_dtype(images.scalar_type()));
  PGS_REQUIRE(patch_size >= 1);
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t P = patch_size;
  PGS_REQUIRE(C >= 1 && H % P == 0 && W % P == 0);
  const int64_t gh = H / P, gw = W / P, L = gh * gw;
  PGS_REQUIRE(L >= 1 && num_keep >= 1 && num_keep <= L && num_candidates >= 0 && num_candidates <= L);
  PGS_REQUIRE(token_weight >= 0.0 && token_weight <= 1.0);
  PGS_REQUIRE(noise.dim() == 2 && noise.size(0) == B && noise.size(1) == L && noise.device().is_cpu() &&
              at::isFloatingType(noise.scalar_type()));
  if (token_weight > 0.0) {
    PGS_REQUIRE(tokens.has_value() && tokens->defined());
    const at::Tensor& t = *tokens;
    PGS_REQUIRE(t.dim() == 3 && t.size(0) == B && t.size(1) == L && t.size(2) >= 1 && t.device().is_cpu() &&
                at::isFloatingType(t.scalar_type()));
  }
  return Geometry{C, H, W, P, gh, gw, L};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pgs_select_cpu(
    const at::Tensor& images, const std::optional<at::Tensor>& tokens_opt, const at::Tensor& noise_in,
    int64_t patch_size, int64_t num_keep, int64_t num_candidates, double sim_threshold,
    double token_weight, double edge_weight, bool use_ot, double ot_reg, int64_t ot_iters) {
  const Geometry geo = check_args(images, tokens_opt, noise_in, patch_size, num_keep, num_candidates, token_weight);
  const int64_t B = images.size(0), C = geo.C, H = geo.H, W = geo.W, L = geo.L;
  const bool want_tokens = token_weight > 0.0;
  const at::Tensor tokens = want_tokens ? *tokens_opt : at::Tensor();
  const int64_t D = want_tokens ? tokens.size(2) : 0;

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
  Params prm{};
  prm.g = geo;
  prm.K = K, prm.k = k, prm.D = D, prm.T = ot_iters;
  prm.theta = static_cast<float>(sim_threshold);
  prm.alpha = static_cast<float>(token_weight);
  prm.one_minus_alpha = static_cast<float>(1.0 - token_weight);
  prm.eps = static_cast<float>(ot_reg);
  prm.edge_weight = edge_weight;
  prm.use_ot = use_ot, prm.want_pixels = token_weight < 1.0, prm.want_tokens = want_tokens;

  const float* noise_all = noise.data_ptr<float>();
  int64_t* keep_all = keep.data_ptr<int64_t>();
  bool* mask_all = mask.data_ptr<bool>();
  float* edge_all = edge.data_ptr<float>();
  int64_t* cand_all = cand.data_ptr<int64_t>();
  float* red_all = red.data_ptr<float>();
  const int64_t ist[4] = {images.stride(0), images.stride(1), images.stride(2), images.stride(3)};
  // fp32 pixels with unit column stride and fp32 or bf16 tokens with unit
  // feature stride are read where they lie; anything else is converted per image.
  const bool img_direct = images.scalar_type() == at::kFloat && ist[3] == 1;
  const bool tok_fp32 = want_tokens && tokens.scalar_type() == at::kFloat && tokens.stride(2) == 1;
  const bool tok_bf16 = want_tokens && tokens.scalar_type() == at::kBFloat16 && tokens.stride(2) == 1;
  const bool tok_direct = tok_fp32 || tok_bf16;
  static const Kernels kernels = kernels_for(simd_width());

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    // Worker threads start with the default dispatch state; the copies below
    // are plain kernels, never recorded by autograd.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    // Offsets of a patch's pixel rows, in the layout the kernel reads (the
    // tensor's own, or the converted copy's).
    const int64_t sc = img_direct ? ist[1] : H * W, sy = img_direct ? ist[2] : W;
    Arena arena;
    const Workspace ws = make_workspace(prm, sc, sy, arena);
    const at::Tensor image_copy = img_direct ? at::Tensor() : at::empty({C, H, W}, at::kFloat);
    const at::Tensor token_copy = want_tokens && !tok_direct ? at::empty({L, D}, at::kFloat) : at::Tensor();

    const bool timed = step_timing();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = timed ? now_ns() : 0;
      ImageIn in{};
      in.channel_stride = sc;
      in.row_stride = sy;
      if (img_direct) {
        in.pixels = images.const_data_ptr<float>() + b * ist[0];
      } else {
        image_copy.copy_(images.select(0, b));
        in.pixels = image_copy.const_data_ptr<float>();
      }
      if (tok_fp32) {
        in.tokens = tokens.const_data_ptr<float>() + b * tokens.stride(0);
        in.token_stride = tokens.stride(1);
      } else if (tok_bf16) {
        in.tokens_bf16 = reinterpret_cast<const uint16_t*>(tokens.const_data_ptr<at::BFloat16>()) +
                         b * tokens.stride(0);
        in.token_stride = tokens.stride(1);
      } else if (want_tokens) {
        token_copy.copy_(tokens.select(0, b));
        in.tokens = token_copy.const_data_ptr<float>();
        in.token_stride = D;
      }
      in.noise = noise_all + b * L;
      in.next_pixels = img_direct && b + 1 < b1 ? images.const_data_ptr<float>() + (b + 1) * ist[0] : nullptr;
      if (timed) {
        int64_t ns[kSteps] = {};
        ns[kConvert] = now_ns() - t0;
        add_step_ns(ns);
      }
      const ImageOut out{edge_all + b * L, cand_all + b * k, red_all + b * L, mask_all + b * L,
                         keep_all + b * K};
      process_image(kernels, prm, in, out, ws);
    }
  });
  return {keep, mask, edge, cand, red};
}

}  // namespace
}  // namespace pgs

// The schemas are defined once, in Python (pgs_kernels/op.py), before this
// module is imported; here only the CPU kernel is registered, for the private
// operator that pgs_kernels.op.native_kernel calls after its checks.
TORCH_LIBRARY_IMPL(pgs_kernels, CPU, m) { m.impl("_pgs_select_native", &pgs::pgs_select_cpu); }

// The operator lives in the dispatcher; importing the Python module runs the
// registration above. Its one function says which compiled variant the
// kernel dispatches to, so that benchmarks can record it.
static PyObject* simd_width(PyObject*, PyObject*) { return PyLong_FromLong(pgs::simd_width()); }

// step_profile(on): switch the per-step timing on or off and zero its
// counters. step_times(): the nanoseconds per step since, summed over images
// and threads, as a dict.
static PyObject* step_profile(PyObject*, PyObject* on) {
  const int flag = PyObject_IsTrue(on);
  if (flag < 0) return nullptr;
  for (auto& c : pgs::g_step_ns) c.store(0);
  pgs::g_step_timing.store(flag != 0);
  Py_RETURN_NONE;
}

static PyObject* step_times(PyObject*, PyObject*) {
  static const char* names[pgs::kSteps] = {"convert", "edge", "stats", "order", "similarity", "sinkhorn",
                                           "select", "token_sweep"};
  PyObject* d = PyDict_New();
  if (!d) return nullptr;
  for (int s = 0; s < pgs::kSteps; ++s) {
    PyObject* v = PyLong_FromLongLong(pgs::g_step_ns[s].load());
    if (!v || PyDict_SetItemString(d, names[s], v) < 0) {
      Py_XDECREF(v);
      Py_DECREF(d);
      return nullptr;
    }
    Py_DECREF(v);
  }
  return d;
}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"simd_width", simd_width, METH_NOARGS,
       "Floats per vector of the kernel variant in use: 16 (AVX-512), 8 (AVX2+FMA), 4 (baseline)."},
      {"step_profile", step_profile, METH_O,
       "step_profile(on): switch the kernel's per-step timing on or off (benchmarks) and zero its counters."},
      {"step_times", step_times, METH_NOARGS,
       "Nanoseconds per step (convert, edge, stats, order, similarity, sinkhorn, select; token_sweep: the "
       "token part of similarity) since step_profile, summed over images and threads."},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods, nullptr, nullptr,
                                   nullptr, nullptr};
  return PyModule_Create(&def);
}
