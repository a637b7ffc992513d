// Loop scaffolding of the CPU kernels: vector loads in the math type, the two ways a
// ChannelView is split across threads, and per-thread fp64 channel sums.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>
#include <utility>
#include <vector>

#include "../bn_checks.h"

namespace fused_resnet::cpu {

template <typename scalar_t>
using opmath = at::opmath_type<scalar_t>;
template <typename scalar_t>
using Vec = at::vec::Vectorized<opmath<scalar_t>>;

// Vec<scalar_t>::size() consecutive values of p, widened to the math type.
template <typename scalar_t>
inline Vec<scalar_t> load_vec(const scalar_t* p) {
  using acc_t = opmath<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vec<scalar_t>::loadu(p);
  } else {
    acc_t wide[Vec<scalar_t>::size()];
    for (int k = 0; k < Vec<scalar_t>::size(); ++k) wide[k] = static_cast<acc_t>(p[k]);
    return Vec<scalar_t>::loadu(wide);
  }
}

// Stores v to Vec<scalar_t>::size() consecutive values of p, rounded to scalar_t.
template <typename scalar_t>
inline void store_vec(scalar_t* p, const Vec<scalar_t>& v) {
  using acc_t = opmath<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p);
  } else {
    acc_t wide[Vec<scalar_t>::size()];
    v.store(wide);
    for (int k = 0; k < Vec<scalar_t>::size(); ++k) p[k] = static_cast<scalar_t>(wide[k]);
  }
}

template <typename acc_t>
inline acc_t horizontal_sum(const at::vec::Vectorized<acc_t>& v) {
  acc_t lanes[at::vec::Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t total = 0;
  for (int k = 0; k < at::vec::Vectorized<acc_t>::size(); ++k) total += lanes[k];
  return total;
}

// A per-channel coefficient along one line: lane k of a row reads p[k] (per_lane), every
// value of a plane reads the plane's one channel, *p.
template <typename acc_t>
struct LineCoef {
  const acc_t* p;
  bool per_lane;
  at::vec::Vectorized<acc_t> vec(int64_t k) const {
    return per_lane ? at::vec::Vectorized<acc_t>::loadu(p + k) : at::vec::Vectorized<acc_t>(*p);
  }
  acc_t at(int64_t k) const { return per_lane ? p[k] : *p; }
};

// Runs rows(begin, end) over the rows o of an NHWC view (each row holds channels 0..C-1
// contiguously) or planes(begin, end) over the lines l = o*C + c of an NCHW view (each holds
// `inner` values of channel l % C), in parallel chunks of about GRAIN_SIZE elements.
template <typename Rows, typename Planes>
inline void parallel_lines(const ChannelView& v, Rows&& rows, Planes&& planes) {
  if (v.inner == 1) {
    at::parallel_for(0, v.outer, std::max<int64_t>(1, at::internal::GRAIN_SIZE / v.channels),
                     rows);
  } else {
    at::parallel_for(0, v.outer * v.channels,
                     std::max<int64_t>(1, at::internal::GRAIN_SIZE / v.inner), planes);
  }
}

// kSums fp64 sums per channel, one set per thread, added up by total(). Each thread adds
// its chunk's partial sums (kept in the math type for at most a few thousand values) here,
// so long reductions do not lose precision.
template <int kSums>
class ChannelSums {
 public:
  explicit ChannelSums(int64_t channels)
      : channels_(channels),
        threads_(at::get_num_threads()),
        sums_(threads_ * kSums * channels, 0.0) {}

  // This thread's sums: slot(s)[c] is sum s of channel c.
  double* slot(int s) {
    const int64_t thread = at::get_thread_num();
    TORCH_CHECK(thread < threads_, "ChannelSums: thread ", thread, " of ", threads_);
    return sums_.data() + (thread * kSums + s) * channels_;
  }

  // Adds per-channel partial sums parts[s][c] (math type, kSums arrays of C) into this
  // thread's fp64 sums and zeroes them.
  template <typename acc_t>
  void flush(acc_t* const (&parts)[kSums]) {
    for (int s = 0; s < kSums; ++s) {
      double* total = slot(s);
      for (int64_t c = 0; c < channels_; ++c) {
        total[c] += parts[s][c];
        parts[s][c] = acc_t(0);
      }
    }
  }

  // Sum s of channel c over all threads.
  double total(int s, int64_t c) const {
    double t = 0.0;
    for (int64_t thread = 0; thread < threads_; ++thread) {
      t += sums_[(thread * kSums + s) * channels_ + c];
    }
    return t;
  }

 private:
  int64_t channels_, threads_;
  std::vector<double> sums_;
};

// Rows accumulated in the math type before they are flushed into the fp64 sums.
constexpr int64_t kRowsPerFlush = 64;

// Per-channel sums S1 = sum t1, S2 = sum t2 of two terms of every value, added into `sums`.
// The terms of the value at flat offset i in channel c depend on one per-channel parameter
// param[c]: vec_terms(i, Vec(param lanes)) gives (t1, t2) for Vec::size() consecutive values,
// scalar_terms(i, param[c]) for one. NHWC rows keep per-lane partials for kRowsPerFlush rows;
// NCHW planes reduce to one partial per plane; both then go to the fp64 sums.
template <typename scalar_t, typename VecTerms, typename ScalarTerms>
void reduce_two_sums(const ChannelView& v, const opmath<scalar_t>* param, ChannelSums<2>& sums,
                     const VecTerms& vec_terms, const ScalarTerms& scalar_terms) {
  using acc_t = opmath<scalar_t>;
  constexpr int64_t width = Vec<scalar_t>::size();
  const int64_t channels = v.channels, inner = v.inner;
  auto rows = [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s1(channels, acc_t(0)), s2(channels, acc_t(0));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * channels;
      int64_t k = 0;
      for (; k + width <= channels; k += width) {
        const auto [t1, t2] = vec_terms(base + k, Vec<scalar_t>::loadu(param + k));
        (Vec<scalar_t>::loadu(s1.data() + k) + t1).store(s1.data() + k);
        (Vec<scalar_t>::loadu(s2.data() + k) + t2).store(s2.data() + k);
      }
      for (; k < channels; ++k) {
        const auto [t1, t2] = scalar_terms(base + k, param[k]);
        s1[k] += t1;
        s2[k] += t2;
      }
      if ((row - begin + 1) % kRowsPerFlush == 0 || row == end - 1) {
        sums.flush<acc_t>({s1.data(), s2.data()});
      }
    }
  };
  auto planes = [&](int64_t begin, int64_t end) {
    double* total1 = sums.slot(0);
    double* total2 = sums.slot(1);
    for (int64_t line = begin; line < end; ++line) {
      const int64_t c = line % channels, base = line * inner;
      const Vec<scalar_t> p(param[c]);
      Vec<scalar_t> v1(acc_t(0)), v2(acc_t(0));
      int64_t i = 0;
      for (; i + width <= inner; i += width) {
        const auto [t1, t2] = vec_terms(base + i, p);
        v1 = v1 + t1;
        v2 = v2 + t2;
      }
      acc_t s1 = horizontal_sum(v1), s2 = horizontal_sum(v2);
      for (; i < inner; ++i) {
        const auto [t1, t2] = scalar_terms(base + i, param[c]);
        s1 += t1;
        s2 += t2;
      }
      total1[c] += s1;
      total2[c] += s2;
    }
  };
  parallel_lines(v, rows, planes);
}

}  // namespace fused_resnet::cpu
