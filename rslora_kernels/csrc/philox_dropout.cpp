// The project's dropout stream on the CPU, philox4x32-7-u16: Philox4x32-7 keyed by (seed, row, col),
// 16 bits of output per element.
//
// The definition lives in docs/design.md ("Dropout stream specification") and its executable form in
// rslora_kernels/dropout/stream.py; the Triton kernels follow it too, so all three produce the same
// mask bit for bit:
//   key     = (seed mod 2^32, seed >> 32)
//   counter = (col >> 3, row mod 2^32, row >> 32, 0)
//   element (row, col) takes 16-bit lane j = col & 7 of the call (bits 16*(j&1).. of output word j>>1)
//   and is kept iff lane >= round(p * 2^16) (ties to even).
// Dropping multiplies by 0 (x * keep * scale), so an Inf or NaN at a dropped position gives NaN.
//
// Ops (namespace rslora_kernels, registered as a fragment: Python custom ops share the namespace):
//   philox_keep_mask(seed, rows, cols, p, row_offset)  -> bool [rows, cols]
//   philox_dropout_scale(x, seed, p, scale)            -> x * keep * scale   (x: [M, K], any strides)
//   philox_dropout_scale_(x, seed, p, scale)           in place, same values
//   philox_dropout_scale_pair_(g, x, seed, p, g_scale, x_scale) -> x * keep * x_scale, and g *= keep * g_scale
//                                                      in place: backward's two uses of one mask in one pass
// Rows of x are rows of the stream (row 0 = x's first row); threads split the rows (at::parallel_for).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace rslora_kernels {
namespace {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // Philox multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
constexpr int kRounds = 7;
constexpr int64_t kLanes = 8;        // 16-bit lanes (elements) per Philox4x32 call
constexpr int64_t kGroupBlock = 16;  // column groups per inner batch: a loop the compiler vectorizes

// kRounds Philox rounds on kGroupBlock counters (group0 + g, row lo, row hi, 0), g = 0 .. kGroupBlock-1.
// Writes the eight 16-bit lanes of group g to out[8*g .. 8*g+7] (column order within the block): lane
// 2w + h is half h (0 low, 1 high) of output word w.
// The loop runs over independent counters with the rounds inside (fully unrolled), which is the
// shape the auto-vectorizer turns into SIMD 32x32->64 multiplies (baseline x86-64 SSE2: an AVX2 clone
// measured no faster, and -march=native is unsafe for a build cache shared by different CPUs).
inline void philox_block(uint32_t group0, uint32_t row_lo, uint32_t row_hi, const uint32_t* k0, const uint32_t* k1,
                         uint16_t* out) {
  for (int64_t g = 0; g < kGroupBlock; ++g) {
    uint32_t c0 = group0 + static_cast<uint32_t>(g), c1 = row_lo, c2 = row_hi, c3 = 0u;
#pragma GCC unroll 7
    for (int round = 0; round < kRounds; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(c0) * kM0;
      const uint64_t p1 = static_cast<uint64_t>(c2) * kM1;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0[round];
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1[round];
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      c0 = n0;
      c2 = n2;
    }
    const uint32_t words[4] = {c0, c1, c2, c3};
    for (int w = 0; w < 4; ++w) {
      out[kLanes * g + 2 * w] = static_cast<uint16_t>(words[w]);
      out[kLanes * g + 2 * w + 1] = static_cast<uint16_t>(words[w] >> 16);
    }
  }
}

// round(p * 2^16), ties to even, in [0, 2^16]: p * 2^16 and its fractional part are exact in a double,
// so this is the integer Python's round() gives (stream.drop_threshold), whatever the FPU rounding mode.
uint32_t threshold_of(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout p must be in [0, 1), got ", p);
  const double x = p * 65536.0;
  double t = std::floor(x);
  const double frac = x - t;
  if (frac > 0.5 || (frac == 0.5 && std::fmod(t, 2.0) != 0.0)) t += 1.0;
  return static_cast<uint32_t>(t);
}

void check_seed(int64_t seed) { TORCH_CHECK(seed >= 0, "seed must be in [0, 2^63), got ", seed); }

// Calls body(local_row, col0, n, lanes) for every run of n <= kLanes * kGroupBlock consecutive columns
// (col0 .. col0+n-1) of a [rows, cols] block whose first stream row is row_offset; lanes[j] is column
// col0 + j's 16-bit lane. uint64 arithmetic: row_offset + rows may pass 2^32, and the row's high word is
// the counter's c2. Bodies get a run, not an element, so their loops over it vectorize.
template <typename Body>
void for_each_lane_run(int64_t seed, int64_t rows, int64_t cols, uint64_t row_offset, const Body& body) {
  uint32_t k0[kRounds], k1[kRounds];  // the key of each round (bumped by the Weyl constants between rounds)
  k0[0] = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  k1[0] = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  for (int round = 1; round < kRounds; ++round) {
    k0[round] = k0[round - 1] + kW0;
    k1[round] = k1[round - 1] + kW1;
  }
  const int64_t cols_per_block = kLanes * kGroupBlock;
  // grain: about 16k elements per task so that small tensors stay on one thread
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    uint16_t lanes[kLanes * kGroupBlock];
    for (int64_t r = r0; r < r1; ++r) {
      const uint64_t row = row_offset + static_cast<uint64_t>(r);
      const uint32_t row_lo = static_cast<uint32_t>(row), row_hi = static_cast<uint32_t>(row >> 32);
      for (int64_t c0 = 0; c0 < cols; c0 += cols_per_block) {
        philox_block(static_cast<uint32_t>(c0 / kLanes), row_lo, row_hi, k0, k1, lanes);
        body(r, c0, std::min(cols_per_block, cols - c0), lanes);
      }
    }
  });
}

at::Tensor philox_keep_mask(int64_t seed, int64_t rows, int64_t cols, double p, int64_t row_offset) {
  check_seed(seed);
  TORCH_CHECK(rows >= 0 && cols >= 0, "rows and cols must be >= 0, got ", rows, " and ", cols);
  TORCH_CHECK(row_offset >= 0, "row_offset must be >= 0, got ", row_offset);
  const uint32_t threshold = threshold_of(p);
  at::Tensor out = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  bool* o = out.data_ptr<bool>();
  for_each_lane_run(seed, rows, cols, static_cast<uint64_t>(row_offset),
                    [&](int64_t r, int64_t c0, int64_t n, const uint16_t* lanes) {
                      bool* orow = o + r * cols + c0;
                      for (int64_t j = 0; j < n; ++j) orow[j] = lanes[j] >= threshold;
                    });
  return out;
}

void check_2d_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must have shape [M, K], got ", t.dim(), " dims");
  TORCH_CHECK(t.device().is_cpu(), "this is the CPU implementation; ", name, " is on ", t.device());
  TORCH_CHECK(t.is_floating_point(), name, " must be floating point, got ", t.scalar_type());
}

// out[r, c] = x[r, c] * (keep(r, c) ? scale : 0), computed in x's op-math type (float for 16-bit types),
// and, when `g` is given, g[r, c] *= keep(r, c) ? g_scale : 0 in place in the same pass (one mask
// generation for both). A multiply, not a select: Inf or NaN at a dropped position gives NaN. `out` may alias `x`: each element is read before it is written, by one thread.
void dropout_scale_into(const at::Tensor& x, at::Tensor& out, double scale, const at::Tensor* g, double g_scale,
                        int64_t seed, double p) {
  check_seed(seed);
  check_2d_cpu(x, "x");
  if (g != nullptr) {
    check_2d_cpu(*g, "g");
    TORCH_CHECK(g->sizes() == x.sizes(), "g must have x's shape ", x.sizes(), ", got ", g->sizes());
    TORCH_CHECK(g->scalar_type() == x.scalar_type(), "g must have x's dtype ", x.scalar_type(), ", got ", g->scalar_type());
  }
  const uint32_t threshold = threshold_of(p);
  const int64_t rows = x.size(0), cols = x.size(1);
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  const int64_t gs0 = g ? g->stride(0) : 0, gs1 = g ? g->stride(1) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "philox_dropout_scale", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t s = static_cast<opmath_t>(scale), gs = static_cast<opmath_t>(g_scale);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* gp = g ? g->data_ptr<scalar_t>() : nullptr;
    // Per run: the keep factor (1 or 0) of each column first, then the multiplies, so that a contiguous
    // row is a loop the compiler vectorizes. v * (k * s) is v * (keep ? s : 0) exactly (k * s is s or 0).
    const bool unit = xs1 == 1 && os1 == 1 && (gp == nullptr || gs1 == 1);
    for_each_lane_run(seed, rows, cols, 0, [&](int64_t r, int64_t c0, int64_t n, const uint16_t* lanes) {
      opmath_t k[kLanes * kGroupBlock];
      for (int64_t j = 0; j < n; ++j) k[j] = lanes[j] >= threshold ? opmath_t(1) : opmath_t(0);
      const scalar_t* xr = xp + r * xs0 + c0 * xs1;
      scalar_t* orow = op + r * os0 + c0 * os1;
      scalar_t* grow = gp != nullptr ? gp + r * gs0 + c0 * gs1 : nullptr;
      if (unit) {
        for (int64_t j = 0; j < n; ++j) orow[j] = static_cast<scalar_t>(static_cast<opmath_t>(xr[j]) * (k[j] * s));
        if (grow != nullptr)
          for (int64_t j = 0; j < n; ++j) grow[j] = static_cast<scalar_t>(static_cast<opmath_t>(grow[j]) * (k[j] * gs));
      } else {
        for (int64_t j = 0; j < n; ++j) {
          // read before write: out may alias x
          const opmath_t v = static_cast<opmath_t>(xr[j * xs1]);
          orow[j * os1] = static_cast<scalar_t>(v * (k[j] * s));
          if (grow != nullptr) {
            scalar_t& e = grow[j * gs1];
            e = static_cast<scalar_t>(static_cast<opmath_t>(e) * (k[j] * gs));
          }
        }
      }
    });
  });
}

at::Tensor philox_dropout_scale(const at::Tensor& x, int64_t seed, double p, double scale) {
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  dropout_scale_into(x, out, scale, nullptr, 0.0, seed, p);
  return out;
}

void philox_dropout_scale_(at::Tensor x, int64_t seed, double p, double scale) {
  dropout_scale_into(x, x, scale, nullptr, 0.0, seed, p);
}

at::Tensor philox_dropout_scale_pair_(at::Tensor g, const at::Tensor& x, int64_t seed, double p, double g_scale,
                                      double x_scale) {
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  dropout_scale_into(x, out, x_scale, &g, g_scale, seed, p);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rslora_kernels, m) {
  m.def("philox_keep_mask(int seed, int rows, int cols, float p, int row_offset=0) -> Tensor", &philox_keep_mask);
  m.def("philox_dropout_scale(Tensor x, int seed, float p, float scale) -> Tensor");
  m.def("philox_dropout_scale_(Tensor(a!) x, int seed, float p, float scale) -> ()");
  m.def("philox_dropout_scale_pair_(Tensor(a!) g, Tensor x, int seed, float p, float g_scale, float x_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(rslora_kernels, CPU, m) {
  m.impl("philox_dropout_scale", &philox_dropout_scale);
  m.impl("philox_dropout_scale_", &philox_dropout_scale_);
  m.impl("philox_dropout_scale_pair_", &philox_dropout_scale_pair_);
}

}  // namespace rslora_kernels
