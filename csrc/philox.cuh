// Philox-4x32-10 exactly as Triton's `tl.rand(seed, offset)` computes it (triton/language/random.py),
// so a CUDA kernel and a Triton kernel draw the same dropout mask for the same (seed, element).
//
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (offset, 0, 0, 0)          offset = uint32(row * n_cols + col)
//   rounds  = 10; the first output word c0 is the random number
//   float   = (int32(c0) < 0 ? ~int32(c0) : int32(c0)) * 4.6566127342e-10f   in [0, 1)
//   keep    = float >= p
//
// __host__ __device__ so the CPU op bridge::philox_uniform (tests) and the kernels share one code path.
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

BRIDGE_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// First output word of Philox-4x32-10 for counter (offset, 0, 0, 0) and the key split from seed.
BRIDGE_HD uint32_t philox_first_word(uint64_t seed, uint32_t offset) {
  uint32_t c0 = offset, c1 = 0u, c2 = 0u, c3 = 0u;
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
  return c0;
}

// Triton's uint_to_uniform_float for a 32-bit word: read as int32, fold negatives with ~, scale.
BRIDGE_HD float uint_to_uniform_float(uint32_t word) {
  int32_t v = static_cast<int32_t>(word);
  v = v < 0 ? ~v : v;
  return static_cast<float>(v) * kUint32ToUniform;
}

// U[0, 1) for element `offset` of the stream `seed`: tl.rand(seed, offset) bit for bit.
BRIDGE_HD float philox_uniform(uint64_t seed, uint32_t offset) {
  return uint_to_uniform_float(philox_first_word(seed, offset));
}

// Whether element `offset` survives dropout with probability p (keep when rand >= p).
BRIDGE_HD bool dropout_keep(uint64_t seed, uint32_t offset, float p) {
  return p <= 0.f || philox_uniform(seed, offset) >= p;
}

}  // namespace bridge
