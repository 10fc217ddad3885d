// The op schemas, declared once; each backend registers its kernels with
// TORCH_LIBRARY_IMPL(fusedopt, CPU|CUDA, m) and the dispatcher routes by device.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "step_args.h"  // StepSig

namespace fusedopt {

TORCH_LIBRARY(fusedopt, m) {
  // One call updates every tensor of every param group on one device. Lists are ordered
  // group by group; group_sizes[g] tensors belong to group g, whose hyperparameters are row
  // g of `hyper` (float64, CPU; columns in fusedopt._C.ADAM_COLUMNS / SGD_COLUMNS). A group
  // whose lr is a device tensor names it through its lr_index column into lr_tensors.
  // With grad_scale the grads are unscaled in place; a nonzero found_inf skips the step
  // and leaves every tensor, step counters included, untouched.
  m.def(
      "adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, "
      "int[] group_sizes, Tensor hyper, Tensor[] lr_tensors, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, *, Tensor(g!)[] schedule_state, Tensor? schedule=None) -> ()");
  // In-kernel lr schedule: `schedule` (float64, CPU) holds phase rows (update_rules.h), group g
  // using rows [sched_begin, sched_begin + sched_count) of it; schedule_state is empty (no
  // schedule) or the int64 step counter t followed by the lr tensor of each scheduled group.
  // The step uses lr(t); unless skipped it then stores lr(t + 1) in those tensors and t + 1.
  // momentum_buffers holds the buffers of the groups with momentum != 0 only; the params
  // named in fresh_buffers have a buffer never written yet, which takes the gradient itself.
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
      "int[] group_sizes, Tensor hyper, Tensor[] lr_tensors, int[] fresh_buffers, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, *, Tensor(d!)[] schedule_state, "
      "Tensor? schedule=None) -> ()");
  // Any rule of csrc/update_rules.h ("adam", "sgd", "rmsprop", "adagrad", "lion"): what the
  // optimizer classes call. `hyper` has the rule's columns (fusedopt._C.RULES). `states` holds,
  // param by param, the state tensors its group uses in the rule's role order; each may have its
  // own floating dtype (state_dtype). state_steps: one counter per param for rules that count
  // steps, else empty. fresh: params whose state was never written (SGD's momentum buffer).
  // master_mode 1: masters holds a float32 master for each float16/bfloat16 param, which the
  // step updates and rounds into the param; 2: an int16 remainder per bfloat16 param instead.
  // seed >= 0: bfloat16 params without a master are rounded stochastically from this seed.
  // clip: fusedopt::grad_norm_'s [norm, coefficient]; grads are scaled by the coefficient as
  // they are read, and a non-finite norm skips the step like found_inf.
  m.def(
      "step_(str rule, Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] states, "
      "Tensor(d!)[] masters, Tensor(e!)[] state_steps, int[] group_sizes, Tensor hyper, "
      "Tensor[] lr_tensors, int[] fresh, Tensor? grad_scale=None, Tensor? found_inf=None, *, "
      "Tensor(f!)[] schedule_state, Tensor? schedule=None, Tensor? clip=None, int master_mode=0, "
      "int seed=-1) -> ()");
  // step_ without a grad scale, whose grads are then only read, with a schema that says so:
  // torch.compile's inductor fails on a mutable list of inputs that alias each other, which the
  // grads of flat storage (fusedopt.flatten_) or of DDP's gradient_as_bucket_view are. Runs step_.
  m.def(
      "step_.keep_grads(str rule, Tensor(a!)[] params, Tensor[] grads, Tensor(c!)[] states, "
      "Tensor(d!)[] masters, Tensor(e!)[] state_steps, int[] group_sizes, Tensor hyper, "
      "Tensor[] lr_tensors, int[] fresh, Tensor? found_inf=None, *, Tensor(f!)[] schedule_state, "
      "Tensor? schedule=None, Tensor? clip=None, int master_mode=0, int seed=-1) -> ()");
  // The total norm of all grads (one device, any mix of float32/64, float16, bfloat16), in one
  // fused reduction: out (float32, or float64, 2 elements, on that device) receives the norm of
  // order norm_type (a positive number or inf) and the clip coefficient torch's clip_grad_norm_
  // uses, min(max_norm / (norm + 1e-6), 1), computed in out's dtype. With grad_scale the norm is
  // that of the unscaled grads (grad * float32(1 / grad_scale), as GradScaler.unscale_ stores
  // them); the grads are only read.
  m.def(
      "grad_norm_(Tensor[] grads, float norm_type, float max_norm, Tensor(a!) out, "
      "Tensor? grad_scale=None) -> ()");
}

namespace {

// One kernel for every device: step_ itself, through the dispatcher (to the params' backend).
void step_keep_grads(c10::string_view rule, at::TensorList params, at::TensorList grads,
                     at::TensorList states, at::TensorList masters, at::TensorList state_steps,
                     c10::IntArrayRef group_sizes, const at::Tensor& hyper, at::TensorList lr_tensors,
                     c10::IntArrayRef fresh, const std::optional<at::Tensor>& found_inf,
                     at::TensorList schedule_state, const std::optional<at::Tensor>& schedule,
                     const std::optional<at::Tensor>& clip, int64_t master_mode, int64_t seed) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedopt::step_", "").typed<StepSig>();
  op.call(rule, params, grads, states, masters, state_steps, group_sizes, hyper, lr_tensors, fresh,
          /*grad_scale=*/std::nullopt, found_inf, schedule_state, schedule, clip, master_mode, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CompositeExplicitAutograd, m) {
  m.impl("step_.keep_grads", &step_keep_grads);
}

}  // namespace fusedopt
