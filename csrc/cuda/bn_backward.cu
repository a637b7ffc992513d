// CUDA kernel of fused_resnet::bn_act_backward (math with the schema in csrc/fused_resnet.cpp),
// the apex groupbn / MLPerf "BN + add + ReLU" backward in three launches:
//   1. partial sums S1 = sum(g), S2 = sum(g * (y - mean)) per block and channel,
//      g = dz * [z > 0] (the ReLU mask from the saved output);
//   2. per channel, in fp64: dbeta = S1, dgamma = rstd * S2 and the coefficients of
//      dy = A * g + B * (y - mean) + D: A = gamma * rstd, B = -A * rstd * dgamma / n,
//      D = -A * dbeta / n;
//   3. elementwise with 16-byte packs: dy, and dr = g when asked.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "channel_kernels.cuh"

namespace fused_resnet::cuda {
namespace {

// g = dz * [z > 0] when the block ends in a ReLU (relu), else dz.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t masked_grad(scalar_t dz, bool relu, scalar_t z) {
  return relu && static_cast<acc_t>(z) <= acc_t(0) ? acc_t(0) : static_cast<acc_t>(dz);
}

template <typename scalar_t>
struct ReadGradSums {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ dz;
  const scalar_t* __restrict__ z;  // null: no ReLU
  const scalar_t* __restrict__ y;
  const acc_t* __restrict__ mean;
  __device__ SumAcc<acc_t> operator()(int64_t i, int64_t c) const {
    const acc_t g = masked_grad<acc_t>(dz[i], z != nullptr, z != nullptr ? z[i] : dz[i]);
    return {g, g * (static_cast<acc_t>(y[i]) - mean[c])};
  }
};

template <typename acc_t>
__global__ void backward_finalize_kernel(const SumAcc<acc_t>* partials, int64_t splits,
                                         int64_t channels, double n, const acc_t* rstd,
                                         const acc_t* gamma, acc_t* dgamma, acc_t* dbeta,
                                         acc_t* coefs) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double s1 = 0.0, s2 = 0.0;
  for (int64_t s = 0; s < splits; ++s) {
    s1 += partials[s * channels + c].s1;
    s2 += partials[s * channels + c].s2;
  }
  const double r = rstd[c], dg = r * s2, a = static_cast<double>(gamma[c]) * r;
  dbeta[c] = static_cast<acc_t>(s1);
  dgamma[c] = static_cast<acc_t>(dg);
  coefs[c] = static_cast<acc_t>(a);
  coefs[channels + c] = static_cast<acc_t>(-a * r * dg / n);
  coefs[2 * channels + c] = static_cast<acc_t>(-a * s1 / n);
}

template <typename scalar_t>
struct BnBackwardApplyFn {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ dz;
  const scalar_t* __restrict__ z;  // null: no ReLU
  const scalar_t* __restrict__ y;
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ coefs;  // A, B, D: 3 x C
  scalar_t* __restrict__ dy;
  scalar_t* __restrict__ dr;  // null: not written
  int64_t channels, inner;

  template <int VEC>
  __device__ void apply(int64_t i, int64_t c0) const {
    using P = Pack<scalar_t, VEC>;
    const P dzv = *reinterpret_cast<const P*>(dz + i);
    const P yv = *reinterpret_cast<const P*>(y + i);
    P zv{};  // read only when z is given
    if (z != nullptr) zv = *reinterpret_cast<const P*>(z + i);
    P dyv, drv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = lane_channel(c0, k, inner);
      const acc_t g = masked_grad<acc_t>(dzv.v[k], z != nullptr, zv.v[k]);
      const acc_t centered = static_cast<acc_t>(yv.v[k]) - mean[c];
      dyv.v[k] = static_cast<scalar_t>(coefs[c] * g + coefs[channels + c] * centered +
                                       coefs[2 * channels + c]);
      drv.v[k] = static_cast<scalar_t>(g);
    }
    *reinterpret_cast<P*>(dy + i) = dyv;
    if (dr != nullptr) *reinterpret_cast<P*>(dr + i) = drv;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cuda(
    const at::Tensor& dz, const std::optional<at::Tensor>& z, const at::Tensor& y,
    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& gamma, bool write_dr) {
  const at::MemoryFormat format = check_bn_act_backward_args(dz, z, y, mean, rstd, gamma);
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor y_c = y.contiguous(format), dz_c = dz.contiguous(format);
  const at::Tensor z_c = z.has_value() ? z->contiguous(format) : at::Tensor();
  const ChannelView view = channel_view(y_c, format);
  const at::ScalarType acc = acc_type_of(y);
  const at::Tensor mean_c = mean.to(acc).contiguous(), rstd_c = rstd.to(acc).contiguous();
  const at::Tensor gamma_c = gamma.to(acc).contiguous();
  at::Tensor dy = at::empty_like(y_c, y_c.options(), format);
  at::Tensor dr = write_dr ? at::empty_like(y_c, y_c.options(), format) : at::empty({0}, y.options());
  at::Tensor dgamma = at::empty({view.channels}, y.options().dtype(acc));
  at::Tensor dbeta = at::empty_like(dgamma);
  at::Tensor coefs = at::empty({3, view.channels}, y.options().dtype(acc));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dz_p = dz_c.const_data_ptr<scalar_t>();
    const scalar_t* z_p = z_c.defined() ? z_c.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* y_p = y_c.const_data_ptr<scalar_t>();
    const acc_t* mean_p = mean_c.const_data_ptr<acc_t>();
    auto [work, splits] = reduce_channels<SumAcc<acc_t>>(
        ReadGradSums<scalar_t>{dz_p, z_p, y_p, mean_p}, view, y.options());
    const int threads = 128;
    backward_finalize_kernel<acc_t><<<(view.channels + threads - 1) / threads, threads, 0,
                                      c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const SumAcc<acc_t>*>(work.const_data_ptr()), splits, view.channels,
        static_cast<double>(view.per_channel()), rstd_c.const_data_ptr<acc_t>(),
        gamma_c.const_data_ptr<acc_t>(), dgamma.mutable_data_ptr<acc_t>(),
        dbeta.mutable_data_ptr<acc_t>(), coefs.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const BnBackwardApplyFn<scalar_t> fn{
        dz_p, z_p, y_p, mean_p, coefs.const_data_ptr<acc_t>(), dy.mutable_data_ptr<scalar_t>(),
        write_dr ? dr.mutable_data_ptr<scalar_t>() : nullptr, view.channels, view.inner};
    launch_channel_elementwise<scalar_t>(fn, view, {dz_p, z_p, y_p, fn.dy, fn.dr});
  });
  return {dy, dgamma, dbeta, dr};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) { m.impl("bn_act_backward", &bn_act_backward_cuda); }

}  // namespace fused_resnet::cuda
