// The LM head and the token cross-entropy fused, for XLA:CPU through the XLA FFI
// (native_lm_loss.py).
//
// float32. Hidden states x [N, d] (d a multiple of 16), head W [d, V] (any V), bias [V],
// targets [N] int32, and per token a weight [N] (forward) or upstream gradient g [N] (backward);
// tokens whose weight / g is 0 are skipped (nll, lse, dx rows 0). Forward:
// lse = logsumexp(x W + b), nll = lse - (x W + b)[target]. Backward, with g the gradient of the
// nll: dlogits = (softmax - onehot(target)) * g, dx = dlogits W^T, dW = x^T dlogits,
// dbias = column sums of dlogits.
//
// The logits are never materialised: the active tokens are cut into tiles of kTile rows, and a
// tile's logits are made kChunk vocabulary columns at a time in cache (a running max and sum
// give the log-sum-exp); the backward recomputes them and turns each chunk into dlogits, dx
// and the tile's contribution to dW in place. V is padded to a multiple of 16 with zero columns
// of W whose bias is -1e30 (their softmax is 0). dW and dbias reduce over tokens: the tiles are
// split into one contiguous range per worker, each accumulating into its own buffer, summed in
// worker order at the end (deterministic, no atomics). The dots are register-blocked (dense.h);
// tasks run on XLA's intra-op thread pool.

#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "dense.h"

namespace {

using namespace moe_lvlm;  // NOLINT: the shared vector helpers

constexpr int64_t kTile = 48;    // tokens of a tile (a multiple of kMr)
constexpr int64_t kChunk = 256;  // vocabulary columns of a logits chunk (a multiple of 16)
constexpr int64_t kCols = kNv * kW;
constexpr float kPadBias = -1e30f;
// Row strides of the copies of W, W^T and the logits chunk get kCols extra columns: a stride of
// a power of two bytes (4 KB for V = 1024) would map a column panel's rows onto one L1 set.
constexpr int64_t kLdl = kChunk + kCols;

struct Problem {
  int64_t n, d, v, vp;  // tokens, width, vocabulary, vocabulary padded to a multiple of kCols
  int64_t ldw;          // row stride of w: vp + kCols
  const float* x;
  const float* w;     // [d, vp]: the head, zero-padded, row stride ldw
  const float* bias;  // [vp]: padded with kPadBias
  const int32_t* targets;
  std::vector<int64_t> rows;  // the active tokens, in order
  int64_t tiles() const { return (static_cast<int64_t>(rows.size()) + kTile - 1) / kTile; }
  int64_t tile_rows(int64_t t) const {
    return std::min<int64_t>(kTile, static_cast<int64_t>(rows.size()) - t * kTile);
  }
};

ffi::Error Setup(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& w,
                 const ffi::Buffer<ffi::F32>& bias, const ffi::Buffer<ffi::S32>& targets,
                 const ffi::Buffer<ffi::F32>& weights, Problem& p) {
  const auto xd = x.dimensions(), wd = w.dimensions(), bd = bias.dimensions();
  const auto td = targets.dimensions(), gd = weights.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || bd.size() != 1 || td.size() != 1 || gd.size() != 1) {
    return ffi::Error::InvalidArgument(
        "native lm loss: x, head must be rank 2; bias, targets, weights rank 1");
  }
  p.n = xd[0];
  p.d = xd[1];
  p.v = wd[1];
  p.vp = (p.v + kCols - 1) / kCols * kCols;
  if (wd[0] != p.d || bd[0] != p.v || td[0] != p.n || gd[0] != p.n) {
    return ffi::Error::InvalidArgument("native lm loss: inconsistent shapes");
  }
  if (p.d % kCols) return ffi::Error::InvalidArgument("native lm loss: d must be a multiple of 16");
  p.x = x.typed_data();
  p.targets = targets.typed_data();
  const float* g = weights.typed_data();
  p.rows.clear();
  for (int64_t i = 0; i < p.n; ++i) {
    if (g[i] == 0.0f) continue;
    if (p.targets[i] < 0 || p.targets[i] >= p.v) {
      return ffi::Error::InvalidArgument(
          "native lm loss: a weighted token's target is outside [0, vocab_size)");
    }
    p.rows.push_back(i);
  }
  float* b = Kept(0, p.vp);
  std::memcpy(b, bias.typed_data(), p.v * sizeof(float));
  std::fill(b + p.v, b + p.vp, kPadBias);
  p.bias = b;
  p.ldw = p.vp + kCols;
  float* padded = Kept(1, p.d * p.ldw);
  const float* src = w.typed_data();
  for (int64_t r = 0; r < p.d; ++r) {
    std::memcpy(padded + r * p.ldw, src + r * p.v, p.v * sizeof(float));
    std::fill(padded + r * p.ldw + p.v, padded + (r + 1) * p.ldw, 0.0f);
  }
  p.w = padded;
  return ffi::Error::Success();
}

// The tile's rows of x into xs [n, d].
void GatherRows(const Problem& p, int64_t tile, float* xs) {
  for (int64_t r = 0; r < p.tile_rows(tile); ++r) {
    std::memcpy(xs + r * p.d, p.x + p.rows[tile * kTile + r] * p.d, p.d * sizeof(float));
  }
}

// l [n, cw] (row stride kLdl) = xs W[:, c : c + cw] + b[c : c + cw].
void Logits(const Problem& p, const float* xs, int64_t n, int64_t c, int64_t cw, float* l) {
  Gemm(n, cw, p.d, xs, p.d, p.w + c, p.ldw, l, kLdl, false);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t j = 0; j < cw; j += kW) Store(l + r * kLdl + j, Load(l + r * kLdl + j) +
                                                                 Load(p.bias + c + j));
  }
}

void ForwardTile(const Problem& p, int64_t tile, float* nll, float* lse) {
  const int64_t n = p.tile_rows(tile);
  float* xs = Scratch(kTile * (p.d + kLdl));
  float* l = xs + kTile * p.d;
  float m[kTile], s[kTile], picked[kTile];
  std::fill(m, m + n, kPadBias);
  std::fill(s, s + n, 0.0f);
  GatherRows(p, tile, xs);
  for (int64_t c = 0; c < p.vp; c += kChunk) {
    const int64_t cw = std::min(kChunk, p.vp - c);
    Logits(p, xs, n, c, cw, l);
    for (int64_t r = 0; r < n; ++r) {
      const float* lr = l + r * kLdl;
      V mv = Splat(kPadBias);
      for (int64_t j = 0; j < cw; j += kW) {
        const V a = Load(lr + j);
        mv = a > mv ? a : mv;
      }
      const float mnew = std::max(m[r], Max(mv));
      V acc{};
      for (int64_t j = 0; j < cw; j += kW) acc += Exp(Load(lr + j) - mnew);
      s[r] = s[r] * std::exp(m[r] - mnew) + Sum(acc);
      m[r] = mnew;
      const int64_t t = p.targets[p.rows[tile * kTile + r]] - c;
      if (t >= 0 && t < cw) picked[r] = lr[t];
    }
  }
  for (int64_t r = 0; r < n; ++r) {
    const int64_t i = p.rows[tile * kTile + r];
    lse[i] = m[r] + std::log(s[r]);
    nll[i] = lse[i] - picked[r];
  }
}

// Per-worker accumulators: dW [d, vp] and dbias [vp].
struct Grads {
  float *w, *bias;
};

// wt: W^T [vp, d] (row stride d + kCols); g: the nll's gradient per token.
void BackwardTile(const Problem& p, const float* wt, const float* lse, const float* g,
                  int64_t tile, float* dx, Grads& grads) {
  const int64_t n = p.tile_rows(tile), d = p.d;
  float* xs = Scratch(kTile * (3 * d + kLdl));
  float *xt = xs + kTile * d, *dxs = xt + kTile * d, *l = dxs + kTile * d;
  GatherRows(p, tile, xs);
  Transpose(xs, n, d, xt);
  std::fill(dxs, dxs + n * d, 0.0f);
  for (int64_t c = 0; c < p.vp; c += kChunk) {
    const int64_t cw = std::min(kChunk, p.vp - c);
    Logits(p, xs, n, c, cw, l);
    for (int64_t r = 0; r < n; ++r) {  // l <- (softmax - onehot) * g, in place
      const int64_t i = p.rows[tile * kTile + r];
      float* lr = l + r * kLdl;
      const V gv = Splat(g[i]), lv = Splat(lse[i]);
      for (int64_t j = 0; j < cw; j += kW) Store(lr + j, Exp(Load(lr + j) - lv) * gv);
      const int64_t t = p.targets[i] - c;
      if (t >= 0 && t < cw) lr[t] -= g[i];
      float* db = grads.bias + c;
      for (int64_t j = 0; j < cw; j += kW) Store(db + j, Load(db + j) + Load(lr + j));
    }
    Gemm(n, d, cw, l, kLdl, wt + c * (d + kCols), d + kCols, dxs, d, true);
    Gemm(d, cw, n, xt, n, l, kLdl, grads.w + c, p.vp, true);
  }
  for (int64_t r = 0; r < n; ++r) {
    std::memcpy(dx + p.rows[tile * kTile + r] * d, dxs + r * d, d * sizeof(float));
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::S32> targets,
                   ffi::Buffer<ffi::F32> weights, ffi::ResultBuffer<ffi::F32> nll,
                   ffi::ResultBuffer<ffi::F32> lse) {
  Problem p;
  if (ffi::Error error = Setup(x, w, bias, targets, weights, p); error.failure()) return error;
  std::fill(nll->typed_data(), nll->typed_data() + p.n, 0.0f);
  std::fill(lse->typed_data(), lse->typed_data() + p.n, 0.0f);
  ParallelFor(pool, p.tiles(), [&](int64_t t) {
    ForwardTile(p, t, nll->typed_data(), lse->typed_data());
  });
  ReleaseLarge();
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::S32> targets,
                    ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> lse,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw,
                    ffi::ResultBuffer<ffi::F32> dbias) {
  Problem p;
  if (ffi::Error error = Setup(x, w, bias, targets, g, p); error.failure()) return error;
  const int64_t d = p.d, vp = p.vp, v = p.v;
  const int64_t ldt = d + kCols;
  float* wt = Kept(2, vp * ldt);
  ParallelFor(pool, (vp + kChunk - 1) / kChunk, [&](int64_t b) {  // W^T by column blocks
    for (int64_t c = b * kChunk; c < std::min(vp, (b + 1) * kChunk); ++c) {
      for (int64_t r = 0; r < d; ++r) wt[c * ldt + r] = p.w[r * p.ldw + c];
    }
  });
  std::fill(dx->typed_data(), dx->typed_data() + p.n * d, 0.0f);
  const int64_t tiles = p.tiles();
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), tiles));
  const int64_t per = d * vp + vp;
  float* buffers = Kept(3, workers * per);
  std::vector<Grads> grads(workers);
  ParallelFor(pool, workers, [&](int64_t k) {
    Grads& mine = grads[k];
    mine.w = buffers + k * per;
    mine.bias = mine.w + d * vp;
    std::fill(mine.w, mine.w + per, 0.0f);
    for (int64_t t = tiles * k / workers; t < tiles * (k + 1) / workers; ++t) {
      BackwardTile(p, wt, lse.typed_data(), g.typed_data(), t, dx->typed_data(), mine);
    }
  });
  // The workers' buffers summed in worker order, row by row of dW (row d: dbias).
  ParallelFor(pool, d + 1, [&](int64_t r) {
    float* dst = r < d ? dw->typed_data() + r * v : dbias->typed_data();
    const int64_t offset = r < d ? r * vp : d * vp;
    std::fill(dst, dst + v, 0.0f);
    for (const Grads& gr : grads) {
      const float* src = gr.w + offset;
      for (int64_t j = 0; j < v; ++j) dst[j] += src[j];
    }
  });
  ReleaseLarge();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmLossForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmLossBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
