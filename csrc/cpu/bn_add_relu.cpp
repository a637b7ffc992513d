// CPU kernel of fused_resnet::bn_add_relu: out = act(y * scale[c] + shift[c] + residual),
// one pass over memory, vectorized along each row (NHWC) or plane (NCHW), parallel over them.
// Math in fp32 (fp64 for double inputs).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu_loops.h"

namespace fused_resnet::cpu {
namespace {

template <typename scalar_t>
void bn_add_relu_line(const scalar_t* y, const scalar_t* r, scalar_t* out, int64_t count,
                      LineCoef<opmath<scalar_t>> scale, LineCoef<opmath<scalar_t>> shift,
                      bool relu) {
  using acc_t = opmath<scalar_t>;
  constexpr int64_t width = Vec<scalar_t>::size();
  const Vec<scalar_t> zero(acc_t(0));
  int64_t k = 0;
  for (; k + width <= count; k += width) {
    Vec<scalar_t> v = load_vec(y + k) * scale.vec(k) + shift.vec(k);
    if (r != nullptr) v = v + load_vec(r + k);
    if (relu) v = at::vec::maximum(v, zero);  // propagates NaN
    store_vec(out + k, v);
  }
  for (; k < count; ++k) {
    acc_t v = static_cast<acc_t>(y[k]) * scale.at(k) + shift.at(k);
    if (r != nullptr) v += static_cast<acc_t>(r[k]);
    if (relu) v = v < acc_t(0) ? acc_t(0) : v;  // keeps NaN, as torch.relu
    out[k] = static_cast<scalar_t>(v);
  }
}

at::Tensor bn_add_relu_cpu(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                           const std::optional<at::Tensor>& residual, bool relu) {
  const at::MemoryFormat format = check_bn_add_relu_args(y, scale, shift, residual);
  const at::Tensor y_c = y.contiguous(format);
  const at::Tensor r_c = residual.has_value() ? residual->contiguous(format) : at::Tensor();
  at::Tensor out = at::empty_like(y_c, y_c.options(), format);
  if (y_c.numel() == 0) return out;
  const ChannelView view = channel_view(y_c, format);
  const at::Tensor scale_c = scale.to(acc_type_of(y)).contiguous();
  const at::Tensor shift_c = shift.to(acc_type_of(y)).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_add_relu_cpu", [&] {
    using acc_t = opmath<scalar_t>;
    const scalar_t* y_p = y_c.const_data_ptr<scalar_t>();
    const scalar_t* r_p = r_c.defined() ? r_c.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o_p = out.mutable_data_ptr<scalar_t>();
    const acc_t* a = scale_c.const_data_ptr<acc_t>();
    const acc_t* b = shift_c.const_data_ptr<acc_t>();
    const int64_t channels = view.channels, inner = view.inner;
    parallel_lines(
        view,
        [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            const int64_t base = row * channels;
            bn_add_relu_line<scalar_t>(y_p + base, r_p ? r_p + base : nullptr, o_p + base,
                                       channels, {a, true}, {b, true}, relu);
          }
        },
        [&](int64_t begin, int64_t end) {
          for (int64_t line = begin; line < end; ++line) {
            const int64_t base = line * inner, c = line % channels;
            bn_add_relu_line<scalar_t>(y_p + base, r_p ? r_p + base : nullptr, o_p + base, inner,
                                       {a + c, false}, {b + c, false}, relu);
          }
        });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) { m.impl("bn_add_relu", &bn_add_relu_cpu); }

}  // namespace fused_resnet::cpu
