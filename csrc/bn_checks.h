// Argument checks and the channel view shared by the CPU and CUDA kernels of the BN ops.
// Per-channel tensors (scale, shift, mean, rstd, gamma) are float32, or float64 when the
// activations are float64: the kernels do their math in that type ("acc" below).
#pragma once
#include <ATen/ATen.h>

namespace fused_resnet {

// A contiguous (N, C, H, W) tensor seen as (outer, channels, inner): NHWC memory is
// (N*H*W, C, 1), NCHW memory is (N, C, H*W). Element (o, c, i) sits at (o*C + c)*inner + i.
struct ChannelView {
  int64_t outer, channels, inner;
  int64_t per_channel() const { return outer * inner; }
};

// The memory format a 4-D tensor is in: channels_last when it is that and not also NCHW
// contiguous (C == 1 or H == W == 1 are both), else contiguous (NCHW).
inline at::MemoryFormat memory_format_of(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

inline ChannelView channel_view(const at::Tensor& t, at::MemoryFormat format) {
  const int64_t n = t.size(0), c = t.size(1), hw = t.size(2) * t.size(3);
  return format == at::MemoryFormat::ChannelsLast ? ChannelView{n * hw, c, 1}
                                                  : ChannelView{n, c, hw};
}

inline at::ScalarType acc_type_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_activation(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

// `other` has `like`'s shape, dtype and device.
inline void check_same(const char* op, const char* name, const at::Tensor& other,
                       const at::Tensor& like) {
  TORCH_CHECK(other.sizes() == like.sizes(), op, ": ", name, " must have y's shape ",
              like.sizes(), ", got ", other.sizes());
  TORCH_CHECK(other.scalar_type() == like.scalar_type(), op, ": ", name, " dtype ",
              other.scalar_type(), " differs from y's ", like.scalar_type());
  TORCH_CHECK(other.device() == like.device(), op, ": ", name, " must be on y's device ",
              like.device());
}

// `v` is a (C,) per-channel vector of y's acc type (float32 also accepted for float64 y).
inline void check_channel_vector(const char* op, const char* name, const at::Tensor& v,
                                 const at::Tensor& y) {
  const int64_t channels = y.size(1);
  TORCH_CHECK(v.dim() == 1 && v.numel() == channels, op, ": ", name, " must have shape (",
              channels, ",), got ", v.sizes());
  const bool ok = v.scalar_type() == at::kFloat ||
                  (v.scalar_type() == at::kDouble && y.scalar_type() == at::kDouble);
  TORCH_CHECK(ok, op, ": ", name, " must be float32 (or float64 for float64 y), got ",
              v.scalar_type());
  TORCH_CHECK(v.device() == y.device(), op, ": ", name, " must be on y's device ", y.device());
}

// bn_add_relu: returns the memory format the output takes (y's).
inline at::MemoryFormat check_bn_add_relu_args(const at::Tensor& y, const at::Tensor& scale,
                                               const at::Tensor& shift,
                                               const std::optional<at::Tensor>& residual) {
  check_activation("bn_add_relu", "y", y);
  check_channel_vector("bn_add_relu", "scale", scale, y);
  check_channel_vector("bn_add_relu", "shift", shift, y);
  if (residual.has_value()) check_same("bn_add_relu", "residual", *residual, y);
  return memory_format_of(y);
}

inline at::MemoryFormat check_bn_stats_args(const at::Tensor& y) {
  check_activation("bn_stats", "y", y);
  TORCH_CHECK(y.numel() > 0 && y.numel() / y.size(1) > 0,
              "bn_stats: y must have at least one value per channel, got shape ", y.sizes());
  return memory_format_of(y);
}

inline at::MemoryFormat check_bn_act_backward_args(const at::Tensor& dz,
                                                   const std::optional<at::Tensor>& z,
                                                   const at::Tensor& y, const at::Tensor& mean,
                                                   const at::Tensor& rstd,
                                                   const at::Tensor& gamma) {
  check_activation("bn_act_backward", "y", y);
  TORCH_CHECK(y.numel() > 0, "bn_act_backward: y must not be empty, got shape ", y.sizes());
  check_same("bn_act_backward", "dz", dz, y);
  if (z.has_value()) check_same("bn_act_backward", "z", *z, y);
  check_channel_vector("bn_act_backward", "mean", mean, y);
  check_channel_vector("bn_act_backward", "rstd", rstd, y);
  check_channel_vector("bn_act_backward", "gamma", gamma, y);
  return memory_format_of(y);
}

}  // namespace fused_resnet
