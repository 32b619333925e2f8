// Fused routed SwiGLU experts for XLA:CPU, called through the XLA FFI (native_moe.py).
//
// float32. x [T, d], expert ids [T, k] int32 (-1: the pair is not computed: dropped by the
// capacity limit, or padding), combine weights [T, k], gate / up [E, d, f], down [E, f, d].
// y[t] = sum over computed pairs (t, j) of combine[t, j] * (silu(x Wg) * (x Wu)) Wd, the expert
// being ids[t, j]. d and f must be multiples of 16.
//
// The pairs are grouped by expert (counting sort, in token order) and cut into tiles of up to
// kTile rows of one expert; a tile's rows are gathered, its [kTile, f] hidden activations stay
// in cache through the three dots, and each pair's weighted output lands in a per-pair buffer
// that a last pass sums over the k choices (no two tasks write one row). The dots are
// register-blocked (dense.h). Under differentiation the forward
// also returns x Wg and x Wu of the computed pairs ([T * k, f] each, sorted by expert: what the
// routed path's backward keeps too, for its padded slots). The backward gives dx, d(combine)
// (= <dy_t, expert(x_t)>, through which the router trains) and the weight gradients; these
// reduce over tokens, so the tiles are split into one contiguous range per worker, each
// accumulating into its own [3, E, d, f] buffer for the experts it touches, summed in a fixed
// order at the end: deterministic, no atomics. Tasks run on XLA's
// intra-op thread pool (xla::ffi::ThreadPool).

#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "dense.h"

namespace {

using namespace moe_lvlm;  // NOLINT: the shared vector helpers

constexpr int64_t kTile = 48;  // rows of a tile (a multiple of kMr)

inline V Sigmoid(V x) { return 1.0f / (1.0f + Exp(-x)); }

struct Problem {
  int64_t t, k, d, f, e;
  const float *x, *combine, *wg, *wu, *wd;
  // The computed pairs (t * k + j) grouped by expert; tile i covers pairs
  // [tile_start[i], tile_start[i] + tile_rows[i]) of `pairs`, all of expert tile_expert[i].
  std::vector<int64_t> pairs, tile_start, tile_rows, tile_expert;
};

// Groups the computed pairs by expert and tiles them; false if an id is outside [-1, E).
bool Plan(const int32_t* ids, Problem& p) {
  std::vector<int64_t> count(p.e + 1, 0);
  for (int64_t i = 0; i < p.t * p.k; ++i) {
    if (ids[i] < -1 || ids[i] >= p.e) return false;
    if (ids[i] >= 0) ++count[ids[i] + 1];
  }
  for (int64_t e = 0; e < p.e; ++e) count[e + 1] += count[e];
  p.pairs.assign(count[p.e], 0);
  std::vector<int64_t> next(count.begin(), count.end() - 1);
  for (int64_t i = 0; i < p.t * p.k; ++i) {
    if (ids[i] >= 0) p.pairs[next[ids[i]]++] = i;
  }
  for (int64_t e = 0; e < p.e; ++e) {
    for (int64_t s = count[e]; s < count[e + 1]; s += kTile) {
      p.tile_start.push_back(s);
      p.tile_rows.push_back(std::min(kTile, count[e + 1] - s));
      p.tile_expert.push_back(e);
    }
  }
  return true;
}

// Rows of x (or dy) of the tile's pairs into dst [rows, d].
void GatherRows(const Problem& p, const float* src, int64_t tile, float* dst) {
  const int64_t* pr = p.pairs.data() + p.tile_start[tile];
  for (int64_t r = 0; r < p.tile_rows[tile]; ++r) {
    std::memcpy(dst + r * p.d, src + (pr[r] / p.k) * p.d, p.d * sizeof(float));
  }
}

// g [n, f] = x Wg, u = x Wu for the tile's rows xs [n, d].
void GateUp(const Problem& p, int64_t e, const float* xs, int64_t n, float* g, float* u) {
  Gemm(n, p.f, p.d, xs, p.d, p.wg + e * p.d * p.f, p.f, g, p.f, false);
  Gemm(n, p.f, p.d, xs, p.d, p.wu + e * p.d * p.f, p.f, u, p.f, false);
}

// saved_g / saved_u: [pairs, f] in sorted pair order, filled for the backward, or null.
void ForwardTile(const Problem& p, int64_t tile, float* y_pairs, float* saved_g,
                 float* saved_u) {
  const int64_t n = p.tile_rows[tile], e = p.tile_expert[tile], d = p.d, f = p.f;
  float* xs = Scratch(2 * kTile * d + 3 * kTile * f);
  float *o = xs + kTile * d, *h = o + kTile * d, *g = h + kTile * f, *u = g + kTile * f;
  if (saved_g != nullptr) {
    g = saved_g + p.tile_start[tile] * f;
    u = saved_u + p.tile_start[tile] * f;
  }
  GatherRows(p, p.x, tile, xs);
  GateUp(p, e, xs, n, g, u);
  for (int64_t i = 0; i < n * f; i += kW) {  // h = silu(g) * u
    const V gv = Load(g + i);
    Store(h + i, gv * Sigmoid(gv) * Load(u + i));
  }
  Gemm(n, d, f, h, f, p.wd + e * f * d, d, o, d, false);
  const int64_t* pr = p.pairs.data() + p.tile_start[tile];
  for (int64_t r = 0; r < n; ++r) {
    const V c = Splat(p.combine[pr[r]]);
    float* dst = y_pairs + pr[r] * d;
    for (int64_t w = 0; w < d; w += kW) Store(dst + w, Load(o + r * d + w) * c);
  }
}

// out[t] = sum_j pairs[t * k + j] over the computed pairs (0 if none), for a range of tokens.
void SumPairs(const Problem& p, const int32_t* ids, const float* pairs, int64_t t0, int64_t t1,
              float* out) {
  for (int64_t t = t0; t < t1; ++t) {
    float* dst = out + t * p.d;
    for (int64_t w = 0; w < p.d; w += kW) {
      V s{};
      for (int64_t j = 0; j < p.k; ++j) {
        if (ids[t * p.k + j] >= 0) s += Load(pairs + (t * p.k + j) * p.d + w);
      }
      Store(dst + w, s);
    }
  }
}

// Per-worker weight-gradient accumulators: [E, d, f] gate, [E, d, f] up, [E, f, d] down, for
// the experts the worker's tiles touch.
struct Grads {
  float *gate, *up, *down;
  std::vector<bool> touched;
};

struct Transposed {  // the weights transposed per expert: WgT, WuT [E, f, d], WdT [E, d, f]
  float *gate, *up, *down;
};

// saved_g / saved_u: the forward's x Wg and x Wu in sorted pair order.
void BackwardTile(const Problem& p, const Transposed& wt, const float* dy, const float* saved_g,
                  const float* saved_u, int64_t tile, float* dx_pairs, float* dcombine,
                  Grads& grads) {
  const int64_t n = p.tile_rows[tile], e = p.tile_expert[tile], d = p.d, f = p.f;
  float* xs = Scratch(3 * kTile * d + 4 * kTile * f + kTile * (d + f));
  float *dys = xs + kTile * d, *dxs = dys + kTile * d;
  float *dg = dxs + kTile * d, *du = dg + kTile * f, *dh = du + kTile * f, *h = dh + kTile * f;
  float *xt = h + kTile * f, *ht = xt + kTile * d;
  const float* g = saved_g + p.tile_start[tile] * f;
  const float* u = saved_u + p.tile_start[tile] * f;
  GatherRows(p, p.x, tile, xs);
  GatherRows(p, dy, tile, dys);
  Gemm(n, f, d, dys, d, wt.down + e * d * f, f, dh, f, false);  // dy Wd^T
  const int64_t* pr = p.pairs.data() + p.tile_start[tile];
  for (int64_t r = 0; r < n; ++r) {
    const float c = p.combine[pr[r]];
    V dc{};
    for (int64_t w = 0; w < f; w += kW) {
      const int64_t i = r * f + w;
      const V gv = Load(g + i), uv = Load(u + i), dhv = Load(dh + i);
      const V s = Sigmoid(gv), act = gv * s, hv = act * uv;
      dc += dhv * hv;  // <dy, h Wd> = <dy Wd^T, h>
      const V dhc = dhv * c;
      Store(h + i, hv * c);
      Store(du + i, dhc * act);
      Store(dg + i, dhc * uv * s * (1.0f + gv * (1.0f - s)));  // silu'(g) = s (1 + g (1 - s))
    }
    dcombine[pr[r]] = Sum(dc);
  }
  // dx = dg Wg^T + du Wu^T.
  Gemm(n, d, f, dg, f, wt.gate + e * f * d, d, dxs, d, false);
  Gemm(n, d, f, du, f, wt.up + e * f * d, d, dxs, d, true);
  for (int64_t r = 0; r < n; ++r) {
    std::memcpy(dx_pairs + pr[r] * d, dxs + r * d, d * sizeof(float));
  }
  // Weight gradients: x^T dg, x^T du, (c h)^T dy, contracting over the tile's n rows.
  Transpose(xs, n, d, xt);
  Transpose(h, n, f, ht);
  if (!grads.touched[e]) {
    for (float* buffer : {grads.gate, grads.up, grads.down}) {
      std::fill(buffer + e * d * f, buffer + (e + 1) * d * f, 0.0f);
    }
    grads.touched[e] = true;
  }
  Gemm(d, f, n, xt, n, dg, f, grads.gate + e * d * f, f, true);
  Gemm(d, f, n, xt, n, du, f, grads.up + e * d * f, f, true);
  Gemm(f, d, n, ht, n, dys, d, grads.down + e * f * d, d, true);
}

ffi::Error Setup(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::S32>& ids,
                 const ffi::Buffer<ffi::F32>& combine, const ffi::Buffer<ffi::F32>& wg,
                 const ffi::Buffer<ffi::F32>& wu, const ffi::Buffer<ffi::F32>& wd, Problem& p) {
  const auto xd = x.dimensions(), id = ids.dimensions(), cd = combine.dimensions();
  const auto gd = wg.dimensions(), ud = wu.dimensions(), dd = wd.dimensions();
  if (xd.size() != 2 || id.size() != 2 || cd.size() != 2 || gd.size() != 3 || ud.size() != 3 ||
      dd.size() != 3) {
    return ffi::Error::InvalidArgument(
        "native moe: x, ids, combine must be rank 2, expert weights rank 3");
  }
  p.t = xd[0];
  p.d = xd[1];
  p.k = id[1];
  p.e = gd[0];
  p.f = gd[2];
  const bool ok = id[0] == p.t && cd[0] == p.t && cd[1] == p.k && gd[1] == p.d &&
                  ud[0] == p.e && ud[1] == p.d && ud[2] == p.f && dd[0] == p.e &&
                  dd[1] == p.f && dd[2] == p.d;
  if (!ok) return ffi::Error::InvalidArgument("native moe: inconsistent shapes");
  if (p.d % (kNv * kW) || p.f % (kNv * kW)) {
    return ffi::Error::InvalidArgument("native moe: d and f must be multiples of 16");
  }
  p.x = x.typed_data();
  p.combine = combine.typed_data();
  p.wg = wg.typed_data();
  p.wu = wu.typed_data();
  p.wd = wd.typed_data();
  if (!Plan(ids.typed_data(), p)) {
    return ffi::Error::InvalidArgument("native moe: an expert id is outside [-1, num_experts)");
  }
  return ffi::Error::Success();
}

// Runs sum_pairs(t0, t1) over token blocks.
void ParallelTokens(ffi::ThreadPool& pool, int64_t t,
                    const std::function<void(int64_t, int64_t)>& fn) {
  constexpr int64_t kBlock = 256;
  ParallelFor(pool, (t + kBlock - 1) / kBlock, [&](int64_t b) {
    fn(b * kBlock, std::min(t, (b + 1) * kBlock));
  });
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> ids,
                   ffi::Buffer<ffi::F32> combine, ffi::Buffer<ffi::F32> wg,
                   ffi::Buffer<ffi::F32> wu, ffi::Buffer<ffi::F32> wd,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> saved_g,
                   ffi::ResultBuffer<ffi::F32> saved_u) {
  Problem p;
  if (ffi::Error error = Setup(x, ids, combine, wg, wu, wd, p); error.failure()) return error;
  // saved_g / saved_u are [T * k, f] when the backward will need them, else [0, f].
  const bool save = saved_g->dimensions()[0] > 0;
  float* g = save ? saved_g->typed_data() : nullptr;
  float* u = save ? saved_u->typed_data() : nullptr;
  float* y_pairs = Kept(0, p.t * p.k * p.d);  // read where computed only
  ParallelFor(pool, p.tile_start.size(), [&](int64_t i) {
    ForwardTile(p, i, y_pairs, g, u);
  });
  if (save) {  // rows past the computed pairs: defined, never read
    const int64_t used = p.pairs.size() * p.f, size = p.t * p.k * p.f;
    std::fill(g + used, g + size, 0.0f);
    std::fill(u + used, u + size, 0.0f);
  }
  ParallelTokens(pool, p.t, [&](int64_t t0, int64_t t1) {
    SumPairs(p, ids.typed_data(), y_pairs, t0, t1, y->typed_data());
  });
  ReleaseLarge();
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> ids,
                    ffi::Buffer<ffi::F32> combine, ffi::Buffer<ffi::F32> wg,
                    ffi::Buffer<ffi::F32> wu, ffi::Buffer<ffi::F32> wd,
                    ffi::Buffer<ffi::F32> saved_g, ffi::Buffer<ffi::F32> saved_u,
                    ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                    ffi::ResultBuffer<ffi::F32> dcombine, ffi::ResultBuffer<ffi::F32> dwg,
                    ffi::ResultBuffer<ffi::F32> dwu, ffi::ResultBuffer<ffi::F32> dwd) {
  Problem p;
  if (ffi::Error error = Setup(x, ids, combine, wg, wu, wd, p); error.failure()) return error;
  const int64_t d = p.d, f = p.f, ef = p.e * d * f;
  float* transposed = Kept(1, 3 * ef);
  const Transposed wt{transposed, transposed + ef, transposed + 2 * ef};
  ParallelFor(pool, p.e, [&](int64_t e) {
    Transpose(p.wg + e * d * f, d, f, wt.gate + e * d * f);
    Transpose(p.wu + e * d * f, d, f, wt.up + e * d * f);
    Transpose(p.wd + e * d * f, f, d, wt.down + e * d * f);
  });
  std::fill(dcombine->typed_data(), dcombine->typed_data() + p.t * p.k, 0.0f);
  float* dx_pairs = Kept(0, p.t * p.k * d);
  const int64_t tiles = p.tile_start.size();
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), tiles));
  float* grad_buffers = Kept(2, workers * 3 * ef);
  std::vector<Grads> grads(workers);
  ParallelFor(pool, workers, [&](int64_t w) {
    Grads& mine = grads[w];
    mine.gate = grad_buffers + w * 3 * ef;
    mine.up = mine.gate + ef;
    mine.down = mine.up + ef;
    mine.touched.assign(p.e, false);
    for (int64_t i = tiles * w / workers; i < tiles * (w + 1) / workers; ++i) {
      BackwardTile(p, wt, dy.typed_data(), saved_g.typed_data(), saved_u.typed_data(), i,
                   dx_pairs, dcombine->typed_data(), mine);
    }
  });
  ParallelTokens(pool, p.t, [&](int64_t t0, int64_t t1) {
    SumPairs(p, ids.typed_data(), dx_pairs, t0, t1, dx->typed_data());
  });
  // Weight gradients: the workers' buffers summed in worker order, by (expert, buffer).
  float* outs[3] = {dwg->typed_data(), dwu->typed_data(), dwd->typed_data()};
  ParallelFor(pool, 3 * p.e, [&](int64_t i) {
    const int64_t e = i / 3, which = i % 3;
    float* dst = outs[which] + e * d * f;
    std::fill(dst, dst + d * f, 0.0f);
    for (const Grads& g : grads) {
      if (!g.touched[e]) continue;
      const float* src = (which == 0 ? g.gate : which == 1 ? g.up : g.down) + e * d * f;
      for (int64_t j = 0; j < d * f; j += kW) Store(dst + j, Load(dst + j) + Load(src + j));
    }
  });
  ReleaseLarge();
  return ffi::Error::Success();
}

}  // namespace

// x, ids, combine, gate, up, down: the arguments both handlers start with.
static auto BindInputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeExpertsForward, Forward,
                              BindInputs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeExpertsBackward, Backward,
                              BindInputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
