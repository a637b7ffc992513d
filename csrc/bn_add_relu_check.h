// Argument checks shared by the CPU and CUDA implementations of bn_add_relu.
#pragma once
#include <ATen/ATen.h>

namespace fused_resnet {

// Validates shapes/dtypes/devices and returns the memory format the output takes (y's).
inline at::MemoryFormat check_bn_add_relu_args(const at::Tensor& y, const at::Tensor& scale,
                                               const at::Tensor& shift,
                                               const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(y.dim() == 4, "bn_add_relu: y must be 4-D (N, C, H, W), got ", y.dim(), "-D");
  const int64_t channels = y.size(1);
  TORCH_CHECK(scale.dim() == 1 && scale.numel() == channels, "bn_add_relu: scale must have shape (",
              channels, ",), got ", scale.sizes());
  TORCH_CHECK(shift.dim() == 1 && shift.numel() == channels, "bn_add_relu: shift must have shape (",
              channels, ",), got ", shift.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && shift.scalar_type() == at::kFloat,
              "bn_add_relu: scale and shift must be float32, got ", scale.scalar_type(), " and ",
              shift.scalar_type());
  TORCH_CHECK(scale.device() == y.device() && shift.device() == y.device(),
              "bn_add_relu: scale and shift must be on y's device ", y.device());
  if (residual.has_value()) {
    const at::Tensor& r = residual.value();
    TORCH_CHECK(r.sizes() == y.sizes(), "bn_add_relu: residual must have y's shape ", y.sizes(),
                ", got ", r.sizes());
    TORCH_CHECK(r.scalar_type() == y.scalar_type(), "bn_add_relu: residual dtype ",
                r.scalar_type(), " differs from y's ", y.scalar_type());
    TORCH_CHECK(r.device() == y.device(), "bn_add_relu: residual must be on y's device ", y.device());
  }
  return y.is_contiguous(at::MemoryFormat::ChannelsLast) && !y.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

}  // namespace fused_resnet
