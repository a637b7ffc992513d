// CPU kernel of fused_resnet::bn_stats: per-channel mean and biased variance of y over
// (N, H, W) in one pass over memory. Each value is shifted by its channel's first value K
// (a sample, so close to the mean): with d = y - K, S1 = sum(d), S2 = sum(d^2) over n values,
//   mean = K + S1 / n,  var = S2 / n - (S1 / n)^2,
// which does not cancel catastrophically when |mean| >> std. Chunks of rows / planes sum in
// the math type and are flushed into per-thread fp64 sums (ChannelSums).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu_loops.h"

namespace fused_resnet::cpu {
namespace {

template <typename scalar_t>
void bn_stats_kernel(const ChannelView& view, const scalar_t* y, opmath<scalar_t>* mean,
                     opmath<scalar_t>* var) {
  using acc_t = opmath<scalar_t>;
  const int64_t channels = view.channels;
  std::vector<acc_t> shift(channels);
  for (int64_t c = 0; c < channels; ++c) shift[c] = static_cast<acc_t>(y[c * view.inner]);
  ChannelSums<2> sums(channels);
  // Terms d = y - K and d^2.
  reduce_two_sums<scalar_t>(
      view, shift.data(), sums,
      [&](int64_t i, const Vec<scalar_t>& k) {
        const Vec<scalar_t> d = load_vec(y + i) - k;
        return std::make_pair(d, d * d);
      },
      [&](int64_t i, acc_t k) {
        const acc_t d = static_cast<acc_t>(y[i]) - k;
        return std::make_pair(d, d * d);
      });

  const double n = static_cast<double>(view.per_channel());
  for (int64_t c = 0; c < channels; ++c) {
    const double m1 = sums.total(0, c) / n;
    mean[c] = static_cast<acc_t>(static_cast<double>(shift[c]) + m1);
    var[c] = static_cast<acc_t>(std::max(sums.total(1, c) / n - m1 * m1, 0.0));
  }
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& y) {
  const at::MemoryFormat format = check_bn_stats_args(y);
  const at::Tensor y_c = y.contiguous(format);
  const ChannelView view = channel_view(y_c, format);
  at::Tensor mean = at::empty({view.channels}, y.options().dtype(acc_type_of(y)));
  at::Tensor var = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_stats_cpu", [&] {
    using acc_t = opmath<scalar_t>;
    bn_stats_kernel<scalar_t>(view, y_c.const_data_ptr<scalar_t>(),
                              mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
  });
  return {mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) { m.impl("bn_stats", &bn_stats_cpu); }

}  // namespace fused_resnet::cpu
