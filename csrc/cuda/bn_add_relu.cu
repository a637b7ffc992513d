// CUDA kernel of fused_resnet::bn_add_relu: out = act(y * scale[c] + shift[c] + residual),
// one pass with 16-byte packs where the layout allows (channel_kernels.cuh), math in fp32
// (fp64 for double inputs).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "channel_kernels.cuh"

namespace fused_resnet::cuda {
namespace {

template <typename scalar_t>
struct BnAddReluFn {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ y;
  const scalar_t* __restrict__ residual;  // may be null
  const acc_t* __restrict__ scale;
  const acc_t* __restrict__ shift;
  scalar_t* __restrict__ out;
  int64_t inner;
  bool relu;

  template <int VEC>
  __device__ void apply(int64_t i, int64_t c0) const {
    using P = Pack<scalar_t, VEC>;
    const P yv = *reinterpret_cast<const P*>(y + i);
    P rv;
    if (residual != nullptr) rv = *reinterpret_cast<const P*>(residual + i);
    P ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = lane_channel(c0, k, inner);
      acc_t v = static_cast<acc_t>(yv.v[k]) * scale[c] + shift[c];
      if (residual != nullptr) v += static_cast<acc_t>(rv.v[k]);
      if (relu) v = v < acc_t(0) ? acc_t(0) : v;  // keeps NaN, as torch.relu
      ov.v[k] = static_cast<scalar_t>(v);
    }
    *reinterpret_cast<P*>(out + i) = ov;
  }
};

at::Tensor bn_add_relu_cuda(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                            const std::optional<at::Tensor>& residual, bool relu) {
  const at::MemoryFormat format = check_bn_add_relu_args(y, scale, shift, residual);
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor y_c = y.contiguous(format);
  const at::Tensor r_c = residual.has_value() ? residual->contiguous(format) : at::Tensor();
  const at::Tensor scale_c = scale.to(acc_type_of(y)).contiguous();
  const at::Tensor shift_c = shift.to(acc_type_of(y)).contiguous();
  at::Tensor out = at::empty_like(y_c, y_c.options(), format);
  if (y_c.numel() == 0) return out;
  const ChannelView view = channel_view(y_c, format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_add_relu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BnAddReluFn<scalar_t> fn{
        y_c.const_data_ptr<scalar_t>(), r_c.defined() ? r_c.const_data_ptr<scalar_t>() : nullptr,
        scale_c.const_data_ptr<acc_t>(), shift_c.const_data_ptr<acc_t>(),
        out.mutable_data_ptr<scalar_t>(), view.inner, relu};
    launch_channel_elementwise<scalar_t>(fn, view, {fn.y, fn.residual, fn.out});
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) { m.impl("bn_add_relu", &bn_add_relu_cuda); }

}  // namespace fused_resnet::cuda
