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
  constexpr int64_t width = Vec<scalar_t>::size();
  const int64_t channels = view.channels, inner = view.inner;
  std::vector<acc_t> shift(channels);
  for (int64_t c = 0; c < channels; ++c) shift[c] = static_cast<acc_t>(y[c * inner]);
  ChannelSums<2> sums(channels);

  auto rows = [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s1(channels, acc_t(0)), s2(channels, acc_t(0));
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* p = y + row * channels;
      int64_t k = 0;
      for (; k + width <= channels; k += width) {
        const Vec<scalar_t> d = load_vec(p + k) - Vec<scalar_t>::loadu(shift.data() + k);
        (Vec<scalar_t>::loadu(s1.data() + k) + d).store(s1.data() + k);
        (Vec<scalar_t>::loadu(s2.data() + k) + d * d).store(s2.data() + k);
      }
      for (; k < channels; ++k) {
        const acc_t d = static_cast<acc_t>(p[k]) - shift[k];
        s1[k] += d;
        s2[k] += d * d;
      }
      if ((row - begin + 1) % kRowsPerFlush == 0 || row == end - 1) {
        sums.flush<acc_t>({s1.data(), s2.data()});
      }
    }
  };
  auto planes = [&](int64_t begin, int64_t end) {
    double* t1 = sums.slot(0);
    double* t2 = sums.slot(1);
    for (int64_t line = begin; line < end; ++line) {
      const int64_t c = line % channels;
      const scalar_t* p = y + line * inner;
      const Vec<scalar_t> k_vec(shift[c]);
      Vec<scalar_t> v1(acc_t(0)), v2(acc_t(0));
      int64_t i = 0;
      for (; i + width <= inner; i += width) {
        const Vec<scalar_t> d = load_vec(p + i) - k_vec;
        v1 = v1 + d;
        v2 = v2 + d * d;
      }
      acc_t s1 = horizontal_sum(v1), s2 = horizontal_sum(v2);
      for (; i < inner; ++i) {
        const acc_t d = static_cast<acc_t>(p[i]) - shift[c];
        s1 += d;
        s2 += d * d;
      }
      t1[c] += s1;
      t2[c] += s2;
    }
  };
  parallel_lines(view, rows, planes);

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
