// The eager fast path from Python into the fused ops.
//
// torch.ops.fusedopt.* boxes every list element into an IValue, walks the boxed autograd
// fallback, then unboxes into fresh vectors, and the caller must first build those lists in
// Python: with 10,000 params that costs more than the update. These entry points take the
// optimizer's cached plan (params and their state dicts), read grads and state tensors here,
// and make the same typed, unboxed dispatcher call below the autograd keys (the step runs
// under no_grad and defines no gradient), so the dispatcher still picks the CPU or CUDA kernel.
// torch.compile, tensor subclasses and complex params keep going through torch.ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <string>
#include <vector>

#include "step_args.h"  // rule_by_name
#include "update_rules.h"

namespace py = pybind11;

namespace fusedopt {
namespace {

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

using StepSig = void(c10::string_view, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                     at::TensorList, c10::IntArrayRef, const at::Tensor&, at::TensorList,
                     c10::IntArrayRef, const std::optional<at::Tensor>&,
                     const std::optional<at::Tensor>&, at::TensorList,
                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
                     int64_t);

// Tensors borrowed from Python objects for the length of one call: no refcount traffic (in
// torch 2.14 the first C++ reference to a Python-owned tensor also increfs its PyObject),
// released without a decref, exactly as c10::MaybeOwned borrows. The GIL stays held for the
// call, so nothing the borrows point at can be freed underneath them.
class Borrowed {
 public:
  explicit Borrowed(size_t reserve = 0) { v_.reserve(reserve); }
  Borrowed(const Borrowed&) = delete;
  Borrowed& operator=(const Borrowed&) = delete;
  ~Borrowed() {
    for (auto& t : v_) t.unsafeReleaseTensorImpl();
  }
  void push(const at::Tensor& t) {
    v_.emplace_back(c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reclaim(
        t.unsafeGetTensorImpl()));
  }
  void push_list(py::handle list, const char* what) {
    PyObject* o = list.ptr();
    if (!PyList_Check(o)) throw py::type_error(std::string(what) + " must be a list of tensors");
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(o); ++i) {
      PyObject* item = PyList_GET_ITEM(o, i);
      if (!THPVariable_Check(item)) {
        throw py::type_error(std::string(what) + "[" + std::to_string(i) + "] is not a tensor");
      }
      push(THPVariable_Unpack(item));
    }
  }
  operator at::TensorList() const { return v_; }
  const at::Tensor& back() const { return v_.back(); }

 private:
  std::vector<at::Tensor> v_;
};

// Reads what one op call needs straight from the plan: each param's .grad and its state
// dict's tensors. Returns false, having changed nothing, when a param has no grad or a state
// entry is missing: the caller rebuilds its plan (lazy state, params gaining or losing grads).
//
// For DTensor params (FSDP2), `owners` holds the DTensors and `params` their local shards: each
// grad is then read as the owner's grad's local shard, here, instead of being bound to the local
// param in Python first. Such a read also returns false when FSDP2 replaced a local shard or a
// grad is not laid out by its param's own spec object; the caller's slower path then checks the
// layouts and reports what is wrong.
class PlanReader {
 public:
  PlanReader(py::handle params, py::handle states, py::handle owners)
      : params_(params.ptr()), states_(states.ptr()),
        owners_(owners.is_none() ? nullptr : owners.ptr()) {
    if (!PyList_Check(params_) || !PyList_Check(states_) ||
        PyList_GET_SIZE(states_) != PyList_GET_SIZE(params_) ||
        (owners_ != nullptr &&
         (!PyList_Check(owners_) || PyList_GET_SIZE(owners_) != PyList_GET_SIZE(params_)))) {
      throw py::type_error("params, states (and owners) must be lists of the same length");
    }
  }
  Py_ssize_t size() const { return PyList_GET_SIZE(params_); }

  // false: no grad
  bool param_and_grad(Py_ssize_t i, Borrowed& params, Borrowed& grads) {
    if (owners_ != nullptr) return local_param_and_grad(i, params, grads);
    PyObject* p = PyList_GET_ITEM(params_, i);
    if (!THPVariable_Check(p)) throw py::type_error("params[" + std::to_string(i) + "] is not a tensor");
    const at::Tensor& t = THPVariable_Unpack(p);
    const at::Tensor& g = t.grad();
    if (!g.defined()) return false;
    params.push(t);
    grads.push(g);
    return true;
  }
  // DTensor params: false when the shard was replaced, there is no grad, or the grad is not
  // laid out by the param's own spec object.
  bool local_param_and_grad(Py_ssize_t i, Borrowed& params, Borrowed& grads) {
    static PyObject* const k_local = PyUnicode_InternFromString("_local_tensor");
    static PyObject* const k_spec = PyUnicode_InternFromString("_spec");
    PyObject* owner = PyList_GET_ITEM(owners_, i);
    PyObject* local = PyList_GET_ITEM(params_, i);
    if (!THPVariable_Check(owner) || !THPVariable_Check(local)) return false;
    const py::object shard = attr(owner, k_local);
    if (shard.ptr() != local) return false;
    const at::Tensor& g = THPVariable_Unpack(owner).grad();
    if (!g.defined()) return false;
    // the grad's Python object (a DTensor, kept alive by the param for the whole call)
    const py::object grad = py::reinterpret_steal<py::object>(THPVariable_Wrap(g));
    const py::object grad_spec = attr(grad.ptr(), k_spec), spec = attr(owner, k_spec);
    if (!grad_spec || grad_spec.ptr() != spec.ptr()) return false;
    const py::object grad_local = attr(grad.ptr(), k_local);
    if (!grad_local || !THPVariable_Check(grad_local.ptr())) return false;
    params.push(THPVariable_Unpack(local));
    grads.push(THPVariable_Unpack(grad_local.ptr()));
    return true;
  }

  // false: the key is missing (or holds no tensor)
  bool state(Py_ssize_t i, PyObject* key, Borrowed& out) {
    PyObject* d = PyList_GET_ITEM(states_, i);
    PyObject* v = PyDict_Check(d) ? PyDict_GetItem(d, key) : nullptr;  // borrowed
    if (v == nullptr || !THPVariable_Check(v)) return false;
    out.push(THPVariable_Unpack(v));
    return true;
  }

 private:
  // obj.name, or a null object (the error cleared) when it has none
  static py::object attr(PyObject* obj, PyObject* name) {
    PyObject* v = PyObject_GetAttr(obj, name);
    if (v == nullptr) PyErr_Clear();
    return py::reinterpret_steal<py::object>(v);
  }

  PyObject* params_;
  PyObject* states_;
  PyObject* owners_;  // DTensor params whose local shards `params_` holds, or null
};

// The arguments both ops share after the per-tensor lists.
struct GroupArgs {
  GroupArgs(py::handle hyper_, py::handle lr_tensors, py::handle grad_scale_, py::handle found_inf_,
            py::handle schedule_state_, py::handle schedule_)
      : hyper(tensor(hyper_, "hyper")),
        grad_scale(optional_tensor(grad_scale_, "grad_scale")),
        found_inf(optional_tensor(found_inf_, "found_inf")),
        schedule(optional_tensor(schedule_, "schedule")) {
    lrs.push_list(lr_tensors, "lr_tensors");
    schedule_state.push_list(schedule_state_, "schedule_state");
  }
  at::Tensor hyper;
  std::optional<at::Tensor> grad_scale, found_inf, schedule;
  Borrowed lrs, schedule_state;
};

PyObject* interned(const char* s) {
  return PyUnicode_InternFromString(s);  // kept for the life of the process
}

// Each rule's state-dict keys as interned Python strings, in role order.
struct RuleKeys {
  PyObject* roles[kMaxStates] = {};
  int num_roles = 0;
  bool has_step = false;
};

const RuleKeys& rule_keys(RuleId id) {
  static const auto table = [] {
    std::vector<RuleKeys> t(kNumRules);
    for (int i = 0; i < kNumRules; ++i) {
      visit_rule(static_cast<RuleId>(i), [&](auto r) {
        using R = decltype(r);
        t[static_cast<size_t>(i)].num_roles = R::kStates;
        t[static_cast<size_t>(i)].has_step = R::kHasStep;
        for (int k = 0; k < R::kStates; ++k) t[static_cast<size_t>(i)].roles[k] = interned(R::kRoles[k]);
      });
    }
    return t;
  }();
  return table[static_cast<size_t>(id)];
}

bool is_16bit(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// torch.ops.fusedopt.step_ on a plan: each param's grad, its state tensors (the roles its group
// uses, by the rule's state-dict keys), its master and step counter are read here.
bool plan_step(const std::string& rule, py::handle params, py::handle states,
               const std::vector<int64_t>& group_sizes, py::handle hyper, py::handle lr_tensors,
               const std::vector<int64_t>& fresh, py::handle grad_scale, py::handle found_inf,
               py::handle schedule_state, py::handle schedule, py::handle owners, py::handle clip,
               int64_t master_mode, int64_t seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusedopt::step_", "")
                             .typed<StepSig>();
  static PyObject* const k_step = interned("step");
  static PyObject* const k_master = interned("master_param");
  static PyObject* const k_remainder = interned("master_remainder");
  const RuleId id = rule_by_name("fusedopt.plan_step", rule);
  const RuleKeys& keys = rule_keys(id);
  const GroupArgs a(hyper, lr_tensors, grad_scale, found_inf, schedule_state, schedule);
  TORCH_CHECK(a.hyper.device().is_cpu() && a.hyper.scalar_type() == at::kDouble && a.hyper.dim() == 2 &&
                  a.hyper.is_contiguous() && a.hyper.size(0) == static_cast<int64_t>(group_sizes.size()),
              "fusedopt.plan_step: hyper must be a contiguous float64 CPU table with a row per group");
  const double* rows = a.hyper.data_ptr<double>();
  const int64_t cols = a.hyper.size(1);
  std::vector<uint32_t> group_roles(group_sizes.size());
  for (size_t g = 0; g < group_sizes.size(); ++g) {
    group_roles[g] = visit_rule(id, [&](auto r) { return role_mask<decltype(r)>(rows + g * cols); });
  }
  PyObject* const master_key = master_mode == 1 ? k_master : (master_mode == 2 ? k_remainder : nullptr);
  PlanReader plan(params, states, owners);
  const auto n = static_cast<size_t>(plan.size());
  Borrowed p(n), g(n), st(n * static_cast<size_t>(keys.num_roles)), m, steps(keys.has_step ? n : 0);
  size_t group = 0;
  int64_t left = group_sizes.empty() ? 0 : group_sizes[0];
  for (Py_ssize_t i = 0; i < plan.size(); ++i) {
    while (left == 0 && group + 1 < group_sizes.size()) left = group_sizes[++group];
    --left;
    if (!plan.param_and_grad(i, p, g)) return false;
    const uint32_t roles = group_roles[group];
    for (int k = 0; k < keys.num_roles; ++k) {
      if ((roles & (1u << k)) && !plan.state(i, keys.roles[k], st)) return false;
    }
    if (master_key != nullptr && is_16bit(p.back()) && !plan.state(i, master_key, m)) return false;
    if (keys.has_step && !plan.state(i, k_step, steps)) return false;
  }
  const std::optional<at::Tensor> clip_t = optional_tensor(clip, "clip");
  BelowAutograd below;
  op.call(rule, p, g, st, m, steps, group_sizes, a.hyper, a.lrs, fresh, a.grad_scale, a.found_inf,
          a.schedule_state, a.schedule, clip_t, master_mode, seed);
  return true;
}

}  // namespace

void register_eager_entry(py::module_& m) {
  m.def("plan_step", &plan_step, py::arg("rule"), py::arg("params"), py::arg("states"),
        py::arg("group_sizes"), py::arg("hyper"), py::arg("lr_tensors"), py::arg("fresh"),
        py::arg("grad_scale"), py::arg("found_inf"), py::arg("schedule_state"),
        py::arg("schedule"), py::arg("owners") = py::none(), py::arg("clip") = py::none(),
        py::arg("master_mode") = 0, py::arg("seed") = -1,
        "torch.ops.fusedopt.step_ on a plan (params and their state dicts): grads, state tensors, "
        "masters and step counters are read here, without boxing. With owners (DTensor params "
        "whose local shards params holds), grads are read from them. False, with nothing changed: "
        "the plan is stale.");
}

}  // namespace fusedopt
