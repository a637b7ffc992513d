// CUDA kernel of fused_resnet::bn_stats: one pass over y in which every thread keeps a Welford
// (count, mean, M2) per channel, merged (Chan) across the block into one partial per block
// and channel, then a finalize kernel merges the partials in fp64:
//   mean = merged mean,  var = M2 / n (biased).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "channel_kernels.cuh"

namespace fused_resnet::cuda {
namespace {

template <typename scalar_t>
struct ReadValue {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ y;
  __device__ acc_t operator()(int64_t i, int64_t) const { return static_cast<acc_t>(y[i]); }
};

// One thread per channel merges its `splits` partials.
template <typename acc_t>
__global__ void stats_finalize_kernel(const WelfordAcc<acc_t>* partials, int64_t splits,
                                      int64_t channels, acc_t* mean, acc_t* var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double n = 0.0, m = 0.0, m2 = 0.0;
  for (int64_t s = 0; s < splits; ++s) {
    const WelfordAcc<acc_t> p = partials[s * channels + c];
    if (p.n == acc_t(0)) continue;
    const double pn = p.n, total = n + pn, d = static_cast<double>(p.mean) - m;
    m += d * (pn / total);
    m2 += static_cast<double>(p.m2) + d * d * (n * pn / total);
    n = total;
  }
  mean[c] = static_cast<acc_t>(m);
  var[c] = static_cast<acc_t>(m2 / n);
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& y) {
  const at::MemoryFormat format = check_bn_stats_args(y);
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor y_c = y.contiguous(format);
  const ChannelView view = channel_view(y_c, format);
  at::Tensor mean = at::empty({view.channels}, y.options().dtype(acc_type_of(y)));
  at::Tensor var = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto [work, splits] = reduce_channels<WelfordAcc<acc_t>>(
        ReadValue<scalar_t>{y_c.const_data_ptr<scalar_t>()}, view, y.options());
    const int threads = 128;
    stats_finalize_kernel<acc_t><<<(view.channels + threads - 1) / threads, threads, 0,
                                   c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const WelfordAcc<acc_t>*>(work.const_data_ptr()), splits, view.channels,
        mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) { m.impl("bn_stats", &bn_stats_cuda); }

}  // namespace fused_resnet::cuda
