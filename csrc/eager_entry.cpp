// The eager fast path from Python into the fused ops.
//
// torch.ops.fusedopt.* boxes every list element into an IValue, walks the boxed autograd
// fallback, then unboxes into fresh vectors: with 10,000 params that costs more than the
// update. These entry points unpack the Python lists once and make the same typed, unboxed
// dispatcher call below the autograd keys (the step runs under no_grad and defines no
// gradient), so the dispatcher still picks the CPU or CUDA kernel. torch.compile and tensor
// subclasses keep going through torch.ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <string>
#include <vector>

namespace py = pybind11;

namespace fusedopt {
namespace {

std::vector<at::Tensor> tensor_list(py::handle list, const char* what) {
  PyObject* o = list.ptr();
  if (!PyList_Check(o)) throw py::type_error(std::string(what) + " must be a list of tensors");
  const Py_ssize_t n = PyList_GET_SIZE(o);
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(o, i);
    if (!THPVariable_Check(item)) {
      throw py::type_error(std::string(what) + "[" + std::to_string(i) + "] is not a tensor");
    }
    out.push_back(THPVariable_Unpack(item));
  }
  return out;
}

std::optional<at::Tensor> optional_tensor(py::handle obj, const char* what) {
  if (obj.is_none()) return std::nullopt;
  if (!THPVariable_Check(obj.ptr())) throw py::type_error(std::string(what) + " must be a tensor or None");
  return THPVariable_Unpack(obj.ptr());
}

at::Tensor tensor(py::handle obj, const char* what) {
  if (!THPVariable_Check(obj.ptr())) throw py::type_error(std::string(what) + " must be a tensor");
  return THPVariable_Unpack(obj.ptr());
}

// Below Autograd and ADInplaceOrView: what the boxed fallbacks would have redispatched to.
struct BelowAutograd {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autograd_dispatch_keyset_with_ADInplaceOrView};
};

using AdamSig = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                     at::TensorList, c10::IntArrayRef, const at::Tensor&, at::TensorList,
                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                     at::TensorList, const std::optional<at::Tensor>&);
using SgdSig = void(at::TensorList, at::TensorList, at::TensorList, c10::IntArrayRef, const at::Tensor&,
                    at::TensorList, c10::IntArrayRef, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&, at::TensorList, const std::optional<at::Tensor>&);

void adam_step(py::handle params, py::handle grads, py::handle exp_avgs, py::handle exp_avg_sqs,
               py::handle max_exp_avg_sqs, py::handle state_steps,
               const std::vector<int64_t>& group_sizes, py::handle hyper, py::handle lr_tensors,
               py::handle grad_scale, py::handle found_inf, py::handle schedule_state,
               py::handle schedule) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusedopt::adam_", "")
                             .typed<AdamSig>();
  const auto p = tensor_list(params, "params"), g = tensor_list(grads, "grads");
  const auto m = tensor_list(exp_avgs, "exp_avgs"), v = tensor_list(exp_avg_sqs, "exp_avg_sqs");
  const auto vm = tensor_list(max_exp_avg_sqs, "max_exp_avg_sqs");
  const auto st = tensor_list(state_steps, "state_steps"), lrs = tensor_list(lr_tensors, "lr_tensors");
  const auto sched_state = tensor_list(schedule_state, "schedule_state");
  const at::Tensor h = tensor(hyper, "hyper");
  const auto gs = optional_tensor(grad_scale, "grad_scale"), fi = optional_tensor(found_inf, "found_inf");
  const auto sched = optional_tensor(schedule, "schedule");
  py::gil_scoped_release no_gil;
  BelowAutograd below;
  op.call(p, g, m, v, vm, st, group_sizes, h, lrs, gs, fi, sched_state, sched);
}

void sgd_step(py::handle params, py::handle grads, py::handle momentum_buffers,
              const std::vector<int64_t>& group_sizes, py::handle hyper, py::handle lr_tensors,
              const std::vector<int64_t>& fresh_buffers, py::handle grad_scale, py::handle found_inf,
              py::handle schedule_state, py::handle schedule) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusedopt::sgd_", "")
                             .typed<SgdSig>();
  const auto p = tensor_list(params, "params"), g = tensor_list(grads, "grads");
  const auto b = tensor_list(momentum_buffers, "momentum_buffers");
  const auto lrs = tensor_list(lr_tensors, "lr_tensors");
  const auto sched_state = tensor_list(schedule_state, "schedule_state");
  const at::Tensor h = tensor(hyper, "hyper");
  const auto gs = optional_tensor(grad_scale, "grad_scale"), fi = optional_tensor(found_inf, "found_inf");
  const auto sched = optional_tensor(schedule, "schedule");
  py::gil_scoped_release no_gil;
  BelowAutograd below;
  op.call(p, g, b, group_sizes, h, lrs, fresh_buffers, gs, fi, sched_state, sched);
}

}  // namespace

void register_eager_entry(py::module_& m) {
  m.def("adam_step", &adam_step,
        "torch.ops.fusedopt.adam_ for eager plain tensors, without boxing (same arguments; "
        "schedule_state and schedule positional).");
  m.def("sgd_step", &sgd_step,
        "torch.ops.fusedopt.sgd_ for eager plain tensors, without boxing (same arguments; "
        "schedule_state and schedule positional).");
}

}  // namespace fusedopt
