// Fused flash attention for XLA:CPU, called through the XLA FFI (moe_lvlm/kernels/attention.py).
//
// float32 only. q [b, s, h, d], k/v [b, s, kh, d] (query head i reads kv head i / (h / kh)),
// segment ids [b, s] int32 (0 = padding: attends to nothing and is attended by nothing), causal
// or not. Score tiles of kTile x kTile stay in cache from the dot that makes them to the dots that
// consume them; causal tiles above the diagonal are skipped. A query that sees no key outputs 0
// and gets log-sum-exp +inf.
//
// Forward: one task per (batch, query head, query tile). Backward (FA2: delta = rowsum(dO * O),
// P recomputed from the log-sum-exp): one task per (batch, kv head), which owns dq of its query
// heads and dk / dv of its kv head, so nothing is recomputed twice and nothing needs atomics.
// Tasks run on XLA's intra-op thread pool (xla::ffi::ThreadPool).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 64;
constexpr float kMasked = -1e30f;  // score of a masked pair (finite: no inf arithmetic)

// exp(x) for x <= 0 (scores minus a row maximum), 0 below -87; written so g++ vectorises it.
inline float ExpNonPositive(float x) {
  const float xc = std::max(x, -87.0f);
  const float n = std::floor(xc * 1.44269504f + 0.5f);
  const float g = std::fma(n, -6.93145752e-1f, std::fma(n, -1.42860677e-6f, xc));
  float p = 1.0f / 720.0f;
  p = std::fma(p, g, 1.0f / 120.0f);
  p = std::fma(p, g, 1.0f / 24.0f);
  p = std::fma(p, g, 1.0f / 6.0f);
  p = std::fma(p, g, 0.5f);
  p = std::fma(p, g, 1.0f);
  p = std::fma(p, g, 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

// Runs fn(0 .. n-1) on the caller and up to num_threads - 1 pool threads. The caller waits for
// the work items, not for the scheduled closures: a closure that starts late finds no work left.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t n = 0;
    std::function<void(int64_t)> fn;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->fn = fn;
  auto work = [](State& s) {
    for (int64_t i = s.next.fetch_add(1); i < s.n; i = s.next.fetch_add(1)) {
      s.fn(i);
      if (s.done.fetch_add(1) + 1 == s.n) {
        std::lock_guard<std::mutex> lock(s.mu);
        s.cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state, work] { work(*state); });
  work(*state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

struct Shape {
  int64_t b, s, h, kh, d;
  int64_t group() const { return h / kh; }
  int64_t tiles() const { return (s + kTile - 1) / kTile; }
};

// Scores of query rows [q0, q0 + nq) against key tile [k0, k0 + nk) for one head: sc[i][j] =
// qs[i] . kt[:, j] (kt transposed, zero past nk), kMasked where the pair is not allowed.
template <int D>
void TileScores(const float* qs, const float* kt, const int32_t* seg, int64_t q0, int64_t nq,
                int64_t k0, int64_t nk, bool causal, float* sc) {
  for (int64_t i = 0; i < nq; ++i) {
    float row[kTile] = {};
    for (int c = 0; c < D; ++c) {
      const float qc = qs[i * D + c];
      for (int64_t j = 0; j < kTile; ++j) row[j] += qc * kt[c * kTile + j];
    }
    const int32_t sq = seg[q0 + i];
    const int64_t last = causal ? q0 + i - k0 : kTile;  // last key index allowed by causality
    for (int64_t j = 0; j < kTile; ++j) {
      const int32_t sk = j < nk ? seg[k0 + j] : 0;
      const bool ok = sk == sq && sk > 0 && j <= last;
      sc[i * kTile + j] = ok ? row[j] : kMasked;
    }
  }
}

// Copies rows [r0, r0 + n) of head `head` of x [b, s, heads, D] (batch row bi) into dst [kTile, D]
// (scaled), zero past n.
template <int D>
void LoadRows(const float* x, const Shape& sh, int64_t heads, int64_t bi, int64_t head, int64_t r0,
              int64_t n, float scale, float* dst) {
  for (int64_t r = 0; r < kTile; ++r) {
    const float* src = x + ((bi * sh.s + r0 + r) * heads + head) * D;
    for (int c = 0; c < D; ++c) dst[r * D + c] = r < n ? src[c] * scale : 0.0f;
  }
}

// The same rows transposed: dst [D, kTile].
template <int D>
void LoadRowsT(const float* x, const Shape& sh, int64_t heads, int64_t bi, int64_t head,
               int64_t r0, int64_t n, float* dst) {
  for (int64_t r = 0; r < kTile; ++r) {
    const float* src = x + ((bi * sh.s + r0 + r) * heads + head) * D;
    for (int c = 0; c < D; ++c) dst[c * kTile + r] = r < n ? src[c] : 0.0f;
  }
}

template <int D>
void ForwardTask(const float* q, const float* k, const float* v, const int32_t* seg_all,
                 const Shape& sh, bool causal, int64_t task, float* out, float* lse) {
  const int64_t tiles = sh.tiles();
  const int64_t qt = task % tiles, hi = (task / tiles) % sh.h, bi = task / tiles / sh.h;
  const int64_t kvh = hi / sh.group();
  const int64_t q0 = qt * kTile, nq = std::min(kTile, sh.s - q0);
  const int32_t* seg = seg_all + bi * sh.s;
  // On the heap: XLA's pool threads need not have large stacks.
  std::vector<float> buffer(4 * kTile * D + kTile * kTile, 0.0f);
  float *qs = buffer.data(), *kt = qs + kTile * D, *vs = kt + kTile * D, *acc = vs + kTile * D;
  float* sc = acc + kTile * D;
  float m[kTile], l[kTile];
  std::fill(m, m + kTile, kMasked);
  std::fill(l, l + kTile, 0.0f);
  LoadRows<D>(q, sh, sh.h, bi, hi, q0, nq, 1.0f / std::sqrt(static_cast<float>(D)), qs);
  const int64_t kend = causal ? q0 + nq : sh.s;
  for (int64_t k0 = 0; k0 < kend; k0 += kTile) {
    const int64_t nk = std::min(kTile, sh.s - k0);
    LoadRowsT<D>(k, sh, sh.kh, bi, kvh, k0, nk, kt);
    LoadRows<D>(v, sh, sh.kh, bi, kvh, k0, nk, 1.0f, vs);
    TileScores<D>(qs, kt, seg, q0, nq, k0, nk, causal, sc);
    for (int64_t i = 0; i < nq; ++i) {
      float* s = sc + i * kTile;
      float mx = kMasked;
      for (int64_t j = 0; j < kTile; ++j) mx = std::max(mx, s[j]);
      if (mx <= kMasked) continue;  // no key of this tile for this row
      const float m_new = std::max(m[i], mx);
      const float corr = ExpNonPositive(m[i] - m_new);
      float sum = 0.0f;
      for (int64_t j = 0; j < kTile; ++j) {
        s[j] = ExpNonPositive(s[j] - m_new);
        sum += s[j];
      }
      l[i] = l[i] * corr + sum;
      m[i] = m_new;
      float row[D];
      for (int c = 0; c < D; ++c) row[c] = acc[i * D + c] * corr;
      for (int64_t j = 0; j < nk; ++j) {
        const float p = s[j];
        for (int c = 0; c < D; ++c) row[c] += p * vs[j * D + c];
      }
      for (int c = 0; c < D; ++c) acc[i * D + c] = row[c];
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    float* dst = out + ((bi * sh.s + q0 + i) * sh.h + hi) * D;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    for (int c = 0; c < D; ++c) dst[c] = acc[i * D + c] * inv;
    lse[(bi * sh.h + hi) * sh.s + q0 + i] =
        l[i] > 0.0f ? m[i] + std::log(l[i]) : std::numeric_limits<float>::infinity();
  }
}

template <int D>
void BackwardTask(const float* q, const float* k, const float* v, const int32_t* seg_all,
                  const float* out, const float* lse_all, const float* dout, const Shape& sh,
                  bool causal, int64_t task, float* dq, float* dk, float* dv) {
  const int64_t bi = task / sh.kh, kvh = task % sh.kh, tiles = sh.tiles();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int32_t* seg = seg_all + bi * sh.s;
  const int64_t padded = tiles * kTile;
  // The kv head's keys and values, whole rows: K [s, D], K^T and V^T [D, s]; dK, dV accumulators.
  std::vector<float> kc(padded * D), kt_all(D * padded), vt_all(D * padded);
  std::vector<float> dk_acc(padded * D, 0.0f), dv_acc(padded * D, 0.0f);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n = std::min(kTile, sh.s - t * kTile);
    LoadRows<D>(k, sh, sh.kh, bi, kvh, t * kTile, n, 1.0f, kc.data() + t * kTile * D);
    LoadRowsT<D>(k, sh, sh.kh, bi, kvh, t * kTile, n, kt_all.data() + t * D * kTile);
    LoadRowsT<D>(v, sh, sh.kh, bi, kvh, t * kTile, n, vt_all.data() + t * D * kTile);
  }
  std::vector<float> buffer(4 * kTile * D + 2 * kTile * kTile, 0.0f);
  float *qs = buffer.data(), *dos = qs + kTile * D, *os = dos + kTile * D, *dqs = os + kTile * D;
  float *p = dqs + kTile * D, *ds = p + kTile * kTile;
  float lse[kTile], delta[kTile];
  for (int64_t g = 0; g < sh.group(); ++g) {
    const int64_t hi = kvh * sh.group() + g;
    for (int64_t qt = 0; qt < tiles; ++qt) {
      const int64_t q0 = qt * kTile, nq = std::min(kTile, sh.s - q0);
      LoadRows<D>(q, sh, sh.h, bi, hi, q0, nq, scale, qs);
      LoadRows<D>(dout, sh, sh.h, bi, hi, q0, nq, 1.0f, dos);
      LoadRows<D>(out, sh, sh.h, bi, hi, q0, nq, 1.0f, os);
      for (int64_t i = 0; i < kTile; ++i) {
        lse[i] = i < nq ? lse_all[(bi * sh.h + hi) * sh.s + q0 + i] : 0.0f;
        float dl = 0.0f;
        for (int c = 0; c < D; ++c) dl += dos[i * D + c] * os[i * D + c];
        delta[i] = dl;
      }
      std::fill(dqs, dqs + kTile * D, 0.0f);
      const int64_t kend = causal ? q0 + nq : sh.s;
      for (int64_t k0 = 0; k0 < kend; k0 += kTile) {
        const int64_t nk = std::min(kTile, sh.s - k0);
        const float* kt = kt_all.data() + (k0 / kTile) * D * kTile;
        const float* vt = vt_all.data() + (k0 / kTile) * D * kTile;
        TileScores<D>(qs, kt, seg, q0, nq, k0, nk, causal, p);
        for (int64_t i = 0; i < nq; ++i) {
          float* pi = p + i * kTile;
          float* dsi = ds + i * kTile;
          const bool seen = std::isfinite(lse[i]);
          float dp[kTile] = {};
          for (int c = 0; c < D; ++c) {
            const float doc = dos[i * D + c];
            for (int64_t j = 0; j < kTile; ++j) dp[j] += doc * vt[c * kTile + j];
          }
          const float li = seen ? lse[i] : 0.0f;
          for (int64_t j = 0; j < kTile; ++j) {
            const float pij = seen ? ExpNonPositive(std::min(pi[j] - li, 0.0f)) : 0.0f;
            pi[j] = pij;
            dsi[j] = pij * (dp[j] - delta[i]);
          }
          float row[D] = {};
          for (int64_t j = 0; j < nk; ++j) {
            const float sij = dsi[j];
            for (int c = 0; c < D; ++c) row[c] += sij * kc[(k0 + j) * D + c];
          }
          for (int c = 0; c < D; ++c) dqs[i * D + c] += row[c];
        }
        for (int64_t j = 0; j < nk; ++j) {
          float dvr[D] = {}, dkr[D] = {};
          for (int64_t i = 0; i < nq; ++i) {
            const float pij = p[i * kTile + j], sij = ds[i * kTile + j];
            for (int c = 0; c < D; ++c) {
              dvr[c] += pij * dos[i * D + c];
              dkr[c] += sij * qs[i * D + c];
            }
          }
          for (int c = 0; c < D; ++c) {
            dv_acc[(k0 + j) * D + c] += dvr[c];
            dk_acc[(k0 + j) * D + c] += dkr[c];
          }
        }
      }
      for (int64_t i = 0; i < nq; ++i) {
        float* dst = dq + ((bi * sh.s + q0 + i) * sh.h + hi) * D;
        for (int c = 0; c < D; ++c) dst[c] = dqs[i * D + c] * scale;
      }
    }
  }
  for (int64_t r = 0; r < sh.s; ++r) {
    float* dkd = dk + ((bi * sh.s + r) * sh.kh + kvh) * D;
    float* dvd = dv + ((bi * sh.s + r) * sh.kh + kvh) * D;
    for (int c = 0; c < D; ++c) {
      dkd[c] = dk_acc[r * D + c];
      dvd[c] = dv_acc[r * D + c];
    }
  }
}

ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                       const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::S32>& seg, Shape& sh) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const auto sd = seg.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || sd.size() != 2) {
    return ffi::Error::InvalidArgument("native attention: q/k/v must be rank 4, segments rank 2");
  }
  sh = Shape{qd[0], qd[1], qd[2], kd[2], qd[3]};
  const bool ok = kd[0] == sh.b && kd[1] == sh.s && kd[3] == sh.d && vd[0] == kd[0] &&
                  vd[1] == kd[1] && vd[2] == kd[2] && vd[3] == kd[3] && sd[0] == sh.b &&
                  sd[1] == sh.s && sh.kh > 0 && sh.h % sh.kh == 0;
  if (!ok) return ffi::Error::InvalidArgument("native attention: inconsistent q/k/v/segment shapes");
  return ffi::Error::Success();
}

#define MOE_DISPATCH_D(d, CALL)                                                  \
  switch (d) {                                                                  \
    case 8: { constexpr int D = 8; CALL; break; }                               \
    case 16: { constexpr int D = 16; CALL; break; }                             \
    case 32: { constexpr int D = 32; CALL; break; }                             \
    case 64: { constexpr int D = 64; CALL; break; }                             \
    case 128: { constexpr int D = 128; CALL; break; }                           \
    default: return ffi::Error::InvalidArgument("native attention: head_dim not supported"); \
  }

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, int32_t causal,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Shape sh;
  if (ffi::Error error = CheckShapes(q, k, v, seg, sh); error.failure()) return error;
  const int64_t tasks = sh.b * sh.h * sh.tiles();
  MOE_DISPATCH_D(sh.d, ParallelFor(pool, tasks, [&](int64_t t) {
    ForwardTask<D>(q.typed_data(), k.typed_data(), v.typed_data(), seg.typed_data(), sh,
                   causal != 0, t, out->typed_data(), lse->typed_data());
  }));
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, int32_t causal,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  Shape sh;
  if (ffi::Error error = CheckShapes(q, k, v, seg, sh); error.failure()) return error;
  MOE_DISPATCH_D(sh.d, ParallelFor(pool, sh.b * sh.kh, [&](int64_t t) {
    BackwardTask<D>(q.typed_data(), k.typed_data(), v.typed_data(), seg.typed_data(),
                    out.typed_data(), lse.typed_data(), dout.typed_data(), sh, causal != 0, t,
                    dq->typed_data(), dk->typed_data(), dv->typed_data());
  }));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("causal")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("causal")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
