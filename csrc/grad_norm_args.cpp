#include "grad_norm_args.h"

#include <c10/util/Exception.h>

#include <cmath>


namespace fusedopt {

NormArgs collect_norm_args(const char* op, at::TensorList grads, double norm_type, double max_norm,
                           const at::Tensor& out, const std::optional<at::Tensor>& grad_scale) {
  NormArgs a;
  TORCH_CHECK(out.defined(), op, ": out is undefined");
  TORCH_CHECK(out.layout() == at::kStrided && out.numel() == 2 && out.is_contiguous(), op,
              ": out must be a contiguous tensor of 2 elements (the total norm and the clip "
              "coefficient), got shape ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble, op,
                   ": out must be float32 (or float64), got ", out.scalar_type());
  TORCH_CHECK(norm_type > 0.0 && !std::isnan(norm_type), op, ": norm_type must be a positive "
              "number or inf, got ", norm_type, " (use torch.nn.utils.clip_grad_norm_ for other "
              "orders)");
  TORCH_CHECK(!std::isnan(max_norm), op, ": max_norm is NaN");
  a.device = out.device();
  a.norm_type = norm_type;
  a.kind = norm_kind(norm_type);
  a.max_norm = max_norm;
  a.out = out.data_ptr();
  a.out_is_double = out.scalar_type() == at::kDouble;
  a.grads.resize(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.defined(), op, ": grads[", i, "] is undefined");
    TORCH_CHECK(g.layout() == at::kStrided, op, ": grads[", i, "] is not a dense tensor (layout ",
                g.layout(), "); fusedopt computes the norm of dense gradients only");
    TORCH_CHECK(g.device() == a.device, op, ": grads[", i, "] is on ", g.device(),
                " but out is on ", a.device, "; call the op once per device");
    Elem e = Elem::f32;
    switch (g.scalar_type()) {
      case at::kFloat: e = Elem::f32; break;
      case at::kDouble: e = Elem::f64; break;
      case at::kHalf: e = Elem::f16; break;
      case at::kBFloat16: e = Elem::bf16; break;
      default:
        TORCH_CHECK_TYPE(false, op, ": grads[", i, "] has dtype ", g.scalar_type(),
                         "; fusedopt supports float32, float64, float16 and bfloat16 gradients");
    }
    // A dense tensor in any stride order occupies numel consecutive elements from its data
    // pointer; the norm does not depend on the order they are read in.
    TORCH_CHECK(g.is_non_overlapping_and_dense(), op, ": grads[", i, "] of shape ", g.sizes(),
                " and strides ", g.strides(), " is a view with gaps or overlaps; pass a dense "
                "tensor (.contiguous())");
    a.grads[i] = NormSlot{g.numel() == 0 ? nullptr : g.data_ptr(), g.numel(), e};
  }
  if (grad_scale.has_value()) {
    const at::Tensor& s = *grad_scale;
    TORCH_CHECK(s.numel() == 1, op, ": grad_scale must have exactly one element, got ", s.numel());
    TORCH_CHECK(s.device().is_cpu() || s.device() == a.device, op, ": grad_scale is on ",
                s.device(), " but the grads are on ", a.device);
    TORCH_CHECK_TYPE(at::isFloatingType(s.scalar_type()), op, ": grad_scale must be a "
                     "floating-point tensor, got ", s.scalar_type());
    a.scaled = true;
    if (grad_scale->device().is_cpu()) {
      // The float32 reciprocal GradScaler.unscale_ multiplies by.
      a.host_inv_scale = static_cast<float>(1.0 / grad_scale->item<double>());
    } else {
      TORCH_CHECK_TYPE(grad_scale->scalar_type() == at::kFloat, op, ": a ", a.device.type(),
                       " grad_scale must be float32 (as GradScaler makes it), got ",
                       grad_scale->scalar_type());
      a.scale_ptr = grad_scale->data_ptr<float>();
    }
  }
  return a;
}

}  // namespace fusedopt
