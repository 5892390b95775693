// CUDA row pass of the norm-fused LoRA linear (the twin of the Triton row kernels in
// kernels/norm_lora.py). Schemas and Meta kernels: ops.cpp. Dropout RNG: philox.cuh.
//
// Forward, one kernel (a CTA handles `rows` rows, the rows staged in shared memory):
//   mean, rstd (fp32 two-pass statistics), ln = (x - mean) * rstd * gamma' + beta  (RMSNorm:
//   x * rstd * gamma'; gamma' = gamma + 1 with zero_centered_gamma), ln written in x's dtype,
//   s[m, :] = keep(ln[m, :]) A^T / (1 - p)  (fp32; the mask from Philox, never stored).
// Backward, two kernels:
//   rows:    g = dln + dln_out; c1 = mean_k(xhat * gamma' g), c2 = mean_k(gamma' g);
//            dx = (gamma' g - xhat c1 - c2) * rstd           (RMSNorm: no c2 term)
//   columns: partials over row groups of dgamma = sum_m g xhat, dbeta = sum_m g and
//            dA = sum_m ds[m, :]^T keep(ln[m, :]) (ln recomputed from x, mean, rstd); the host
//            sums the partials (deterministic: no atomics).
// All loads and stores of rows are 16-byte vectors (K must be a multiple of 16 / sizeof(T)).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "philox.cuh"

namespace bridge {
namespace {

constexpr int kMaxThreads = 256;  // row kernels: up to 8 warps per CTA
constexpr int kMaxRows = 4;       // forward: rows per CTA sharing each read of A
constexpr int kRTile = 8;         // rank rows handled per pass / per grid.z slice
constexpr int kColWarps = 8;      // backward column kernel: warps (rows in flight) per CTA
constexpr int kMaxSmemBytes = 96 * 1024;  // forward row buffer (opt-in above 48 KiB; sm80: 163 KiB)

template <typename T>
struct Vec {
  static constexpr int kN = 16 / sizeof(T);  // elements per 16-byte vector
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[Vec<T>::kN]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int e = 0; e < Vec<T>::kN; ++e) out[e] = static_cast<float>(v[e]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[Vec<T>::kN]) {
  uint4 raw;
  T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int e = 0; e < Vec<T>::kN; ++e) v[e] = static_cast<T>(in[e]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// Sums each of v[0..N) over the CTA; every thread gets the totals. red: >= N * warps floats.
template <int N>
__device__ __forceinline__ void block_allreduce(float (&v)[N], float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
  }
  __syncthreads();  // red may still be read by a previous reduction
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) red[warp * N + i] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float s = 0.f;
    for (int w = 0; w < warps; ++w) s += red[w * N + i];
    v[i] = s;
  }
}

// Keep bits of the V elements (row, col .. col + V - 1), col a multiple of V: V / 4 Philox calls.
template <int V>
__device__ __forceinline__ uint32_t keep_bits_vec(uint64_t seed, int64_t row, int col, int n_cols,
                                                  float p) {
  static_assert(V % 4 == 0 && V <= 32, "a vector holds whole groups of four elements");
  uint32_t keep = 0u;
#pragma unroll
  for (int q = 0; q < V / 4; ++q) {
    keep |= keep_bits4(seed, dropout_group(row, col + 4 * q, n_cols), p) << (4 * q);
  }
  return keep;
}

// The normalized value; one function so that forward and backward round ln identically.
__device__ __forceinline__ float norm_apply(float xv, float mu, float rs, float g, float b) {
  return (xv - mu) * rs * g + b;
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) norm_lora_row_fwd_kernel(
    const T* __restrict__ x,         // [M, K] contiguous: norm input
    const T* __restrict__ gamma,     // [K]: norm weight (gamma - 1 with zero-centered gamma)
    const T* __restrict__ beta,      // [K] or nullptr: LayerNorm bias
    const T* __restrict__ lora_a,    // [R, K] contiguous
    const int64_t* __restrict__ seed_ptr,  // [1]: dropout seed
    T* __restrict__ ln,              // [M, K] out: normalized x
    float* __restrict__ mean_out,    // [M] out (0 for RMSNorm)
    float* __restrict__ rstd_out,    // [M] out
    float* __restrict__ s_out,       // [M, R] out: keep(ln) A^T / (1 - p)
    int64_t M, int K, int R, int rows_per_cta, float eps, float p, float gamma_shift, bool rms) {
  constexpr int V = Vec<T>::kN;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* rows_buf = reinterpret_cast<T*>(smem_raw);  // [rows_per_cta, K]: x, then keep(ln)
  __shared__ float red[(kMaxThreads / 32) * kMaxRows * kRTile];
  const int nvec = K / V;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows_per_cta;
  const int nrows = static_cast<int>(min(static_cast<int64_t>(rows_per_cta), M - row0));
  const uint64_t seed = p > 0.f ? static_cast<uint64_t>(*seed_ptr) : 0ull;
  const float inv_k = 1.f / static_cast<float>(K);

  for (int rr = 0; rr < nrows; ++rr) {
    const int64_t m = row0 + rr;
    const T* xr = x + m * K;
    T* buf = rows_buf + static_cast<int64_t>(rr) * K;
    float acc[1] = {0.f};
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      float f[V];
      load_vec(xr + v * V, f);
      *reinterpret_cast<uint4*>(buf + v * V) = *reinterpret_cast<const uint4*>(xr + v * V);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[0] += rms ? f[e] * f[e] : f[e];
    }
    block_allreduce<1>(acc, red);
    float mu = 0.f, rs;
    if (rms) {
      rs = rsqrtf(acc[0] * inv_k + eps);
    } else {
      mu = acc[0] * inv_k;
      float var[1] = {0.f};
      for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
        float f[V];
        load_vec(buf + v * V, f);
#pragma unroll
        for (int e = 0; e < V; ++e) var[0] += (f[e] - mu) * (f[e] - mu);
      }
      block_allreduce<1>(var, red);
      rs = rsqrtf(var[0] * inv_k + eps);
    }
    if (threadIdx.x == 0) {
      mean_out[m] = mu;
      rstd_out[m] = rs;
    }
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      float f[V], g[V], b[V], y[V];
      load_vec(buf + v * V, f);
      load_vec(gamma + v * V, g);
      if (beta != nullptr) {
        load_vec(beta + v * V, b);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) b[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < V; ++e) y[e] = static_cast<float>(static_cast<T>(norm_apply(f[e], mu, rs, g[e] + gamma_shift, b[e])));
      store_vec(ln + m * K + v * V, y);
      if (p > 0.f) {
        const uint32_t keep = keep_bits_vec<V>(seed, m, v * V, K, p);
#pragma unroll
        for (int e = 0; e < V; ++e) y[e] = (keep >> e) & 1u ? y[e] : 0.f;
      }
      store_vec(buf + v * V, y);  // each thread rewrites only the vectors it read
    }
  }
  __syncthreads();

  // s = keep(ln) A^T for the CTA's rows, kRTile rank rows at a time (A read once per CTA).
  const float inv_keep = 1.f / (1.f - p);
  for (int r0 = 0; r0 < R; r0 += kRTile) {
    float acc[kMaxRows * kRTile];
#pragma unroll
    for (int i = 0; i < kMaxRows * kRTile; ++i) acc[i] = 0.f;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      float l[kMaxRows][V];
#pragma unroll
      for (int rr = 0; rr < kMaxRows; ++rr) {
        if (rr < nrows) {
          load_vec(rows_buf + static_cast<int64_t>(rr) * K + v * V, l[rr]);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) l[rr][e] = 0.f;
        }
      }
#pragma unroll
      for (int j = 0; j < kRTile; ++j) {
        if (r0 + j < R) {
          float a[V];
          load_vec(lora_a + static_cast<int64_t>(r0 + j) * K + v * V, a);
#pragma unroll
          for (int rr = 0; rr < kMaxRows; ++rr) {
#pragma unroll
            for (int e = 0; e < V; ++e) acc[rr * kRTile + j] += l[rr][e] * a[e];
          }
        }
      }
    }
    block_allreduce<kMaxRows * kRTile>(acc, red);
#pragma unroll
    for (int i = 0; i < kMaxRows * kRTile; ++i) {
      const int rr = i / kRTile, j = i % kRTile;
      if (threadIdx.x == i && rr < nrows && r0 + j < R) s_out[(row0 + rr) * R + r0 + j] = acc[i] * inv_keep;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) norm_row_bwd_dx_kernel(
    const T* __restrict__ x,        // [M, K]: norm input
    const T* __restrict__ dln,      // [M, K]: gradient of ln through the linear (dX of the GEMM)
    const T* __restrict__ dln_out,  // [M, K] or nullptr: gradient of the returned ln
    const T* __restrict__ gamma,    // [K]
    const float* __restrict__ mean, const float* __restrict__ rstd,  // [M]
    T* __restrict__ dx,             // [M, K] out
    int K, float gamma_shift, bool rms) {
  constexpr int V = Vec<T>::kN;
  __shared__ float red[(kMaxThreads / 32) * 2];
  const int64_t m = blockIdx.x;
  const int nvec = K / V;
  const float mu = mean[m], rs = rstd[m], inv_k = 1.f / static_cast<float>(K);
  float c[2] = {0.f, 0.f};  // sum(xhat * wdy), sum(wdy)
  for (int pass = 0; pass < 2; ++pass) {
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int64_t o = m * K + v * V;
      float f[V], d[V], g[V];
      load_vec(x + o, f);
      load_vec(dln + o, d);
      load_vec(gamma + v * V, g);
      if (dln_out != nullptr) {
        float d2[V];
        load_vec(dln_out + o, d2);
#pragma unroll
        for (int e = 0; e < V; ++e) d[e] += d2[e];
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float xhat = (f[e] - mu) * rs;
        const float wdy = (g[e] + gamma_shift) * d[e];
        if (pass == 0) {
          c[0] += xhat * wdy;
          c[1] += wdy;
        } else {
          f[e] = (wdy - xhat * c[0] - c[1]) * rs;
        }
      }
      if (pass == 1) store_vec(dx + o, f);
    }
    if (pass == 0) {
      block_allreduce<2>(c, red);
      c[0] *= inv_k;
      c[1] = rms ? 0.f : c[1] * inv_k;
    }
  }
}

// Column-kernel epilogue: lane l of warp w holds q for columns tile0 + l*V + [0, V); sum over
// the kColWarps warps through shared memory and store the tile's columns below K.
template <int V>
__device__ __forceinline__ void reduce_warps_store(const float (&q)[V], float* red, float* out,
                                                   int64_t tile0, int K) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int kTileCols = 32 * V;
  __syncthreads();  // the previous quantity has been read
#pragma unroll
  for (int e = 0; e < V; ++e) red[warp * kTileCols + lane * V + e] = q[e];
  __syncthreads();
  for (int c = threadIdx.x; c < kTileCols; c += blockDim.x) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kColWarps; ++w) s += red[w * kTileCols + c];
    if (tile0 + c < K) out[tile0 + c] = s;
  }
}

template <typename T>
__global__ void __launch_bounds__(kColWarps * 32, 1) norm_lora_col_bwd_kernel(
    const T* __restrict__ x,        // [M, K]: norm input
    const T* __restrict__ dln,      // [M, K]: gradient of ln through the linear
    const T* __restrict__ dln_out,  // [M, K] or nullptr: gradient of the returned ln
    const T* __restrict__ gamma,    // [K]
    const T* __restrict__ beta,     // [K] or nullptr
    const float* __restrict__ mean, const float* __restrict__ rstd,  // [M]
    const float* __restrict__ ds,   // [M, R]: dS = s * dY B
    const int64_t* __restrict__ seed_ptr,  // [1]
    float* __restrict__ dgamma_part,  // [G, K] out
    float* __restrict__ dbeta_part,   // [G, K] out
    float* __restrict__ da_part,      // [G, R, K] out (before the 1 / (1 - p) scale)
    int64_t M, int K, int R, float p, float gamma_shift) {
  constexpr int V = Vec<T>::kN;
  __shared__ float red[kColWarps * 32 * V];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int col = (blockIdx.x * 32 + lane) * V;
  const bool valid = col < K;
  const int r0 = blockIdx.z * kRTile;
  const bool do_norm = blockIdx.z == 0;
  const int64_t G = gridDim.y;
  const uint64_t seed = p > 0.f ? static_cast<uint64_t>(*seed_ptr) : 0ull;
  float g[V], b[V], dg[V], db[V], da[kRTile][V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    g[e] = 0.f;
    b[e] = 0.f;
    dg[e] = 0.f;
    db[e] = 0.f;
#pragma unroll
    for (int j = 0; j < kRTile; ++j) da[j][e] = 0.f;
  }
  if (valid) {
    load_vec(gamma + col, g);
    if (beta != nullptr) load_vec(beta + col, b);
  }
  for (int64_t m = blockIdx.y * kColWarps + warp; valid && m < M; m += G * kColWarps) {
    const int64_t o = m * K + col;
    float f[V], d[V];
    load_vec(x + o, f);
    load_vec(dln + o, d);
    if (dln_out != nullptr) {
      float d2[V];
      load_vec(dln_out + o, d2);
#pragma unroll
      for (int e = 0; e < V; ++e) d[e] += d2[e];
    }
    const float mu = mean[m], rs = rstd[m];
    float dsr[kRTile];
#pragma unroll
    for (int j = 0; j < kRTile; ++j) dsr[j] = r0 + j < R ? ds[m * R + r0 + j] : 0.f;
    const uint32_t keep = p > 0.f ? keep_bits_vec<V>(seed, m, col, K, p) : 0xffffffffu;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float xhat = (f[e] - mu) * rs;
      dg[e] += d[e] * xhat;
      db[e] += d[e];
      float l = static_cast<float>(static_cast<T>(norm_apply(f[e], mu, rs, g[e] + gamma_shift, b[e])));
      if (!((keep >> e) & 1u)) l = 0.f;
#pragma unroll
      for (int j = 0; j < kRTile; ++j) da[j][e] += dsr[j] * l;
    }
  }

  // Sum the warps' partials through shared memory, one quantity at a time.
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * (32 * V);
  if (do_norm) {
    reduce_warps_store<V>(dg, red, dgamma_part + blockIdx.y * static_cast<int64_t>(K), tile0, K);
    reduce_warps_store<V>(db, red, dbeta_part + blockIdx.y * static_cast<int64_t>(K), tile0, K);
  }
#pragma unroll
  for (int j = 0; j < kRTile; ++j) {
    if (r0 + j < R) {
      reduce_warps_store<V>(da[j], red, da_part + (blockIdx.y * static_cast<int64_t>(R) + r0 + j) * K,
                            tile0, K);
    }
  }
}

__global__ void philox_uniform_kernel(const int64_t* __restrict__ seed_ptr,
                                      const int64_t* __restrict__ offsets, float* __restrict__ out,
                                      int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    out[i] = philox_uniform(static_cast<uint64_t>(*seed_ptr),
                            static_cast<uint32_t>(static_cast<uint64_t>(offsets[i])));
  }
}

// One thread per group of four elements of the [rows, cols] keep mask (one Philox call each).
__global__ void philox_keep_mask_kernel(const int64_t* __restrict__ seed_ptr,
                                        bool* __restrict__ out, int64_t rows, int64_t cols,
                                        float p) {
  const int64_t groups = (cols + 3) / 4;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * groups) return;
  const int64_t row = i / groups, col0 = (i % groups) * 4;
  const uint32_t bits =
      keep_bits4(static_cast<uint64_t>(*seed_ptr), dropout_group(row, col0, cols), p);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (col0 + j < cols) out[row * cols + col0 + j] = (bits >> j) & 1u;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

#define BRIDGE_DISPATCH_FLOATS(dtype, NAME, ...)                                          \
  switch (dtype) {                                                                        \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }                    \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__(); break; }                  \
    case at::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__(); break; }          \
    default: TORCH_CHECK(false, NAME ": dtype must be float32, float16 or bfloat16, got ", dtype); \
  }

// A contiguous tensor whose data starts on a 16-byte boundary (copies only when it must).
at::Tensor aligned16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

void check_row_input(const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), name, ": x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, name, ": x must be 2-D [M, K], got ", x.dim(), "-D");
  const int64_t vec = 16 / x.element_size();
  TORCH_CHECK(x.size(1) % vec == 0, name, ": K = ", x.size(1), " must be a multiple of ", vec,
              " (16-byte vectors)");
  TORCH_CHECK(x.size(1) * x.element_size() <= kMaxSmemBytes, name, ": K = ", x.size(1),
              " exceeds the row buffer (", kMaxSmemBytes, " bytes)");
}

int row_threads(int64_t k, int64_t vec) {
  const int64_t nvec = k / vec;
  int threads = 32;
  while (threads < kMaxThreads && threads < nvec) threads *= 2;
  return threads;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_lora_row_fwd_cuda(
    const at::Tensor& x_in, const at::Tensor& norm_weight, const std::optional<at::Tensor>& norm_bias,
    const at::Tensor& lora_a_in, const at::Tensor& seed, double eps, double dropout, bool rms,
    bool zero_centered_gamma) {
  check_row_input("norm_lora_row_fwd_cuda", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = aligned16(x_in), gamma = aligned16(norm_weight), lora_a = aligned16(lora_a_in);
  at::Tensor beta;
  if (norm_bias.has_value() && norm_bias->defined()) beta = aligned16(*norm_bias);
  const at::Tensor seed_t = seed.to(x.device(), at::kLong).contiguous();
  const int64_t M = x.size(0), K = x.size(1), R = lora_a.size(0);
  TORCH_CHECK(lora_a.size(1) == K && gamma.numel() == K, "norm_lora_row_fwd_cuda: shape mismatch");
  TORCH_CHECK(lora_a.scalar_type() == x.scalar_type() && gamma.scalar_type() == x.scalar_type(),
              "norm_lora_row_fwd_cuda: x, norm_weight and lora_a must share one dtype");
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor ln = at::empty_like(x), mean = at::empty({M}, f32), rstd = at::empty({M}, f32);
  at::Tensor s = at::empty({M, R}, f32);
  if (M == 0) return {ln, mean, rstd, s};
  const int64_t row_bytes = K * x.element_size();
  int rows = M >= 4 * 1024 ? kMaxRows : 1;  // 4 rows share each read of A once the grid is full
  while (rows > 1 && rows * row_bytes > kMaxSmemBytes) --rows;
  const int64_t smem = rows * row_bytes;
  const int threads = row_threads(K, 16 / x.element_size());
  const int64_t grid = (M + rows - 1) / rows;
  auto stream = at::cuda::getCurrentCUDAStream();
  BRIDGE_DISPATCH_FLOATS(x.scalar_type(), "norm_lora_row_fwd_cuda", [&] {
    auto kernel = norm_lora_row_fwd_kernel<scalar_t>;
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    kernel<<<grid, threads, smem, stream>>>(
        x.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(),
        beta.defined() ? beta.data_ptr<scalar_t>() : nullptr, lora_a.data_ptr<scalar_t>(),
        seed_t.data_ptr<int64_t>(), ln.data_ptr<scalar_t>(), mean.data_ptr<float>(),
        rstd.data_ptr<float>(), s.data_ptr<float>(), M, static_cast<int>(K), static_cast<int>(R),
        rows, static_cast<float>(eps), static_cast<float>(dropout),
        zero_centered_gamma ? 1.f : 0.f, rms);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ln, mean, rstd, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_lora_row_bwd_cuda(
    const at::Tensor& x_in, const at::Tensor& dln_in, const std::optional<at::Tensor>& dln_out_in,
    const at::Tensor& norm_weight, const std::optional<at::Tensor>& norm_bias,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, const at::Tensor& ds_in,
    const at::Tensor& seed, double dropout, bool rms, bool zero_centered_gamma) {
  check_row_input("norm_lora_row_bwd_cuda", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = aligned16(x_in), gamma = aligned16(norm_weight);
  // Incoming gradients may be expanded (stride 0) or strided: materialise them row-major.
  const at::Tensor dln = aligned16(dln_in.to(x.scalar_type()));
  at::Tensor dln_out, beta;
  if (dln_out_in.has_value() && dln_out_in->defined()) dln_out = aligned16(dln_out_in->to(x.scalar_type()));
  if (norm_bias.has_value() && norm_bias->defined()) beta = aligned16(*norm_bias);
  const at::Tensor mean = mean_in.to(at::kFloat).contiguous(), rstd = rstd_in.to(at::kFloat).contiguous();
  const at::Tensor ds = ds_in.to(at::kFloat).contiguous();
  const at::Tensor seed_t = seed.to(x.device(), at::kLong).contiguous();
  const int64_t M = x.size(0), K = x.size(1), R = ds.size(1);
  TORCH_CHECK(dln.sizes() == x.sizes() && ds.size(0) == M && gamma.numel() == K,
              "norm_lora_row_bwd_cuda: shape mismatch");
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty_like(x);
  if (M == 0 || K == 0) {
    return {dx, at::zeros({K}, f32), at::zeros({K}, f32), at::zeros({R, K}, f32)};
  }
  const int64_t vec = 16 / x.element_size();
  const int64_t col_tiles = (K + 32 * vec - 1) / (32 * vec);
  const int64_t r_tiles = std::max<int64_t>(1, (R + kRTile - 1) / kRTile);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // Enough row groups to fill the GPU twice over, never more than the rows can feed.
  const int64_t groups = std::max<int64_t>(
      1, std::min<int64_t>((2 * sms + col_tiles * r_tiles - 1) / (col_tiles * r_tiles),
                           (M + kColWarps - 1) / kColWarps));
  at::Tensor dgamma_part = at::empty({groups, K}, f32), dbeta_part = at::empty({groups, K}, f32);
  at::Tensor da_part = at::empty({groups, R, K}, f32);
  auto stream = at::cuda::getCurrentCUDAStream();
  BRIDGE_DISPATCH_FLOATS(x.scalar_type(), "norm_lora_row_bwd_cuda", [&] {
    const scalar_t* dlo = dln_out.defined() ? dln_out.data_ptr<scalar_t>() : nullptr;
    norm_row_bwd_dx_kernel<scalar_t><<<M, row_threads(K, vec), 0, stream>>>(
        x.data_ptr<scalar_t>(), dln.data_ptr<scalar_t>(), dlo, gamma.data_ptr<scalar_t>(),
        mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr<scalar_t>(),
        static_cast<int>(K), zero_centered_gamma ? 1.f : 0.f, rms);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(groups),
                    static_cast<unsigned>(r_tiles));
    norm_lora_col_bwd_kernel<scalar_t><<<grid, kColWarps * 32, 0, stream>>>(
        x.data_ptr<scalar_t>(), dln.data_ptr<scalar_t>(), dlo, gamma.data_ptr<scalar_t>(),
        beta.defined() ? beta.data_ptr<scalar_t>() : nullptr, mean.data_ptr<float>(),
        rstd.data_ptr<float>(), ds.data_ptr<float>(), seed_t.data_ptr<int64_t>(),
        dgamma_part.data_ptr<float>(), dbeta_part.data_ptr<float>(), da_part.data_ptr<float>(), M,
        static_cast<int>(K), static_cast<int>(R), static_cast<float>(dropout),
        zero_centered_gamma ? 1.f : 0.f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor da = da_part.sum(0);
  if (dropout > 0.0) da.mul_(1.0 / (1.0 - dropout));
  return {dx, dgamma_part.sum(0), dbeta_part.sum(0), da};
}

at::Tensor philox_uniform_cuda(const at::Tensor& seed, const at::Tensor& offsets) {
  TORCH_CHECK(offsets.is_cuda(), "philox_uniform: offsets must be on the GPU for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(offsets.device());
  const at::Tensor offs = offsets.to(at::kLong).contiguous();
  const at::Tensor seed_t = seed.to(offsets.device(), at::kLong).contiguous();
  at::Tensor out = at::empty(offsets.sizes(), offsets.options().dtype(at::kFloat));
  const int64_t n = offs.numel();
  if (n > 0) {
    philox_uniform_kernel<<<(n + 255) / 256, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        seed_t.data_ptr<int64_t>(), offs.data_ptr<int64_t>(), out.data_ptr<float>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor philox_keep_mask_cuda(const at::Tensor& seed, int64_t rows, int64_t cols, double p) {
  TORCH_CHECK(seed.numel() == 1, "philox_keep_mask: seed must have one element");
  TORCH_CHECK(rows >= 0 && cols >= 0, "philox_keep_mask: rows and cols must be >= 0");
  const c10::cuda::CUDAGuard guard(seed.device());
  const at::Tensor seed_t = seed.to(at::kLong).contiguous();
  at::Tensor out = at::empty({rows, cols}, seed.options().dtype(at::kBool));
  const int64_t n = rows * ((cols + 3) / 4);
  if (n > 0) {
    philox_keep_mask_kernel<<<(n + 255) / 256, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        seed_t.data_ptr<int64_t>(), out.data_ptr<bool>(), rows, cols, static_cast<float>(p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace
}  // namespace bridge

TORCH_LIBRARY_IMPL(bridge, CUDA, m) {
  m.impl("philox_keep_mask", &bridge::philox_keep_mask_cuda);
  m.impl("philox_uniform", &bridge::philox_uniform_cuda);
  m.impl("norm_lora_row_fwd_cuda", &bridge::norm_lora_row_fwd_cuda);
  m.impl("norm_lora_row_bwd_cuda", &bridge::norm_lora_row_bwd_cuda);
}
