// Building blocks of the CUDA kernels over a ChannelView (csrc/bn_checks.h): per-channel
// reductions (a partial per block and channel, then a finalize over the partials) and a
// per-channel elementwise loop with 16-byte vector loads.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "../bn_checks.h"

namespace fused_resnet::cuda {

// VEC values of T moved as one 16-byte (or narrower) load / store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Running (count, mean, M2) of one channel; merge is Chan et al.'s pairwise combination:
//   n = na + nb, d = mb - ma, mean = ma + d * nb / n, M2 = M2a + M2b + d^2 * na * nb / n.
template <typename T>
struct WelfordAcc {
  T n, mean, m2;
  __device__ void add(T v) {
    n += T(1);
    const T d = v - mean;
    mean += d / n;
    m2 += d * (v - mean);
  }
  __device__ void merge(const WelfordAcc& o) {
    if (o.n == T(0)) return;
    if (n == T(0)) {
      *this = o;
      return;
    }
    const T total = n + o.n, d = o.mean - mean;
    mean += d * (o.n / total);
    m2 += o.m2 + d * d * (n * o.n / total);
    n = total;
  }
};

// Two plain sums of one channel.
template <typename T>
struct SumAcc {
  T s1, s2;
  __device__ void add(const SumAcc& o) { merge(o); }
  __device__ void merge(const SumAcc& o) {
    s1 += o.s1;
    s2 += o.s2;
  }
};

constexpr int kRowThreadsX = 32;  // NHWC: one warp across 32 consecutive channels...
constexpr int kRowThreadsY = 8;   // ...and 8 rows per block
constexpr int kPlaneThreads = 256;

// NHWC partial: block (bx, by) reduces channels bx*32 .. bx*32+31 over the rows
// by*8 + ty, stepping by gridDim.y*8. partials[by * C + c] receives the block's result.
template <typename Acc, typename Reader>
__global__ void reduce_rows_kernel(Reader read, int64_t rows, int64_t channels, Acc* partials) {
  __shared__ Acc shared[kRowThreadsY][kRowThreadsX];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kRowThreadsX + threadIdx.x;
  Acc acc{};
  if (c < channels) {
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * kRowThreadsY + threadIdx.y; row < rows;
         row += static_cast<int64_t>(gridDim.y) * kRowThreadsY) {
      acc.add(read(row * channels + c, c));
    }
  }
  shared[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    for (int k = 1; k < kRowThreadsY; ++k) acc.merge(shared[k][threadIdx.x]);
    partials[static_cast<int64_t>(blockIdx.y) * channels + c] = acc;
  }
}

// NCHW partial: block (c, by) reduces channel c over its outer*inner values e, the block's
// threads taking e = by*256 + t, stepping by gridDim.y*256; a shared-memory tree merges them.
template <typename Acc, typename Reader>
__global__ void reduce_planes_kernel(Reader read, int64_t outer, int64_t channels, int64_t inner,
                                     Acc* partials) {
  __shared__ Acc shared[kPlaneThreads];
  const int64_t c = blockIdx.x, per_channel = outer * inner;
  Acc acc{};
  for (int64_t e = static_cast<int64_t>(blockIdx.y) * kPlaneThreads + threadIdx.x;
       e < per_channel; e += static_cast<int64_t>(gridDim.y) * kPlaneThreads) {
    const int64_t o = e / inner;
    acc.add(read((o * channels + c) * inner + (e - o * inner), c));
  }
  shared[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kPlaneThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x].merge(shared[threadIdx.x + s]);
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[static_cast<int64_t>(blockIdx.y) * channels + c] = shared[0];
}

inline int multiprocessor_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Launches the partial reduction of `read` over the view and returns (workspace holding
// `splits` x C partials of Acc, splits). About 4 blocks per SM, at least 32 values each.
template <typename Acc, typename Reader>
std::pair<at::Tensor, int64_t> reduce_channels(const Reader& read, const ChannelView& v,
                                               const at::TensorOptions& options) {
  const int64_t target_blocks = 4 * static_cast<int64_t>(multiprocessor_count());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t splits;
  if (v.inner == 1) {
    const int64_t channel_blocks = (v.channels + kRowThreadsX - 1) / kRowThreadsX;
    splits = std::clamp<int64_t>(target_blocks / channel_blocks, 1,
                                 (v.outer + 32 * kRowThreadsY - 1) / (32 * kRowThreadsY));
    splits = std::min<int64_t>(splits, 65535);
    at::Tensor work = at::empty({splits * v.channels * static_cast<int64_t>(sizeof(Acc))},
                                options.dtype(at::kByte));
    reduce_rows_kernel<Acc><<<dim3(channel_blocks, splits), dim3(kRowThreadsX, kRowThreadsY), 0,
                              stream>>>(read, v.outer, v.channels,
                                        reinterpret_cast<Acc*>(work.mutable_data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {work, splits};
  }
  splits = std::clamp<int64_t>(target_blocks / v.channels, 1,
                               (v.per_channel() + 32 * kPlaneThreads - 1) / (32 * kPlaneThreads));
  splits = std::min<int64_t>(splits, 65535);
  at::Tensor work = at::empty({splits * v.channels * static_cast<int64_t>(sizeof(Acc))},
                              options.dtype(at::kByte));
  reduce_planes_kernel<Acc><<<dim3(v.channels, splits), kPlaneThreads, 0, stream>>>(
      read, v.outer, v.channels, v.inner, reinterpret_cast<Acc*>(work.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {work, splits};
}

// Elementwise over a view, VEC consecutive values per thread and step. The values from flat
// index i share channel c0 = (i / inner) % C when inner > 1 (NCHW), or are channels
// c0 .. c0 + VEC - 1 when inner == 1 (NHWC); fn(i, c0) handles them.
template <int VEC, typename Fn>
__global__ void channel_elementwise_kernel(Fn fn, int64_t numel, int64_t channels, int64_t inner) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < numel;
       i += step) {
    fn.template apply<VEC>(i, (i / inner) % channels);
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Runs fn over the view with 16-byte packs (VEC = 16 / sizeof(scalar_t)) when the channel
// runs and every pointer allow it, else one value at a time.
template <typename scalar_t, typename Fn>
void launch_channel_elementwise(const Fn& fn, const ChannelView& v,
                                std::initializer_list<const void*> pointers) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t numel = v.outer * v.channels * v.inner;
  const int64_t run = v.inner == 1 ? v.channels : v.inner;
  bool vectorize = run % kVec == 0;
  for (const void* p : pointers) vectorize = vectorize && (p == nullptr || aligned16(p));
  const int threads = 256;
  const int64_t per_thread = vectorize ? kVec : 1;
  const int64_t blocks = std::clamp<int64_t>(
      (numel / per_thread + threads - 1) / threads, 1, 32 * multiprocessor_count());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vectorize) {
    channel_elementwise_kernel<kVec><<<blocks, threads, 0, stream>>>(fn, numel, v.channels, v.inner);
  } else {
    channel_elementwise_kernel<1><<<blocks, threads, 0, stream>>>(fn, numel, v.channels, v.inner);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Channel of lane k of a pack whose first value is in channel c0.
__device__ __forceinline__ int64_t lane_channel(int64_t c0, int k, int64_t inner) {
  return inner == 1 ? c0 + k : c0;
}

}  // namespace fused_resnet::cuda
