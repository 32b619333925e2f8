// Dense pieces that moe.cc and lm_loss.cc share: a register-blocked float32 GEMM (6 rows x 16
// columns of accumulators), a transpose, and buffers kept by the calling thread across calls.

#ifndef MOE_LVLM_KERNELS_DENSE_H_
#define MOE_LVLM_KERNELS_DENSE_H_

#include <cstdint>
#include <vector>

#include "cpu_common.h"

namespace moe_lvlm {

constexpr int kMr = 6;  // rows of a register block
constexpr int kNv = 2;  // vectors of columns of a register block

// C[R rows, kNv * kW columns] (+)= A[R, K] B[K, kNv * kW]; row-major with leading dimensions.
template <int R>
inline void Block(int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                  int64_t ldc, bool accumulate) {
  V acc[R][kNv];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < kNv; ++v) acc[r][v] = accumulate ? Load(c + r * ldc + v * kW) : V{};
  }
  for (int64_t k = 0; k < K; ++k) {
    V bv[kNv];
    for (int v = 0; v < kNv; ++v) bv[v] = Load(b + k * ldb + v * kW);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const V av = Splat(a[r * lda + k]);
      for (int v = 0; v < kNv; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < kNv; ++v) Store(c + r * ldc + v * kW, acc[r][v]);
  }
}

// C[M, N] (+)= A[M, K] B[K, N], N a multiple of kNv * kW: column panels of B outermost, so a
// panel stays in L1 while the row blocks pass over it.
inline void Gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < N; j += kNv * kW) {
    int64_t i = 0;
    for (; i + kMr <= M; i += kMr) {
      Block<kMr>(K, a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc, accumulate);
    }
    const float* ai = a + i * lda;
    float* ci = c + i * ldc + j;
    switch (M - i) {
      case 5: Block<5>(K, ai, lda, b + j, ldb, ci, ldc, accumulate); break;
      case 4: Block<4>(K, ai, lda, b + j, ldb, ci, ldc, accumulate); break;
      case 3: Block<3>(K, ai, lda, b + j, ldb, ci, ldc, accumulate); break;
      case 2: Block<2>(K, ai, lda, b + j, ldb, ci, ldc, accumulate); break;
      case 1: Block<1>(K, ai, lda, b + j, ldb, ci, ldc, accumulate); break;
      default: break;
    }
  }
}

// dst [cols, rows] = src [rows, cols]^T.
inline void Transpose(const float* src, int64_t rows, int64_t cols, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
  }
}

// Buffers owned by the calling thread and kept across calls (contents undefined), so that a
// call does not fault in fresh pages each time; `Kept(slot, n)` has at least n floats, and
// `ReleaseLarge()` frees those over kKeepFloats at the end of a call (large models).
constexpr int64_t kKeepFloats = int64_t{16} << 20;  // 64 MB
constexpr int kKeptSlots = 4;

inline std::vector<float>* KeptBuffers() {
  thread_local std::vector<float> buffers[kKeptSlots];
  return buffers;
}

inline float* Kept(int slot, int64_t n) {
  std::vector<float>& buffer = KeptBuffers()[slot];
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

inline void ReleaseLarge() {
  for (int i = 0; i < kKeptSlots; ++i) {
    std::vector<float>& buffer = KeptBuffers()[i];
    if (static_cast<int64_t>(buffer.size()) > kKeepFloats) std::vector<float>().swap(buffer);
  }
}

}  // namespace moe_lvlm

#endif  // MOE_LVLM_KERNELS_DENSE_H_
