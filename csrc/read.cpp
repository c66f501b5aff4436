// The floor of bench/native_speed.py: the time to read a call's inputs once.
//
//   pgs_kernels_bench::read_bytes(Tensor[] inputs) -> Tensor
//
// sums the raw bytes of every input as 64-bit words (wrapping; the sum is
// returned as a 0-dim int64 tensor only so that no read can be optimised
// away). The bytes are cut into chunks and spread over ATen's intra-op
// threads with at::parallel_for, so torch.set_num_threads sets its thread
// count as it sets the kernel's; each thread adds a contiguous range of
// chunks with the widest vectors this CPU runs (the kernel's own variant,
// simd.h), four independent accumulators deep. One vector add per 64 bytes
// keeps it far from the core's limits: what it measures is the memory system.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "pgs.h"
#include "simd.h"

namespace pgs {
namespace {

template <int VW>
struct Words {
  typedef uint64_t U __attribute__((vector_size(VW * sizeof(float))));  // VW / 2 words
};

// Sum of n 64-bit words at p, VW/2 words per vector.
template <int VW>
PGS_INL uint64_t sum_words(const unsigned char* p, int64_t n) {
  using U = typename Words<VW>::U;
  constexpr int64_t NW = VW / 2;
  U a0{}, a1{}, a2{}, a3{};
  int64_t i = 0;
  for (; i + 4 * NW <= n; i += 4 * NW) {
    a0 += vload<U>(p + 8 * i);
    a1 += vload<U>(p + 8 * (i + NW));
    a2 += vload<U>(p + 8 * (i + 2 * NW));
    a3 += vload<U>(p + 8 * (i + 3 * NW));
  }
  for (; i + NW <= n; i += NW) a0 += vload<U>(p + 8 * i);
  const U s = (a0 + a1) + (a2 + a3);
  uint64_t total = 0;
  for (int l = 0; l < NW; ++l) total += s[l];
  for (; i < n; ++i) total += vload<uint64_t>(p + 8 * i);
  return total;
}

using SumFn = uint64_t (*)(const unsigned char*, int64_t);
#if PGS_X86_VARIANTS
PGS_TARGET_AVX512 uint64_t sum_words_avx512(const unsigned char* p, int64_t n) { return sum_words<16>(p, n); }
PGS_TARGET_AVX2 uint64_t sum_words_avx2(const unsigned char* p, int64_t n) { return sum_words<8>(p, n); }
#endif
uint64_t sum_words_base(const unsigned char* p, int64_t n) { return sum_words<4>(p, n); }

SumFn sum_words_for(int width) {
#if PGS_X86_VARIANTS
  if (width == 16) return sum_words_avx512;
  if (width == 8) return sum_words_avx2;
#endif
  return sum_words_base;
}

struct Chunk {
  const unsigned char* p;
  int64_t bytes;
};

at::Tensor read_bytes(at::TensorList inputs) {
  constexpr int64_t kChunk = 64 * 1024;
  std::vector<Chunk> chunks;
  for (const at::Tensor& t : inputs) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(),
                "pgs_kernels_bench::read_bytes: every input must be a contiguous CPU tensor");
    const auto* p = static_cast<const unsigned char*>(t.const_data_ptr());
    const int64_t n = t.numel() * static_cast<int64_t>(t.element_size());
    for (int64_t o = 0; o < n; o += kChunk) chunks.push_back({p + o, std::min(kChunk, n - o)});
  }
  static const SumFn sum = sum_words_for(simd_width());
  std::atomic<uint64_t> total{0};
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    uint64_t s = 0;
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      s += sum(ch.p, ch.bytes / 8);
      for (int64_t b = ch.bytes / 8 * 8; b < ch.bytes; ++b) s += ch.p[b];
    }
    total.fetch_add(s, std::memory_order_relaxed);
  });
  return at::scalar_tensor(static_cast<int64_t>(total.load()), at::kLong);
}

}  // namespace
}  // namespace pgs

// Its own namespace: a benchmark's instrument, not part of pgs_kernels' operator
// schemas (pgs_kernels/op.py).
TORCH_LIBRARY(pgs_kernels_bench, m) {
  m.def("read_bytes(Tensor[] inputs) -> Tensor");
  m.impl("read_bytes", c10::DispatchKey::CPU, &pgs::read_bytes);
}
