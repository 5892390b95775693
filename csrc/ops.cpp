// Schemas of the bridge::* C++ ops, their CPU and Meta (shape-only) kernels, and the Python module
// entry point of bridge._C. The CUDA kernels live in norm_lora.cu.
//
// Ops (x is the 2-D [M, K] view of the norm input, r = lora_a.size(0)):
//   philox_uniform(seed, offsets) -> u           tl.rand(seed, offsets) bit for bit (CPU and CUDA)
//   philox_keep_mask(seed, rows, cols, p) -> keep  the dropout keep mask [rows, cols] bool of the
//                                                  convention in philox.cuh (CPU and CUDA)
//   norm_lora_row_fwd_cuda(x, norm_weight, norm_bias?, lora_a, seed, eps, dropout, rms,
//                          zero_centered_gamma) -> (ln [M,K] x.dtype, mean [M] f32, rstd [M] f32,
//                                                   s [M,r] f32 = keep(ln) A^T / (1-p))
//   norm_lora_row_bwd_cuda(x, dln, dln_out?, norm_weight, norm_bias?, mean, rstd, ds, seed, dropout,
//                          rms, zero_centered_gamma) -> (dx [M,K] x.dtype, dnorm_weight [K] f32,
//                                                        dnorm_bias [K] f32, da [r,K] f32)
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "philox.cuh"

namespace bridge {
namespace {

at::Tensor philox_uniform_cpu(const at::Tensor& seed, const at::Tensor& offsets) {
  TORCH_CHECK(seed.numel() == 1, "philox_uniform: seed must have one element");
  TORCH_CHECK(offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong,
              "philox_uniform: offsets must be int32 or int64, got ", offsets.scalar_type());
  const uint64_t s = static_cast<uint64_t>(seed.to(at::kCPU).to(at::kLong).item<int64_t>());
  // Offsets are truncated to 32 bits, as the kernels' int32 element index is.
  const at::Tensor offs = offsets.to(at::kLong).contiguous();
  at::Tensor out = at::empty(offsets.sizes(), offsets.options().dtype(at::kFloat));
  const int64_t* o = offs.data_ptr<int64_t>();
  float* u = out.data_ptr<float>();
  for (int64_t i = 0; i < offs.numel(); ++i) {
    u[i] = philox_uniform(s, static_cast<uint32_t>(static_cast<uint64_t>(o[i])));
  }
  return out;
}

at::Tensor philox_keep_mask_cpu(const at::Tensor& seed, int64_t rows, int64_t cols, double p) {
  TORCH_CHECK(seed.numel() == 1, "philox_keep_mask: seed must have one element");
  TORCH_CHECK(rows >= 0 && cols >= 0, "philox_keep_mask: rows and cols must be >= 0");
  const uint64_t s = static_cast<uint64_t>(seed.to(at::kLong).item<int64_t>());
  at::Tensor out = at::empty({rows, cols}, seed.options().dtype(at::kBool));
  bool* keep = out.data_ptr<bool>();
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t col0 = 0; col0 < cols; col0 += 4) {
      const uint32_t bits = keep_bits4(s, dropout_group(row, col0, cols), static_cast<float>(p));
      for (int64_t j = 0; j < 4 && col0 + j < cols; ++j) {
        keep[row * cols + col0 + j] = (bits >> j) & 1u;
      }
    }
  }
  return out;
}

at::Tensor philox_keep_mask_meta(const at::Tensor& seed, int64_t rows, int64_t cols, double p) {
  return at::empty({rows, cols}, seed.options().dtype(at::kBool));
}

at::Tensor philox_uniform_meta(const at::Tensor& seed, const at::Tensor& offsets) {
  return at::empty(offsets.sizes(), offsets.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_lora_row_fwd_meta(
    const at::Tensor& x, const at::Tensor& norm_weight, const std::optional<at::Tensor>& norm_bias,
    const at::Tensor& lora_a, const at::Tensor& seed, double eps, double dropout, bool rms,
    bool zero_centered_gamma) {
  TORCH_CHECK(x.dim() == 2, "norm_lora_row_fwd_cuda: x must be 2-D [M, K]");
  const auto m = x.size(0);
  const auto f32 = x.options().dtype(at::kFloat);
  return {at::empty_like(x, at::MemoryFormat::Contiguous), at::empty({m}, f32), at::empty({m}, f32),
          at::empty({m, lora_a.size(0)}, f32)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_lora_row_bwd_meta(
    const at::Tensor& x, const at::Tensor& dln, const std::optional<at::Tensor>& dln_out,
    const at::Tensor& norm_weight, const std::optional<at::Tensor>& norm_bias,
    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& ds, const at::Tensor& seed,
    double dropout, bool rms, bool zero_centered_gamma) {
  TORCH_CHECK(x.dim() == 2 && ds.dim() == 2, "norm_lora_row_bwd_cuda: x and ds must be 2-D");
  const auto k = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  return {at::empty_like(x, at::MemoryFormat::Contiguous), at::empty({k}, f32), at::empty({k}, f32),
          at::empty({ds.size(1), k}, f32)};
}

}  // namespace
}  // namespace bridge

TORCH_LIBRARY_FRAGMENT(bridge, m) {
  m.def("philox_uniform(Tensor seed, Tensor offsets) -> Tensor");
  m.def("philox_keep_mask(Tensor seed, int rows, int cols, float p) -> Tensor");
  m.def(
      "norm_lora_row_fwd_cuda(Tensor x, Tensor norm_weight, Tensor? norm_bias, Tensor lora_a, "
      "Tensor seed, float eps, float dropout, bool rms, bool zero_centered_gamma) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "norm_lora_row_bwd_cuda(Tensor x, Tensor dln, Tensor? dln_out, Tensor norm_weight, "
      "Tensor? norm_bias, Tensor mean, Tensor rstd, Tensor ds, Tensor seed, float dropout, "
      "bool rms, bool zero_centered_gamma) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bridge, CPU, m) {
  m.impl("philox_uniform", &bridge::philox_uniform_cpu);
  m.impl("philox_keep_mask", &bridge::philox_keep_mask_cpu);
}

TORCH_LIBRARY_IMPL(bridge, Meta, m) {
  m.impl("philox_uniform", &bridge::philox_uniform_meta);
  m.impl("philox_keep_mask", &bridge::philox_keep_mask_meta);
  m.impl("norm_lora_row_fwd_cuda", &bridge::norm_lora_row_fwd_meta);
  m.impl("norm_lora_row_bwd_cuda", &bridge::norm_lora_row_bwd_meta);
}

// `import bridge._C` only has to load this library (the static registrations above run then).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "bridge CUDA kernels", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
