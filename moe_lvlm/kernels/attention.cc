// Fused flash attention for XLA:CPU, called through the XLA FFI (native_attention.py).
//
// float32 only. q [b, s, h, d], k/v [b, s, kh, d] (query head i reads kv head i / (h / kh)),
// segment ids [b, s] int32 (0 = padding: attends to nothing and is attended by nothing), causal
// or not. Score tiles of kTile x kTile (16 to 64 tokens, by length) stay in cache from the dot
// that makes them to the dots that consume them; causal tiles above the diagonal are skipped. A
// query that sees no key outputs 0 and gets log-sum-exp +inf.
//
// The *Rope* entry points also take positions [b, s] int32 and inv_freq [r / 2] float32 and
// apply rotary embedding (HF rotate_half over the first r features) to q and k as their rows are
// loaded: angle = float(position) * inv_freq[j], cos / sin tabled once per call. Their backward
// rotates q and k the same way and returns dq / dk with respect to the un-rotated inputs (the
// transposed rotation: by -angle). The *NormRope* ones also take the q and k scales [d] of an
// RMSNorm over the head (qk-norm) applied before the rotation, and their backward adds the
// scales' per-task partial gradients [b * kh, 2, d] (summed by the caller).
//
// Forward: one task per (batch, kv head, query tile), covering the kv head's query heads.
// Backward (FA2: delta = rowsum(dO * O), P recomputed from the log-sum-exp): one task per
// (batch, kv head), which owns dq of its query heads and dk / dv of its kv head, so nothing is
// recomputed twice and nothing needs atomics. Tasks run on XLA's intra-op thread pool
// (xla::ffi::ThreadPool).

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace {

using namespace moe_lvlm;  // NOLINT: the shared vector helpers

constexpr float kMasked = -1e30f;  // score of a masked pair (finite: no inf arithmetic)

struct Shape {
  int64_t b, s, h, kh, d;
  int64_t group() const { return h / kh; }
  int64_t tiles(int64_t tile) const { return (s + tile - 1) / tile; }
};

// Rotary embedding: rows of cos[half] then sin[half], one per position value (index: the
// positions [b, s]) or, where the positions are negative or large, one per token (index null);
// table null = no rotation.
struct Rope {
  const float* table = nullptr;
  const int32_t* index = nullptr;
  int64_t half = 0;
  const float* row(const Shape& sh, int64_t bi, int64_t r) const {
    const int64_t token = bi * sh.s + r;
    return table + (index ? index[token] : token) * 2 * half;
  }
};

// dst = x rotated by the angles of `cs` (cos[half], sin[half]) over its first 2 * half features,
// by minus them if `inverse`; the rest copied. dst must not alias x.
template <int D>
inline void Rotate(const float* x, const float* cs, int64_t half, bool inverse, float* dst) {
  const float sign = inverse ? -1.0f : 1.0f;
  for (int64_t j = 0; j < half; ++j) {
    const float c = cs[j], sn = sign * cs[half + j], a = x[j], b = x[j + half];
    dst[j] = a * c - b * sn;
    dst[j + half] = b * c + a * sn;
  }
  for (int64_t j = 2 * half; j < D; ++j) dst[j] = x[j];
}

// What is done to a q or k row as it is loaded: RMSNorm over the head (x / rms(x) * scale, if
// scale), then the rotation of `rope`.
struct Prep {
  Rope rope;
  const float* scale = nullptr;
  float eps = 0.0f;
  bool any() const { return rope.table || scale; }
};

// 1 / rms of x [D] (RMSNorm's, with eps).
template <int D>
inline float InvRms(const float* x, float eps) {
  float ss = 0.0f;
  for (int c = 0; c < D; ++c) ss += x[c] * x[c];
  return 1.0f / std::sqrt(ss / D + eps);
}

// Row `row` of batch row bi, x [D], prepared by `prep` in buf [2 D]; returns where it is.
template <int D>
inline const float* Prepare(const float* x, const Prep& prep, const Shape& sh, int64_t bi,
                            int64_t row, float* buf) {
  if (prep.scale) {
    const float r = InvRms<D>(x, prep.eps);
    for (int c = 0; c < D; ++c) buf[c] = x[c] * r * prep.scale[c];
    x = buf;
  }
  if (prep.rope.table) {
    Rotate<D>(x, prep.rope.row(sh, bi, row), prep.rope.half, false, buf + D);
    x = buf + D;
  }
  return x;
}

// out[i][j] = a[i] . bt[:, j] for rows i < n (n even, a zero-padded) and the kTile columns of
// bt [D, kTile]; two rows and half a tile of columns at a time, accumulators in registers.
template <int D, int64_t kTile>
void RowsTimesTile(const float* a, const float* bt, int64_t n, float* out) {
  constexpr int kTileV = kTile / kW;
  for (int64_t i = 0; i < n; i += 2) {
    for (int half = 0; half < 2; ++half) {
      V acc0[kTileV / 2] = {}, acc1[kTileV / 2] = {};
      for (int c = 0; c < D; ++c) {
        const V a0 = Splat(a[i * D + c]), a1 = Splat(a[(i + 1) * D + c]);
#pragma GCC unroll 4
        for (int v = 0; v < kTileV / 2; ++v) {
          const V b = Load(bt + c * kTile + (half * kTileV / 2 + v) * kW);
          acc0[v] += a0 * b;
          acc1[v] += a1 * b;
        }
      }
#pragma GCC unroll 4
      for (int v = 0; v < kTileV / 2; ++v) {
        Store(out + i * kTile + (half * kTileV / 2 + v) * kW, acc0[v]);
        Store(out + (i + 1) * kTile + (half * kTileV / 2 + v) * kW, acc1[v]);
      }
    }
  }
}

// kRows rows of D / kW accumulators: two rows while that stays within 8 registers.
template <int D>
constexpr int kRows = D <= 32 ? 2 : 1;

// dst[r] += sum_j coef[r * cs + j * js] * rows[j] over j < m, for r in [r0, r0 + R); rows [m, D].
template <int D, int R>
inline void RowBlock(const float* coef, int64_t cs, int64_t js, const float* rows, int64_t m,
                     int64_t r0, float* dst) {
  V acc[R][D / kW] = {};
  for (int64_t j = 0; j < m; ++j) {
#pragma GCC unroll 16
    for (int v = 0; v < D / kW; ++v) {
      const V x = Load(rows + j * D + v * kW);
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) acc[r][v] += Splat(coef[(r0 + r) * cs + j * js]) * x;
    }
  }
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < D / kW; ++v) {
      float* at = dst + (r0 + r) * D + v * kW;
      Store(at, Load(at) + acc[r][v]);
    }
  }
}

// dst[r] += sum_j coef[r * cs + j * js] * rows[j] over j < m, for r < n.
template <int D>
void Accumulate(const float* coef, int64_t cs, int64_t js, const float* rows, int64_t n, int64_t m,
                float* dst) {
  constexpr int R = kRows<D>;
  int64_t r = 0;
  for (; r + R <= n; r += R) RowBlock<D, R>(coef, cs, js, rows, m, r, dst);
  for (; r < n; ++r) RowBlock<D, 1>(coef, cs, js, rows, m, r, dst);
}

// Sets sc[i][j] to kMasked where query q0 + i may not see key k0 + j (other segment, padding,
// causality, or j >= nk); segk: the key tile's segment ids, 0 past nk.
template <int64_t kTile>
void MaskTile(const int32_t* seg, const int32_t* segk, int64_t q0, int64_t nq, int64_t k0,
              bool causal, float* sc) {
  constexpr int kTileV = kTile / kW;
  Vi index;
  for (int i = 0; i < kW; ++i) index[i] = i;
  for (int64_t i = 0; i < nq; ++i) {
    const int32_t sq = seg[q0 + i];
    const int32_t last = causal ? static_cast<int32_t>(q0 + i - k0) : static_cast<int32_t>(kTile);
    for (int v = 0; v < kTileV; ++v) {
      const Vi sk = LoadI(segk + v * kW);
      const Vi ok = (sk == sq) & (sk > 0) & ((index + v * kW) <= last);
      Store(sc + i * kTile + v * kW, ok ? Load(sc + i * kTile + v * kW) : Splat(kMasked));
    }
  }
}

// Rows [r0, r0 + n) of head `head` of x [b, s, heads, D] (batch row bi), prepared by `prep`
// (qk-norm, rotation), scaled, into dst [kTile, D]: zero past n (and dst's rows past n stay zero).
template <int D, int64_t kTile>
void LoadRows(const float* x, const Shape& sh, int64_t heads, int64_t bi, int64_t head, int64_t r0,
              int64_t n, float scale, float* dst, const Prep& prep = {}) {
  alignas(32) float buf[2 * D];
  for (int64_t r = 0; r < kTile; ++r) {
    const float* src = x + ((bi * sh.s + r0 + r) * heads + head) * D;
    if (r < n && prep.any()) src = Prepare<D>(src, prep, sh, bi, r0 + r, buf);
    for (int v = 0; v < D / kW; ++v) {
      Store(dst + r * D + v * kW, r < n ? Load(src + v * kW) * scale : V{});
    }
  }
}

// The same rows prepared and transposed (unscaled): dst [D, kTile].
template <int D, int64_t kTile>
void LoadRowsT(const float* x, const Shape& sh, int64_t heads, int64_t bi, int64_t head,
               int64_t r0, int64_t n, float* dst, const Prep& prep = {}) {
  alignas(32) float buf[2 * D];
  for (int64_t r = 0; r < kTile; ++r) {
    const float* src = x + ((bi * sh.s + r0 + r) * heads + head) * D;
    if (r < n && prep.any()) src = Prepare<D>(src, prep, sh, bi, r0 + r, buf);
    for (int c = 0; c < D; ++c) dst[c * kTile + r] = r < n ? src[c] : 0.0f;
  }
}

// Row `row` of dx [b, s, heads, D] (batch row bi) from the gradient src [D] of the prepared row:
// times scale, back through the rotation (by minus the angle) and the RMSNorm of `prep` (whose
// input row is read from x); the norm scale's gradient is added to dscale [D].
template <int D>
void StoreRow(const float* src, float scale, const Shape& sh, int64_t heads, int64_t bi,
              int64_t head, int64_t row, const Prep& prep, const float* x, float* dscale,
              float* dx) {
  const int64_t at = ((bi * sh.s + row) * heads + head) * D;
  float* dst = dx + at;
  if (!prep.any()) {
    for (int w = 0; w < D / kW; ++w) Store(dst + w * kW, Load(src + w * kW) * scale);
    return;
  }
  alignas(32) float g[D], h[D];
  for (int w = 0; w < D / kW; ++w) Store(g + w * kW, Load(src + w * kW) * scale);
  const float* dy = g;
  if (prep.rope.table) {
    Rotate<D>(g, prep.rope.row(sh, bi, row), prep.rope.half, true, prep.scale ? h : dst);
    dy = h;
  }
  if (!prep.scale) return;
  // y = x r w, r = 1 / rms(x): dx = r w dy - x r^3 <w dy, x> / D, dw += dy x r.
  const float* xr = x + at;
  const float r = InvRms<D>(xr, prep.eps);
  float dot = 0.0f;
  for (int c = 0; c < D; ++c) dot += prep.scale[c] * dy[c] * xr[c];
  const float coef = r * r * r * dot / D;
  for (int c = 0; c < D; ++c) {
    dscale[c] += dy[c] * xr[c] * r;
    dst[c] = r * prep.scale[c] * dy[c] - xr[c] * coef;
  }
}

template <int64_t kTile>
void LoadSegments(const int32_t* seg, int64_t k0, int64_t nk, int32_t* segk) {
  for (int64_t j = 0; j < kTile; ++j) segk[j] = j < nk ? seg[k0 + j] : 0;
}

// Whether any pair of the tile (queries [q0, q0 + nq), keys [k0, k0 + kTile)) is masked: not
// when every query and key is in one non-padding segment and the tile is below the diagonal.
template <int64_t kTile>
bool NeedsMask(const int32_t* seg, const int32_t* segk, int64_t q0, int64_t nq, int64_t k0,
               bool causal) {
  if (causal && k0 + kTile - 1 > q0) return true;
  const int32_t first = segk[0];
  if (first <= 0) return true;
  bool same = true;
  for (int64_t j = 0; j < kTile; ++j) same &= segk[j] == first;
  for (int64_t i = 0; i < nq; ++i) same &= seg[q0 + i] == first;
  return !same;
}

// One task: query tile qt of the query heads of kv head kvh in batch row bi, so that each key
// tile is transposed and loaded once for the whole group.
template <int D, int64_t kTile>
void ForwardTask(const float* q, const float* k, const float* v, const int32_t* seg_all,
                 const Shape& sh, const Prep& qp, const Prep& kp, bool causal, int64_t task,
                 float* out,
                 float* lse) {
  constexpr int kTileV = kTile / kW;
  const int64_t tiles = sh.tiles(kTile), group = sh.group();
  const int64_t qt = task % tiles, kvh = (task / tiles) % sh.kh, bi = task / tiles / sh.kh;
  const int64_t q0 = qt * kTile, nq = std::min(kTile, sh.s - q0), nq2 = nq + (nq & 1);
  const int32_t* seg = seg_all + bi * sh.s;
  // Per head of the group: scaled queries, output accumulator, row max and row sum.
  const int64_t per_head = 2 * kTile * D + 2 * kTile;
  float* kt = Scratch(2 * kTile * D + kTile * kTile + group * per_head);
  float *vs = kt + kTile * D, *sc = vs + kTile * D, *heads = sc + kTile * kTile;
  for (int64_t g = 0; g < group; ++g) {
    float* qs = heads + g * per_head;
    float *acc = qs + kTile * D, *m = acc + kTile * D, *l = m + kTile;
    std::fill(acc, acc + kTile * D, 0.0f);
    std::fill(m, m + kTile, kMasked);
    std::fill(l, l + kTile, 0.0f);
    LoadRows<D, kTile>(q, sh, sh.h, bi, kvh * group + g, q0, nq,
                       1.0f / std::sqrt(static_cast<float>(D)), qs, qp);
  }
  int32_t segk[kTile];
  const int64_t kend = causal ? q0 + nq : sh.s;
  for (int64_t k0 = 0; k0 < kend; k0 += kTile) {
    const int64_t nk = std::min(kTile, sh.s - k0);
    LoadRowsT<D, kTile>(k, sh, sh.kh, bi, kvh, k0, nk, kt, kp);
    LoadRows<D, kTile>(v, sh, sh.kh, bi, kvh, k0, nk, 1.0f, vs);
    LoadSegments<kTile>(seg, k0, nk, segk);
    const bool masked = NeedsMask<kTile>(seg, segk, q0, nq, k0, causal);
    for (int64_t g = 0; g < group; ++g) {
      float* qs = heads + g * per_head;
      float *acc = qs + kTile * D, *m = acc + kTile * D, *l = m + kTile;
      RowsTimesTile<D, kTile>(qs, kt, nq2, sc);
      if (masked) MaskTile<kTile>(seg, segk, q0, nq, k0, causal, sc);
      for (int64_t i = 0; i < nq; ++i) {
        float* s = sc + i * kTile;
        V mv = Load(s);
        for (int w = 1; w < kTileV; ++w) mv = mv > Load(s + w * kW) ? mv : Load(s + w * kW);
        const float mx = Max(mv);
        if (mx <= kMasked) {  // no key of this tile for this row
          for (int w = 0; w < kTileV; ++w) Store(s + w * kW, V{});
          continue;
        }
        const float m_new = std::max(m[i], mx);
        const float corr = Exp(Splat(m[i] - m_new))[0];
        V sum{};
        for (int w = 0; w < kTileV; ++w) {
          const V p = Exp(Load(s + w * kW) - m_new);
          Store(s + w * kW, p);
          sum += p;
        }
        l[i] = l[i] * corr + Sum(sum);
        m[i] = m_new;
        for (int w = 0; w < D / kW; ++w) {
          Store(acc + i * D + w * kW, Load(acc + i * D + w * kW) * corr);
        }
      }
      Accumulate<D>(sc, kTile, 1, vs, nq, nk, acc);  // acc += P V
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const int64_t hi = kvh * group + g;
    const float* acc = heads + g * per_head + kTile * D;
    const float *m = acc + kTile * D, *l = m + kTile;
    for (int64_t i = 0; i < nq; ++i) {
      float* dst = out + ((bi * sh.s + q0 + i) * sh.h + hi) * D;
      const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
      for (int w = 0; w < D / kW; ++w) Store(dst + w * kW, Load(acc + i * D + w * kW) * inv);
      lse[(bi * sh.h + hi) * sh.s + q0 + i] =
          l[i] > 0.0f ? m[i] + std::log(l[i]) : std::numeric_limits<float>::infinity();
    }
  }
}

template <int D, int64_t kTile>
void BackwardTask(const float* q, const float* k, const float* v, const int32_t* seg_all,
                  const float* out, const float* lse_all, const float* dout, const Shape& sh,
                  const Prep& qp, const Prep& kp, bool causal, int64_t task, float* dq, float* dk,
                  float* dv, float* dscale) {
  constexpr int kTileV = kTile / kW;
  const int64_t bi = task / sh.kh, kvh = task % sh.kh, tiles = sh.tiles(kTile);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int32_t* seg = seg_all + bi * sh.s;
  const int64_t padded = tiles * kTile;
  // The kv head's keys and values, whole rows: K [s, D], K^T and V^T [D, s] by tile; dK, dV.
  float* kc = Scratch(5 * padded * D + 4 * kTile * D + 3 * kTile * kTile);
  float *kt_all = kc + padded * D, *vt_all = kt_all + padded * D, *dk_acc = vt_all + padded * D;
  float *dv_acc = dk_acc + padded * D, *qs = dv_acc + padded * D;
  float *dos = qs + kTile * D, *os = dos + kTile * D, *dqs = os + kTile * D;
  float *p = dqs + kTile * D, *dp = p + kTile * kTile, *ds = dp + kTile * kTile;
  std::fill(dk_acc, dk_acc + 2 * padded * D, 0.0f);  // and dv_acc
  // This task's partial gradients of the q and k norm scales: dscale [b * kh, 2, D].
  float dsq[D] = {}, dsk[D] = {};
  std::vector<int32_t> seg_tiles(padded);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n = std::min(kTile, sh.s - t * kTile);
    LoadRows<D, kTile>(k, sh, sh.kh, bi, kvh, t * kTile, n, 1.0f, kc + t * kTile * D, kp);
    LoadRowsT<D, kTile>(k, sh, sh.kh, bi, kvh, t * kTile, n, kt_all + t * D * kTile, kp);
    LoadRowsT<D, kTile>(v, sh, sh.kh, bi, kvh, t * kTile, n, vt_all + t * D * kTile);
    LoadSegments<kTile>(seg, t * kTile, n, seg_tiles.data() + t * kTile);
  }
  float lse[kTile], delta[kTile];
  for (int64_t g = 0; g < sh.group(); ++g) {
    const int64_t hi = kvh * sh.group() + g;
    for (int64_t qt = 0; qt < tiles; ++qt) {
      const int64_t q0 = qt * kTile, nq = std::min(kTile, sh.s - q0), nq2 = nq + (nq & 1);
      LoadRows<D, kTile>(q, sh, sh.h, bi, hi, q0, nq, scale, qs, qp);
      LoadRows<D, kTile>(dout, sh, sh.h, bi, hi, q0, nq, 1.0f, dos);
      LoadRows<D, kTile>(out, sh, sh.h, bi, hi, q0, nq, 1.0f, os);
      for (int64_t i = 0; i < kTile; ++i) {
        lse[i] = i < nq ? lse_all[(bi * sh.h + hi) * sh.s + q0 + i] : 0.0f;
        V dl{};
        for (int w = 0; w < D / kW; ++w) {
          dl += Load(dos + i * D + w * kW) * Load(os + i * D + w * kW);
        }
        delta[i] = Sum(dl);
      }
      std::fill(dqs, dqs + kTile * D, 0.0f);
      const int64_t kend = causal ? q0 + nq : sh.s;
      for (int64_t k0 = 0; k0 < kend; k0 += kTile) {
        const int64_t nk = std::min(kTile, sh.s - k0);
        RowsTimesTile<D, kTile>(qs, kt_all + (k0 / kTile) * D * kTile, nq2, p);
        if (NeedsMask<kTile>(seg, seg_tiles.data() + k0, q0, nq, k0, causal)) {
          MaskTile<kTile>(seg, seg_tiles.data() + k0, q0, nq, k0, causal, p);
        }
        RowsTimesTile<D, kTile>(dos, vt_all + (k0 / kTile) * D * kTile, nq2, dp);
        for (int64_t i = 0; i < nq; ++i) {
          const bool seen = std::isfinite(lse[i]);
          for (int w = 0; w < kTileV; ++w) {
            const int64_t at = i * kTile + w * kW;
            const V pij = seen ? Exp(Load(p + at) - lse[i]) : V{};
            Store(p + at, pij);
            Store(ds + at, pij * (Load(dp + at) - delta[i]));
          }
        }
        Accumulate<D>(ds, kTile, 1, kc + k0 * D, nq, nk, dqs);         // dQ += dS K
        Accumulate<D>(p, 1, kTile, dos, nk, nq, dv_acc + k0 * D);      // dV += P^T dO
        Accumulate<D>(ds, 1, kTile, qs, nk, nq, dk_acc + k0 * D);      // dK += dS^T Q
      }
      for (int64_t i = 0; i < nq; ++i) {
        StoreRow<D>(dqs + i * D, scale, sh, sh.h, bi, hi, q0 + i, qp, q, dsq, dq);
      }
    }
  }
  for (int64_t r = 0; r < sh.s; ++r) {
    StoreRow<D>(dk_acc + r * D, 1.0f, sh, sh.kh, bi, kvh, r, kp, k, dsk, dk);
    StoreRow<D>(dv_acc + r * D, 1.0f, sh, sh.kh, bi, kvh, r, {}, v, nullptr, dv);
  }
  if (dscale) {
    std::copy(dsq, dsq + D, dscale + task * 2 * D);
    std::copy(dsk, dsk + D, dscale + task * 2 * D + D);
  }
}

ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                       const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::S32>& seg,
                       Shape& sh) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const auto sd = seg.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || sd.size() != 2) {
    return ffi::Error::InvalidArgument("native attention: q/k/v must be rank 4, segments rank 2");
  }
  sh = Shape{qd[0], qd[1], qd[2], kd[2], qd[3]};
  const bool ok = kd[0] == sh.b && kd[1] == sh.s && kd[3] == sh.d && vd[0] == kd[0] &&
                  vd[1] == kd[1] && vd[2] == kd[2] && vd[3] == kd[3] && sd[0] == sh.b &&
                  sd[1] == sh.s && sh.kh > 0 && sh.h % sh.kh == 0;
  if (!ok) {
    return ffi::Error::InvalidArgument("native attention: inconsistent q/k/v/segment shapes");
  }
  return ffi::Error::Success();
}

// Calls fn(integral_constant D, integral_constant tile) for the compiled head size d and the tile
// for sequence length s: smaller tiles waste less on causal and padded tiles at short lengths
// (16 up to 64 tokens, 32 up to 128), larger ones amortise the per-tile work at long ones.
template <typename F>
ffi::Error Dispatch(const Shape& sh, F&& fn) {
  auto with_tile = [&](auto d) {
    if (sh.s <= 64) {
      fn(d, std::integral_constant<int64_t, 16>{});
    } else if (sh.s <= 128) {
      fn(d, std::integral_constant<int64_t, 32>{});
    } else {
      fn(d, std::integral_constant<int64_t, 64>{});
    }
    return ffi::Error::Success();
  };
  switch (sh.d) {
    case 8: return with_tile(std::integral_constant<int, 8>{});
    case 16: return with_tile(std::integral_constant<int, 16>{});
    case 32: return with_tile(std::integral_constant<int, 32>{});
    case 64: return with_tile(std::integral_constant<int, 64>{});
    case 128: return with_tile(std::integral_constant<int, 128>{});
    default: return ffi::Error::InvalidArgument("native attention: head_dim not supported");
  }
}

// The rotary table of `rope` for positions [b, s] and inv_freq [half] (rope stays empty without
// positions); *table holds it. One row per position value 0 .. max (packed rows repeat them),
// unless that is more rows than tokens.
ffi::Error MakeRope(ffi::ThreadPool& pool, const Shape& sh, const ffi::Buffer<ffi::S32>* positions,
                    const ffi::Buffer<ffi::F32>* inv_freq, std::vector<float>* table, Rope* rope) {
  if (positions == nullptr) return ffi::Error::Success();
  const auto pd = positions->dimensions(), fd = inv_freq->dimensions();
  if (pd.size() != 2 || pd[0] != sh.b || pd[1] != sh.s || fd.size() != 1 || 2 * fd[0] > sh.d) {
    return ffi::Error::InvalidArgument(
        "native attention: positions must be [b, s] and inv_freq [r / 2] with r <= head_dim");
  }
  const int64_t half = fd[0], tokens = sh.b * sh.s;
  if (half == 0) return ffi::Error::Success();
  const int32_t* pos = positions->typed_data();
  const auto [lo, hi] = std::minmax_element(pos, pos + tokens);
  const bool by_value = tokens > 0 && *lo >= 0 && *hi < tokens;
  const int64_t rows = by_value ? *hi + 1 : tokens;
  table->resize(rows * 2 * half);
  const float* freq = inv_freq->typed_data();
  float* out = table->data();
  constexpr int64_t kChunk = 256;
  ParallelFor(pool, (rows + kChunk - 1) / kChunk, [&](int64_t chunk) {
    for (int64_t r = chunk * kChunk; r < std::min(rows, (chunk + 1) * kChunk); ++r) {
      const float p = static_cast<float>(by_value ? r : pos[r]);
      for (int64_t j = 0; j < half; ++j) {
        const float angle = p * freq[j];
        out[r * 2 * half + j] = std::cos(angle);
        out[r * 2 * half + half + j] = std::sin(angle);
      }
    }
  });
  *rope = Rope{table->data(), by_value ? pos : nullptr, half};
  return ffi::Error::Success();
}

// The optional inputs of the entry points: rotary embedding and the q / k RMSNorm scales [D].
struct Extras {
  const ffi::Buffer<ffi::S32>* positions = nullptr;
  const ffi::Buffer<ffi::F32>* inv_freq = nullptr;
  const ffi::Buffer<ffi::F32>* q_scale = nullptr;
  const ffi::Buffer<ffi::F32>* k_scale = nullptr;
  float eps = 0.0f;
};

// The q and k row preparations of `extras`; *table holds the rotary table.
ffi::Error MakePreps(ffi::ThreadPool& pool, const Shape& sh, const Extras& extras,
                     std::vector<float>* table, Prep* qp, Prep* kp) {
  Rope rope;
  if (ffi::Error error = MakeRope(pool, sh, extras.positions, extras.inv_freq, table, &rope);
      error.failure()) {
    return error;
  }
  *qp = Prep{rope};
  *kp = Prep{rope};
  if (extras.q_scale) {
    const auto qd = extras.q_scale->dimensions(), kd = extras.k_scale->dimensions();
    if (qd.size() != 1 || qd[0] != sh.d || kd.size() != 1 || kd[0] != sh.d) {
      return ffi::Error::InvalidArgument("native attention: q/k norm scales must be [head_dim]");
    }
    *qp = Prep{rope, extras.q_scale->typed_data(), extras.eps};
    *kp = Prep{rope, extras.k_scale->typed_data(), extras.eps};
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, const Extras& extras,
                       int32_t causal, ffi::ResultBuffer<ffi::F32> out,
                       ffi::ResultBuffer<ffi::F32> lse) {
  Shape sh;
  if (ffi::Error error = CheckShapes(q, k, v, seg, sh); error.failure()) return error;
  std::vector<float> table;
  Prep qp, kp;
  if (ffi::Error error = MakePreps(pool, sh, extras, &table, &qp, &kp); error.failure()) {
    return error;
  }
  return Dispatch(sh, [&](auto d, auto tile) {
    constexpr int D = decltype(d)::value;
    constexpr int64_t kTile = decltype(tile)::value;
    ParallelFor(pool, sh.b * sh.kh * sh.tiles(kTile), [&](int64_t t) {
      ForwardTask<D, kTile>(q.typed_data(), k.typed_data(), v.typed_data(), seg.typed_data(), sh,
                            qp, kp, causal != 0, t, out->typed_data(), lse->typed_data());
    });
  });
}

// dscale: null, or [b * kh, 2, D] per-task partial gradients of the q and k norm scales.
ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, const Extras& extras,
                        ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                        ffi::Buffer<ffi::F32> dout, int32_t causal,
                        ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv, float* dscale) {
  Shape sh;
  if (ffi::Error error = CheckShapes(q, k, v, seg, sh); error.failure()) return error;
  std::vector<float> table;
  Prep qp, kp;
  if (ffi::Error error = MakePreps(pool, sh, extras, &table, &qp, &kp); error.failure()) {
    return error;
  }
  return Dispatch(sh, [&](auto d, auto tile) {
    constexpr int D = decltype(d)::value;
    constexpr int64_t kTile = decltype(tile)::value;
    ParallelFor(pool, sh.b * sh.kh, [&](int64_t t) {
      BackwardTask<D, kTile>(q.typed_data(), k.typed_data(), v.typed_data(), seg.typed_data(),
                             out.typed_data(), lse.typed_data(), dout.typed_data(), sh, qp, kp,
                             causal != 0, t, dq->typed_data(), dk->typed_data(), dv->typed_data(),
                             dscale);
    });
  });
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, int32_t causal,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  return ForwardImpl(pool, q, k, v, seg, Extras{}, causal, out, lse);
}

ffi::Error RopeForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg,
                       ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::F32> inv_freq,
                       int32_t causal, ffi::ResultBuffer<ffi::F32> out,
                       ffi::ResultBuffer<ffi::F32> lse) {
  return ForwardImpl(pool, q, k, v, seg, Extras{&positions, &inv_freq}, causal, out, lse);
}

ffi::Error NormRopeForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                           ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                           ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::S32> positions,
                           ffi::Buffer<ffi::F32> inv_freq, ffi::Buffer<ffi::F32> q_scale,
                           ffi::Buffer<ffi::F32> k_scale, int32_t causal, float eps,
                           ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  const Extras extras{&positions, &inv_freq, &q_scale, &k_scale, eps};
  return ForwardImpl(pool, q, k, v, seg, extras, causal, out, lse);
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, int32_t causal,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  return BackwardImpl(pool, q, k, v, seg, Extras{}, out, lse, dout, causal, dq, dk, dv, nullptr);
}

ffi::Error RopeBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg,
                        ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::F32> inv_freq,
                        ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                        ffi::Buffer<ffi::F32> dout, int32_t causal,
                        ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv) {
  return BackwardImpl(pool, q, k, v, seg, Extras{&positions, &inv_freq}, out, lse, dout, causal,
                      dq, dk, dv, nullptr);
}

ffi::Error NormRopeBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::S32> positions,
                            ffi::Buffer<ffi::F32> inv_freq, ffi::Buffer<ffi::F32> q_scale,
                            ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> out,
                            ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                            int32_t causal, float eps, ffi::ResultBuffer<ffi::F32> dq,
                            ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                            ffi::ResultBuffer<ffi::F32> dscale) {
  const auto dd = dscale->dimensions();
  if (dd.size() != 3 || dd[0] != q.dimensions()[0] * k.dimensions()[2] || dd[1] != 2 ||
      dd[2] != q.dimensions()[3]) {
    return ffi::Error::InvalidArgument("native attention: dscale must be [b * kv_heads, 2, d]");
  }
  const Extras extras{&positions, &inv_freq, &q_scale, &k_scale, eps};
  return BackwardImpl(pool, q, k, v, seg, extras, out, lse, dout, causal, dq, dk, dv,
                      dscale->typed_data());
}

}  // namespace

// q, k, v, segment ids: the arguments both handlers start with.
static auto BindInputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeAttentionForward, Forward,
                              BindInputs()
                                  .Attr<int32_t>("causal")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeAttentionBackward, Backward,
                              BindInputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("causal")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The same with positions [b, s] int32 and inv_freq [r / 2] float32 after the segment ids.
static auto BindRopeInputs() {
  return BindInputs().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeAttentionRopeForward, RopeForward,
                              BindRopeInputs()
                                  .Attr<int32_t>("causal")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeAttentionRopeBackward, RopeBackward,
                              BindRopeInputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("causal")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The same with the q and k RMSNorm scales [d] after inv_freq (applied before the rotation), and
// the scales' per-task partial gradients [b * kv_heads, 2, d] as a fourth result of the backward.
static auto BindNormRopeInputs() {
  return BindRopeInputs().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeAttentionNormRopeForward, NormRopeForward,
                              BindNormRopeInputs()
                                  .Attr<int32_t>("causal")
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeAttentionNormRopeBackward, NormRopeBackward,
                              BindNormRopeInputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("causal")
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
