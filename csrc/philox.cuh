// The dropout RNG of every fused kernel (kernels/philox.py), bit for bit: Philox-4x32-10 exactly as
// Triton's `tl.randint4x(seed, counter)` computes it (triton/language/random.py).
//
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (g, 0, 0, 0), rounds = 10, four output words w0..w3
//   element (row, col) of a [rows, C] tensor: g = uint32(row * ceil(C / 4) + col / 4), word col % 4
//   uniform = (int32(w) < 0 ? ~int32(w) : int32(w)) * 4.6566127342e-10f   in [0, 1)
//   keep    = uniform >= p
//
// One Philox call gives the mask of four neighbouring elements (keep_bits4). __host__ __device__ so
// the CPU ops (tests) and the CUDA kernels share one code path.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define BRIDGE_HD __host__ __device__ __forceinline__
#else
#define BRIDGE_HD inline
#endif

namespace bridge {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
// Largest int32 times this rounds to a float below 1.0 (Triton's uint_to_uniform_float).
constexpr float kUint32ToUniform = 4.6566127342e-10f;

struct PhiloxWords {
  uint32_t w[4];
};

BRIDGE_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The four output words of Philox-4x32-10 for counter (counter, 0, 0, 0), key split from seed.
BRIDGE_HD PhiloxWords philox4x32_10(uint64_t seed, uint32_t counter) {
  uint32_t c0 = counter, c1 = 0u, c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffull);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t old_c0 = c0, old_c2 = c2;
    c0 = mulhi32(kPhiloxRoundB, old_c2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, old_c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * old_c2;
    c3 = kPhiloxRoundA * old_c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {{c0, c1, c2, c3}};
}

// Triton's uint_to_uniform_float for a 32-bit word: read as int32, fold negatives with ~, scale.
BRIDGE_HD float uint_to_uniform_float(uint32_t word) {
  int32_t v = static_cast<int32_t>(word);
  v = v < 0 ? ~v : v;
  return static_cast<float>(v) * kUint32ToUniform;
}

// U[0, 1) from the first word of counter `offset`: tl.rand(seed, offset) bit for bit.
BRIDGE_HD float philox_uniform(uint64_t seed, uint32_t offset) {
  return uint_to_uniform_float(philox4x32_10(seed, offset).w[0]);
}

// The Philox counter of the four elements (row, 4q .. 4q + 3) of a [rows, n_cols] tensor, col in
// that group: row * ceil(n_cols / 4) + col / 4, truncated to 32 bits.
BRIDGE_HD uint32_t dropout_group(int64_t row, int64_t col, int64_t n_cols) {
  const uint64_t g = static_cast<uint64_t>(row) * static_cast<uint64_t>((n_cols + 3) / 4) +
                     static_cast<uint64_t>(col / 4);
  return static_cast<uint32_t>(g);
}

// Keep bits of the four elements of group `group` (bit j: element 4q + j kept), one Philox call.
BRIDGE_HD uint32_t keep_bits4(uint64_t seed, uint32_t group, float p) {
  if (p <= 0.f) return 0xfu;
  const PhiloxWords r = philox4x32_10(seed, group);
  uint32_t bits = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < 4; ++j) bits |= (uint_to_uniform_float(r.w[j]) >= p ? 1u : 0u) << j;
  return bits;
}

}  // namespace bridge
