// CPU kernel of fused_resnet::bn_act_backward (the math is stated with the schema in
// csrc/fused_resnet.cpp): a reduction pass over (dz, z, y) for S1 = sum(g) and
// S2 = sum(g * (y - mean)) with g = dz * [z > 0], then an elementwise pass
//   dy = A * g + B * (y - mean) + D,  A = gamma * rstd,  B = -A * rstd * dgamma / n,
//   D = -A * dbeta / n,  with dbeta = S1, dgamma = rstd * S2,
// that also writes dr = g when asked.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu_loops.h"

namespace fused_resnet::cpu {
namespace {

// g = dz * [z > 0] (z == nullptr: no ReLU, g = dz) for the values k .. k + width; as in
// torch's threshold_backward only z <= 0 zeroes dz (a NaN z lets it through).
template <typename scalar_t>
inline Vec<scalar_t> masked_grad(const scalar_t* dz, const scalar_t* z, int64_t k) {
  const Vec<scalar_t> g = load_vec(dz + k);
  if (z == nullptr) return g;
  const Vec<scalar_t> zero(opmath<scalar_t>(0));
  return Vec<scalar_t>::blendv(g, zero, load_vec(z + k) <= zero);
}

template <typename scalar_t>
inline opmath<scalar_t> masked_grad_scalar(const scalar_t* dz, const scalar_t* z, int64_t k) {
  using acc_t = opmath<scalar_t>;
  if (z != nullptr && static_cast<acc_t>(z[k]) <= acc_t(0)) return acc_t(0);
  return static_cast<acc_t>(dz[k]);
}

// Pointers of one line: dz, z (or null), y in; dy, dr (or null) out.
template <typename scalar_t>
struct GradLine {
  const scalar_t *dz, *z, *y;
  scalar_t *dy, *dr;
};

template <typename scalar_t>
void apply_line(const GradLine<scalar_t>& p, int64_t count, LineCoef<opmath<scalar_t>> mean,
                LineCoef<opmath<scalar_t>> a, LineCoef<opmath<scalar_t>> b,
                LineCoef<opmath<scalar_t>> d) {
  using acc_t = opmath<scalar_t>;
  constexpr int64_t width = Vec<scalar_t>::size();
  int64_t k = 0;
  for (; k + width <= count; k += width) {
    const Vec<scalar_t> g = masked_grad(p.dz, p.z, k);
    store_vec(p.dy + k, a.vec(k) * g + b.vec(k) * (load_vec(p.y + k) - mean.vec(k)) + d.vec(k));
    if (p.dr != nullptr) store_vec(p.dr + k, g);
  }
  for (; k < count; ++k) {
    const acc_t g = masked_grad_scalar(p.dz, p.z, k);
    p.dy[k] = static_cast<scalar_t>(a.at(k) * g +
                                    b.at(k) * (static_cast<acc_t>(p.y[k]) - mean.at(k)) + d.at(k));
    if (p.dr != nullptr) p.dr[k] = static_cast<scalar_t>(g);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cpu(
    const at::Tensor& dz, const std::optional<at::Tensor>& z, const at::Tensor& y,
    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& gamma, bool write_dr) {
  const at::MemoryFormat format = check_bn_act_backward_args(dz, z, y, mean, rstd, gamma);
  const at::Tensor y_c = y.contiguous(format), dz_c = dz.contiguous(format);
  const at::Tensor z_c = z.has_value() ? z->contiguous(format) : at::Tensor();
  const ChannelView view = channel_view(y_c, format);
  const int64_t channels = view.channels;
  const at::ScalarType acc = acc_type_of(y);
  const at::Tensor mean_c = mean.to(acc).contiguous(), rstd_c = rstd.to(acc).contiguous();
  const at::Tensor gamma_c = gamma.to(acc).contiguous();
  at::Tensor dy = at::empty_like(y_c, y_c.options(), format);
  at::Tensor dr = write_dr ? at::empty_like(y_c, y_c.options(), format) : at::empty({0}, y.options());
  at::Tensor dgamma = at::empty({channels}, y.options().dtype(acc));
  at::Tensor dbeta = at::empty_like(dgamma);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_backward_cpu", [&] {
    using acc_t = opmath<scalar_t>;
    const scalar_t* dz_p = dz_c.const_data_ptr<scalar_t>();
    const scalar_t* z_p = z_c.defined() ? z_c.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* y_p = y_c.const_data_ptr<scalar_t>();
    const acc_t* mean_p = mean_c.const_data_ptr<acc_t>();
    ChannelSums<2> sums(channels);
    // Terms g and g * (y - mean).
    reduce_two_sums<scalar_t>(
        view, mean_p, sums,
        [&](int64_t i, const Vec<scalar_t>& m) {
          const Vec<scalar_t> g = masked_grad(dz_p, z_p, i);
          return std::make_pair(g, g * (load_vec(y_p + i) - m));
        },
        [&](int64_t i, acc_t m) {
          const acc_t g = masked_grad_scalar(dz_p, z_p, i);
          return std::make_pair(g, g * (static_cast<acc_t>(y_p[i]) - m));
        });

    // Per channel, in fp64: dbeta, dgamma and the coefficients A, B, D of the apply pass.
    const double n = static_cast<double>(view.per_channel());
    std::vector<acc_t> coefs(3 * channels);
    for (int64_t c = 0; c < channels; ++c) {
      const double r = rstd_c.const_data_ptr<acc_t>()[c];
      const double db = sums.total(0, c), dg = r * sums.total(1, c);
      const double a = static_cast<double>(gamma_c.const_data_ptr<acc_t>()[c]) * r;
      dbeta.mutable_data_ptr<acc_t>()[c] = static_cast<acc_t>(db);
      dgamma.mutable_data_ptr<acc_t>()[c] = static_cast<acc_t>(dg);
      coefs[c] = static_cast<acc_t>(a);
      coefs[channels + c] = static_cast<acc_t>(-a * r * dg / n);
      coefs[2 * channels + c] = static_cast<acc_t>(-a * db / n);
    }
    const acc_t* a = coefs.data();
    const acc_t* b = a + channels;
    const acc_t* d = b + channels;
    scalar_t* dy_p = dy.mutable_data_ptr<scalar_t>();
    scalar_t* dr_p = write_dr ? dr.mutable_data_ptr<scalar_t>() : nullptr;
    auto line_at = [&](int64_t base) {
      return GradLine<scalar_t>{dz_p + base, z_p ? z_p + base : nullptr, y_p + base, dy_p + base,
                                dr_p ? dr_p + base : nullptr};
    };
    parallel_lines(
        view,
        [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            apply_line<scalar_t>(line_at(row * channels), channels, {mean_p, true}, {a, true},
                                 {b, true}, {d, true});
          }
        },
        [&](int64_t begin, int64_t end) {
          for (int64_t line = begin; line < end; ++line) {
            const int64_t c = line % channels;
            apply_line<scalar_t>(line_at(line * view.inner), view.inner, {mean_p + c, false},
                                 {a + c, false}, {b + c, false}, {d + c, false});
          }
        });
  });
  return {dy, dgamma, dbeta, dr};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) { m.impl("bn_act_backward", &bn_act_backward_cpu); }

}  // namespace fused_resnet::cpu
