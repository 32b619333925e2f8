// RMSNorm over the last axis for XLA:CPU, called through the XLA FFI (native_norm.py).
//
// float32. x [rows, d], scale [d]: y = x * r * scale with r = 1 / sqrt(mean(x^2) + eps) per row.
// The forward also returns r [rows] for the backward, which gives
//   dx = r * (g - xhat * mean(g * xhat)),  g = dy * scale, xhat = x * r,
//   dscale = sum over rows of dy * xhat.
// Rows are cut into tasks by the shape alone (one per kTaskFloats elements, at most kMaxTasks)
// and run on XLA's intra-op thread pool; each backward task sums its rows' dscale terms into its
// own buffer and the buffers are added in task order, so dscale does not depend on the thread
// count or on scheduling. A call of less than 2 * kTaskFloats elements (the demo's 2560 x 128)
// runs on the calling thread: on the shared 2-core box a pool thread that takes a task and is
// then descheduled made the caller wait, and the demo's stage II norms took twice as long as
// single-threaded. Any d: 8 floats at a time, then a scalar tail.

#include <cmath>
#include <vector>

#include "cpu_common.h"

namespace {

using namespace moe_lvlm;  // NOLINT: the shared vector helpers

constexpr int64_t kTaskFloats = int64_t{1} << 18;  // 1 MB of x
constexpr int64_t kMaxTasks = 64;

struct Split {
  int64_t tasks, per_task;
};

Split SplitRows(int64_t rows, int64_t d) {
  const int64_t tasks = std::clamp<int64_t>(rows * d / kTaskFloats, 1, std::min(kMaxTasks, rows));
  return {tasks, (rows + tasks - 1) / tasks};
}

// sum(a * b) over n floats.
inline float Dot(const float* a, const float* b, int64_t n) {
  const int64_t nv = n - n % kW;
  V acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 2 * kW <= nv; i += 2 * kW) {
    acc0 += Load(a + i) * Load(b + i);
    acc1 += Load(a + i + kW) * Load(b + i + kW);
  }
  for (; i < nv; i += kW) acc0 += Load(a + i) * Load(b + i);
  float s = Sum(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void ForwardRows(const float* x, const float* scale, float eps, int64_t d, int64_t r0, int64_t r1,
                 float* y, float* rinv) {
  const int64_t nv = d - d % kW;
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    const float inv = 1.0f / std::sqrt(Dot(xr, xr, d) / static_cast<float>(d) + eps);
    rinv[r] = inv;
    const V vinv = Splat(inv);
    int64_t i = 0;
    for (; i < nv; i += kW) Store(yr + i, Load(xr + i) * vinv * Load(scale + i));
    for (; i < d; ++i) yr[i] = xr[i] * inv * scale[i];
  }
}

// dx of rows [r0, r1) and their dscale terms added into acc [d].
void BackwardRows(const float* x, const float* scale, const float* rinv, const float* dy,
                  int64_t d, int64_t r0, int64_t r1, float* dx, float* acc) {
  const int64_t nv = d - d % kW;
  for (int64_t r = r0; r < r1; ++r) {
    const float *xr = x + r * d, *dyr = dy + r * d;
    float* dxr = dx + r * d;
    const float inv = rinv[r];
    const V vinv = Splat(inv);
    // sum(g * xhat) = r * sum(dy * scale * x); the dscale terms dy * x * r on the way.
    V dot{};
    int64_t i = 0;
    for (; i < nv; i += kW) {
      const V dyx = Load(dyr + i) * Load(xr + i);
      dot += dyx * Load(scale + i);
      Store(acc + i, Load(acc + i) + dyx * vinv);
    }
    float s = Sum(dot);
    for (; i < d; ++i) {
      const float dyx = dyr[i] * xr[i];
      s += dyx * scale[i];
      acc[i] += dyx * inv;
    }
    // dx = r * g - x * r^3 * sum(g * x) / d.
    const float c = s * inv * inv * inv / static_cast<float>(d);
    const V vc = Splat(c);
    for (i = 0; i < nv; i += kW) {
      Store(dxr + i, Load(dyr + i) * Load(scale + i) * vinv - Load(xr + i) * vc);
    }
    for (; i < d; ++i) dxr[i] = dyr[i] * scale[i] * inv - xr[i] * c;
  }
}

ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& scale,
                       int64_t& rows, int64_t& d) {
  const auto xd = x.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || sd.size() != 1 || sd[0] != xd[1]) {
    return ffi::Error::InvalidArgument("native rms_norm: x must be [rows, d] and scale [d]");
  }
  rows = xd[0];
  d = xd[1];
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                   float eps, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> rinv) {
  int64_t rows, d;
  if (ffi::Error error = CheckShapes(x, scale, rows, d); error.failure()) return error;
  if (rows == 0 || d == 0) return ffi::Error::Success();
  const Split split = SplitRows(rows, d);
  ParallelFor(pool, split.tasks, [&](int64_t t) {
    const int64_t r0 = t * split.per_task, r1 = std::min(rows, r0 + split.per_task);
    ForwardRows(x.typed_data(), scale.typed_data(), eps, d, r0, r1, y->typed_data(),
                rinv->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> rinv, ffi::Buffer<ffi::F32> dy,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale) {
  int64_t rows, d;
  if (ffi::Error error = CheckShapes(x, scale, rows, d); error.failure()) return error;
  float* out = dscale->typed_data();
  std::fill(out, out + d, 0.0f);
  if (rows == 0 || d == 0) return ffi::Error::Success();
  const Split split = SplitRows(rows, d);
  std::vector<float> partial(split.tasks * d, 0.0f);
  ParallelFor(pool, split.tasks, [&](int64_t t) {
    const int64_t r0 = t * split.per_task, r1 = std::min(rows, r0 + split.per_task);
    BackwardRows(x.typed_data(), scale.typed_data(), rinv.typed_data(), dy.typed_data(), d, r0,
                 r1, dx->typed_data(), partial.data() + t * d);
  });
  for (int64_t t = 0; t < split.tasks; ++t) {
    for (int64_t i = 0; i < d; ++i) out[i] += partial[t * d + i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeRmsNormForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeRmsNormBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
