// CPU kernel of fused_resnet::bn_add_relu: out = act(y * scale[c] + shift[c] + residual),
// one pass over memory, parallel over elements. Math in fp32 (fp64 for double inputs).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../bn_add_relu_check.h"

namespace fused_resnet {
namespace {

at::Tensor bn_add_relu_cpu(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                           const std::optional<at::Tensor>& residual, bool relu) {
  const at::MemoryFormat format = check_bn_add_relu_args(y, scale, shift, residual);
  const at::Tensor y_c = y.contiguous(format);
  const at::Tensor r_c = residual.has_value() ? residual->contiguous(format) : at::Tensor();
  at::Tensor out = at::empty_like(y_c, y_c.options(), format);
  const int64_t numel = y_c.numel();
  if (numel == 0) return out;
  const int64_t channels = y.size(1);
  const int64_t plane = y.size(2) * y.size(3);
  const bool nhwc = format == at::MemoryFormat::ChannelsLast;
  const float* scale_p = scale.contiguous().data_ptr<float>();
  const float* shift_p = shift.contiguous().data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_add_relu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* y_p = y_c.const_data_ptr<scalar_t>();
    const scalar_t* r_p = r_c.defined() ? r_c.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o_p = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, numel, 16384, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        // Channel of flat index i: innermost dim in NHWC, (i / (H*W)) mod C in NCHW.
        const int64_t c = nhwc ? i % channels : (i / plane) % channels;
        acc_t v = static_cast<acc_t>(y_p[i]) * scale_p[c] + shift_p[c];
        if (r_p != nullptr) v += static_cast<acc_t>(r_p[i]);
        if (relu) v = v > acc_t(0) ? v : acc_t(0);
        o_p[i] = static_cast<scalar_t>(v);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) { m.impl("bn_add_relu", &bn_add_relu_cpu); }

}  // namespace fused_resnet
