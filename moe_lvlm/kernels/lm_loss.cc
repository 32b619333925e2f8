// The LM head and the token cross-entropy fused, for XLA:CPU through the XLA FFI
// (native_lm_loss.py).
//
// float32. Hidden states x [N, d] (d a multiple of 16), head W [d, V] (any V), bias [V],
// targets [N] int32, weights [N]; tokens of weight 0 are skipped (their nll and dx rows are 0).
// nll = logsumexp(x W + b) - (x W + b)[target]. `LmLossForward` gives nll [N] only;
// `LmLossForwardBackward` also the gradients of sum(weights * nll): with
// dlogits = (softmax - onehot(target)) * weight, dx = dlogits W^T, dW = x^T dlogits,
// dbias = column sums of dlogits (the training step's custom VJP scales them by the loss's
// cotangent, so the logits are made once: three GEMMs in all).
//
// The [N, V] logits are never materialised: the active tokens are cut into tiles of kTile rows.
// The forward makes a tile's logits kChunk vocabulary columns at a time in cache (a running max
// and sum give the log-sum-exp); the fused call keeps a tile's whole [kTile, V] logits in a
// per-thread buffer, turns them into dlogits in place and runs the two gradient GEMMs on them.
// V is padded to a multiple of 16 with zero columns of W whose bias is -1e30 (their softmax is
// 0). dW and dbias reduce over tokens: the tiles are split into one contiguous range per
// worker, each accumulating into its own buffer, summed in worker order at the end
// (deterministic, no atomics). Where those buffers (workers x [d, V]) would exceed the call's
// `grad_buffer_bytes`, the fused pass gives nll, dx and each token's log-sum-exp only, and a
// second pass owns kChunk vocabulary columns per task: it makes each tile's logits of its
// columns again and accumulates dW and dbias there (one more GEMM, no buffer per worker; still
// deterministic). The dots are register-blocked (dense.h); tasks run on XLA's intra-op thread
// pool.

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

// l [n, cw] (row stride ldl) = xs W[:, c : c + cw] + b[c : c + cw].
void Logits(const Problem& p, const float* xs, int64_t n, int64_t c, int64_t cw, float* l,
            int64_t ldl) {
  Gemm(n, cw, p.d, xs, p.d, p.w + c, p.ldw, l, ldl, false);
  for (int64_t r = 0; r < n; ++r) {
    float* lr = l + r * ldl;
    for (int64_t j = 0; j < cw; j += kW) Store(lr + j, Load(lr + j) + Load(p.bias + c + j));
  }
}

// Running max m and sum s of exp(l - m) over the row's cw logits.
void OnlineLse(const float* lr, int64_t cw, float& m, float& s) {
  V mv = Splat(kPadBias);
  for (int64_t j = 0; j < cw; j += kW) {
    const V a = Load(lr + j);
    mv = a > mv ? a : mv;
  }
  const float mnew = std::max(m, Max(mv));
  V acc{};
  for (int64_t j = 0; j < cw; j += kW) acc += Exp(Load(lr + j) - mnew);
  s = s * std::exp(m - mnew) + Sum(acc);
  m = mnew;
}

// The tile's nll, its logits made kChunk columns at a time.
void ForwardTile(const Problem& p, int64_t tile, float* nll) {
  const int64_t n = p.tile_rows(tile);
  float* xs = Scratch(kTile * (p.d + kLdl));
  float* l = xs + kTile * p.d;
  float m[kTile], s[kTile], picked[kTile];
  std::fill(m, m + n, kPadBias);
  std::fill(s, s + n, 0.0f);
  GatherRows(p, tile, xs);
  for (int64_t c = 0; c < p.vp; c += kChunk) {
    const int64_t cw = std::min(kChunk, p.vp - c);
    Logits(p, xs, n, c, cw, l, kLdl);
    for (int64_t r = 0; r < n; ++r) {
      OnlineLse(l + r * kLdl, cw, m[r], s[r]);
      const int64_t t = p.targets[p.rows[tile * kTile + r]] - c;
      if (t >= 0 && t < cw) picked[r] = l[r * kLdl + t];
    }
  }
  for (int64_t r = 0; r < n; ++r) nll[p.rows[tile * kTile + r]] = m[r] + std::log(s[r]) - picked[r];
}

// A row's cw logits lr (columns c.. of the vocabulary) -> (softmax - onehot(t - c)) * g in place,
// from the row's log-sum-exp; t - c outside [0, cw): the target is not among these columns.
void ToDlogits(float* lr, int64_t cw, float lse, float g, int64_t t) {
  const V gv = Splat(g);
  for (int64_t j = 0; j < cw; j += kW) Store(lr + j, Exp(Load(lr + j) - lse) * gv);
  if (t >= 0 && t < cw) lr[t] -= g;
}

// Per-worker accumulators: dW [d, vp] and dbias [vp].
struct Grads {
  float *w, *bias;
};

// The tile's nll and the gradients of sum(g * nll), g the tokens' weights: the tile's whole
// logits rows [n, vp] stay in scratch (row stride vp + kCols), turned into dlogits in place.
// wt: W^T [vp, d] (row stride d + kCols). Without `grads` (the split pass), dW and dbias are
// left to HeadGradChunk and each token's log-sum-exp goes to `lse`.
void FusedTile(const Problem& p, const float* wt, const float* g, int64_t tile, float* nll,
               float* dx, Grads* grads, float* lse_out) {
  const int64_t n = p.tile_rows(tile), d = p.d, ldl = p.vp + kCols, ldt = d + kCols;
  float* xs = Scratch(kTile * (3 * d + ldl));
  float *xt = xs + kTile * d, *dxs = xt + kTile * d, *l = dxs + kTile * d;
  GatherRows(p, tile, xs);
  Transpose(xs, n, d, xt);
  for (int64_t c = 0; c < p.vp; c += kChunk) {
    Logits(p, xs, n, c, std::min(kChunk, p.vp - c), l + c, ldl);
  }
  for (int64_t r = 0; r < n; ++r) {  // l <- (softmax - onehot) * g, in place
    const int64_t i = p.rows[tile * kTile + r], t = p.targets[i];
    float* lr = l + r * ldl;
    float m = kPadBias, s = 0.0f;
    OnlineLse(lr, p.vp, m, s);
    const float lse = m + std::log(s);
    nll[i] = lse - lr[t];
    if (lse_out != nullptr) lse_out[i] = lse;
    ToDlogits(lr, p.vp, lse, g[i], t);
    if (grads == nullptr) continue;
    for (int64_t j = 0; j < p.vp; j += kW) {
      Store(grads->bias + j, Load(grads->bias + j) + Load(lr + j));
    }
  }
  for (int64_t c = 0; c < p.vp; c += kChunk) {  // dx = dlogits W^T, a W^T panel in L1
    Gemm(n, d, std::min(kChunk, p.vp - c), l + c, ldl, wt + c * ldt, ldt, dxs, d, c > 0);
  }
  if (grads != nullptr) Gemm(d, p.vp, n, xt, n, l, ldl, grads->w, p.vp, true);  // dW += x^T dl
  for (int64_t r = 0; r < n; ++r) {
    std::memcpy(dx + p.rows[tile * kTile + r] * d, dxs + r * d, d * sizeof(float));
  }
}

// The split pass: dW[:, c : c + cw] and dbias[c : c + cw] (dw's row stride v) over every tile
// in order, each tile's logits of these columns made again and turned into dlogits with the
// tokens' log-sum-exp from the fused pass.
void HeadGradChunk(const Problem& p, const float* g, const float* lse, int64_t c, float* dw,
                   float* dbias) {
  const int64_t d = p.d, cw = std::min(kChunk, p.vp - c), valid = std::min(cw, p.v - c);
  float* xs = Scratch(kTile * (2 * d + kLdl) + d * kLdl + kLdl);
  float *xt = xs + kTile * d, *l = xt + kTile * d, *acc = l + kTile * kLdl, *bacc = acc + d * kLdl;
  std::fill(acc, acc + d * kLdl, 0.0f);
  std::fill(bacc, bacc + kLdl, 0.0f);
  for (int64_t tile = 0; tile < p.tiles(); ++tile) {
    const int64_t n = p.tile_rows(tile);
    GatherRows(p, tile, xs);
    Transpose(xs, n, d, xt);
    Logits(p, xs, n, c, cw, l, kLdl);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t i = p.rows[tile * kTile + r];
      float* lr = l + r * kLdl;
      ToDlogits(lr, cw, lse[i], g[i], p.targets[i] - c);
      for (int64_t j = 0; j < cw; j += kW) Store(bacc + j, Load(bacc + j) + Load(lr + j));
    }
    Gemm(d, cw, n, xt, n, l, kLdl, acc, kLdl, true);  // acc += x^T dlogits
  }
  const size_t bytes = valid * sizeof(float);
  for (int64_t r = 0; r < d; ++r) std::memcpy(dw + r * p.v + c, acc + r * kLdl, bytes);
  std::memcpy(dbias + c, bacc, bytes);
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::S32> targets,
                   ffi::Buffer<ffi::F32> weights, ffi::ResultBuffer<ffi::F32> nll) {
  Problem p;
  if (ffi::Error error = Setup(x, w, bias, targets, weights, p); error.failure()) return error;
  std::fill(nll->typed_data(), nll->typed_data() + p.n, 0.0f);
  ParallelFor(pool, p.tiles(), [&](int64_t t) { ForwardTile(p, t, nll->typed_data()); });
  ReleaseLarge();
  return ffi::Error::Success();
}

ffi::Error ForwardBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> bias,
                           ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> weights,
                           ffi::ResultBuffer<ffi::F32> nll, ffi::ResultBuffer<ffi::F32> dx,
                           ffi::ResultBuffer<ffi::F32> dw, ffi::ResultBuffer<ffi::F32> dbias,
                           int64_t grad_buffer_bytes) {
  Problem p;
  if (ffi::Error error = Setup(x, w, bias, targets, weights, p); error.failure()) return error;
  const int64_t d = p.d, vp = p.vp, v = p.v, ldt = d + kCols;
  float* wt = Kept(2, vp * ldt);
  ParallelFor(pool, (vp + kChunk - 1) / kChunk, [&](int64_t b) {  // W^T by column blocks
    for (int64_t c = b * kChunk; c < std::min(vp, (b + 1) * kChunk); ++c) {
      for (int64_t r = 0; r < d; ++r) wt[c * ldt + r] = p.w[r * p.ldw + c];
    }
  });
  std::fill(nll->typed_data(), nll->typed_data() + p.n, 0.0f);
  std::fill(dx->typed_data(), dx->typed_data() + p.n * d, 0.0f);
  const int64_t tiles = p.tiles();
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), tiles));
  const int64_t per = d * vp + vp;
  if (workers * per * static_cast<int64_t>(sizeof(float)) > grad_buffer_bytes) {
    float* lse = Kept(3, p.n);
    ParallelFor(pool, workers, [&](int64_t k) {
      for (int64_t t = tiles * k / workers; t < tiles * (k + 1) / workers; ++t) {
        FusedTile(p, wt, weights.typed_data(), t, nll->typed_data(), dx->typed_data(), nullptr,
                  lse);
      }
    });
    ParallelFor(pool, (vp + kChunk - 1) / kChunk, [&](int64_t b) {
      HeadGradChunk(p, weights.typed_data(), lse, b * kChunk, dw->typed_data(),
                    dbias->typed_data());
    });
    ReleaseLarge();
    return ffi::Error::Success();
  }
  float* buffers = Kept(3, workers * per);
  std::vector<Grads> grads(workers);
  ParallelFor(pool, workers, [&](int64_t k) {
    Grads& mine = grads[k];
    mine.w = buffers + k * per;
    mine.bias = mine.w + d * vp;
    std::fill(mine.w, mine.w + per, 0.0f);
    for (int64_t t = tiles * k / workers; t < tiles * (k + 1) / workers; ++t) {
      FusedTile(p, wt, weights.typed_data(), t, nll->typed_data(), dx->typed_data(), &mine,
                nullptr);
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

// x, head, bias, targets, weights: the arguments both handlers take.
static auto BindInputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmLossForward, Forward, BindInputs().Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmLossForwardBackward, ForwardBackward,
                              BindInputs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("grad_buffer_bytes"));
