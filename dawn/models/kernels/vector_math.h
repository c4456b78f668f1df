// Vector helpers shared by dawn's native CPU kernels (see dawn/models/native.py): GCC's generic vector extension,
// 16 floats per vector (one AVX-512 register, two AVX2 registers elsewhere), so the same source builds for any
// x86-64 or ARM machine with `-march=native`.
#pragma once

#include <cstdint>
#include <cstring>

namespace dawn_kernels {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) {  // lane 0 to every lane: one broadcast instruction
  const vf v = {x};
  return __builtin_shuffle(v, vi{});
}
// lane l <-> lane l ^ width (constant shuffles: one instruction each)
inline vf swap_lanes_1(vf v) { return __builtin_shuffle(v, vi{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}); }
inline vf swap_lanes_2(vf v) { return __builtin_shuffle(v, vi{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}); }
inline vf swap_lanes_4(vf v) { return __builtin_shuffle(v, vi{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}); }
inline vf swap_lanes_8(vf v) { return __builtin_shuffle(v, vi{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}); }
inline vf swap_pairs(vf v) { return swap_lanes_1(v); }  // (x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...)

// exp(x) for x <= 0 and exactly 0 below -87 (so exp(-inf) = 0): Cephes expf's range reduction and
// polynomial, relative error ~1e-7.
inline vf exp_nonpositive(vf x) {
  const vi under = x < splat(-87.0f);
  x = under ? splat(-87.0f) : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const vf t = x * splat(1.44269504088896341f) + magic;
  const vf n = t - magic;
  const vi exponent = ((vi)t - (vi)magic + 127) << 23;
  const vf r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  vf y = splat(1.9875691500e-4f);
  y = y * r + splat(1.3981999507e-3f);
  y = y * r + splat(8.3334519073e-3f);
  y = y * r + splat(4.1665795894e-2f);
  y = y * r + splat(1.6666665459e-1f);
  y = y * r + splat(5.0000001201e-1f);
  y = y * r * r + r + splat(1.0f);
  y = y * (vf)exponent;
  return under ? splat(0.0f) : y;
}

// horizontal max / sum of a vector: a tree of lane swaps (a chain of 16 scalar steps would cost more than
// the query's multiply-adds)
inline vf max(vf a, vf b) { return a > b ? a : b; }
inline float max_lane(vf v) {
  v = max(v, swap_lanes_8(v));
  v = max(v, swap_lanes_4(v));
  v = max(v, swap_lanes_2(v));
  return max(v, swap_lanes_1(v))[0];
}
inline float sum_lanes(vf v) {
  v += swap_lanes_8(v);
  v += swap_lanes_4(v);
  v += swap_lanes_2(v);
  return (v + swap_lanes_1(v))[0];
}

}  // namespace dawn_kernels
