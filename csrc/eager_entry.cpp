// The eager fast paths from Python into the fused step.
//
// torch.ops.fusedopt.* boxes every list element into an IValue, walks the boxed autograd
// fallback, then unboxes into fresh vectors, and the caller must first build those lists in
// Python: with 10,000 params that costs more than the update. Two entries avoid that:
// - StepPlan: for plain params whose state dicts the optimizer tracks. Validated once, it keeps
//   the step's table and, per step, re-reads only the grads and the params' storage before
//   calling its device's kernel (the backend's registered StepRunner).
// - plan_step: for the rest (DTensor params, untracked state dicts): reads grads and state
//   tensors from the plan's lists at every step and makes the typed, unboxed dispatcher call
//   below the autograd keys (the step runs under no_grad and defines no gradient).
// torch.compile, tensor subclasses and complex params keep going through torch.ops.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <atomic>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "step_args.h"
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

// The tensors of a Python list, as owning references (the step holds them for one call).
std::vector<at::Tensor> tensor_list(py::handle list, const char* what) {
  PyObject* o = list.ptr();
  if (!PyList_Check(o)) throw py::type_error(std::string(what) + " must be a list of tensors");
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(PyList_GET_SIZE(o)));
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(o); ++i) {
    PyObject* item = PyList_GET_ITEM(o, i);
    if (!THPVariable_Check(item)) {
      throw py::type_error(std::string(what) + "[" + std::to_string(i) + "] is not a tensor");
    }
    out.push_back(THPVariable_Unpack(item));
  }
  return out;
}

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

  const at::Tensor& param(Py_ssize_t i) const {
    PyObject* p = PyList_GET_ITEM(params_, i);
    if (!THPVariable_Check(p)) throw py::type_error("params[" + std::to_string(i) + "] is not a tensor");
    return THPVariable_Unpack(p);
  }

  // false: no grad
  bool param_and_grad(Py_ssize_t i, std::vector<at::Tensor>& params, std::vector<at::Tensor>& grads) {
    if (owners_ != nullptr) return local_param_and_grad(i, params, grads);
    const at::Tensor& t = param(i);
    const at::Tensor& g = t.grad();
    if (!g.defined()) return false;
    params.push_back(t);
    grads.push_back(g);
    return true;
  }
  // DTensor params: false when the shard was replaced, there is no grad, or the grad is not
  // laid out by the param's own spec object.
  bool local_param_and_grad(Py_ssize_t i, std::vector<at::Tensor>& params, std::vector<at::Tensor>& grads) {
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
    params.push_back(THPVariable_Unpack(local));
    grads.push_back(THPVariable_Unpack(grad_local.ptr()));
    return true;
  }

  // false: the key is missing (or holds no tensor)
  bool state(Py_ssize_t i, PyObject* key, std::vector<at::Tensor>& out) {
    PyObject* d = PyList_GET_ITEM(states_, i);
    PyObject* v = PyDict_Check(d) ? PyDict_GetItem(d, key) : nullptr;  // borrowed
    if (v == nullptr || !THPVariable_Check(v)) return false;
    out.push_back(THPVariable_Unpack(v));
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
    lrs = tensor_list(lr_tensors, "lr_tensors");
    schedule_state = tensor_list(schedule_state_, "schedule_state");
  }
  at::Tensor hyper;
  std::optional<at::Tensor> grad_scale, found_inf, schedule;
  std::vector<at::Tensor> lrs, schedule_state;
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

// The state roles each group uses (bit k: role k), from its row of the hyper table.
std::vector<uint32_t> group_roles(RuleId id, const at::Tensor& hyper, size_t groups) {
  TORCH_CHECK(hyper.device().is_cpu() && hyper.scalar_type() == at::kDouble && hyper.dim() == 2 &&
                  hyper.is_contiguous() && hyper.size(0) == static_cast<int64_t>(groups),
              "fusedopt: hyper must be a contiguous float64 CPU table with a row per group");
  const double* rows = hyper.data_ptr<double>();
  const int64_t cols = hyper.size(1);
  std::vector<uint32_t> roles(groups);
  for (size_t g = 0; g < groups; ++g) {
    roles[g] = visit_rule(id, [&](auto r) { return role_mask<decltype(r)>(rows + g * cols); });
  }
  return roles;
}

// What a step reads of a plan's state dicts, in the op's order: each param's state tensors
// (the roles its group uses), the masters of its 16-bit params, its step counters.
struct PlanTensors {
  std::vector<at::Tensor> params, grads, states, masters, steps;
};

// Reads params (with their grads, unless `with_grads` is false) and state tensors from a plan.
// False, with `out` incomplete: a param has no grad or a state entry is missing (stale plan).
bool read_plan(RuleId id, PlanReader& plan, const std::vector<int64_t>& group_sizes,
               const std::vector<uint32_t>& roles, int64_t master_mode, bool with_grads,
               PlanTensors& out) {
  static PyObject* const k_step = interned("step");
  static PyObject* const k_master = interned("master_param");
  static PyObject* const k_remainder = interned("master_remainder");
  const RuleKeys& keys = rule_keys(id);
  PyObject* const master_key = master_mode == 1 ? k_master : (master_mode == 2 ? k_remainder : nullptr);
  const auto n = static_cast<size_t>(plan.size());
  out.params.reserve(n);
  out.grads.reserve(n);
  out.states.reserve(n * static_cast<size_t>(keys.num_roles));
  out.steps.reserve(keys.has_step ? n : 0);
  size_t group = 0;
  int64_t left = group_sizes.empty() ? 0 : group_sizes[0];
  for (Py_ssize_t i = 0; i < plan.size(); ++i) {
    while (left == 0 && group + 1 < group_sizes.size()) left = group_sizes[++group];
    --left;
    if (with_grads) {
      if (!plan.param_and_grad(i, out.params, out.grads)) return false;
    } else {
      out.params.push_back(plan.param(i));
    }
    const uint32_t r = roles[group];
    for (int k = 0; k < keys.num_roles; ++k) {
      if ((r & (1u << k)) && !plan.state(i, keys.roles[k], out.states)) return false;
    }
    if (master_key != nullptr && is_16bit(out.params.back()) && !plan.state(i, master_key, out.masters)) {
      return false;
    }
    if (keys.has_step && !plan.state(i, k_step, out.steps)) return false;
  }
  return true;
}

// torch.ops.fusedopt.step_ on a plan whose tensors are read anew at every step: each param's
// grad, its state tensors (by the rule's state-dict keys), its master and step counter. For
// DTensor params and state dicts the optimizer does not track (StepPlan below needs them).
bool plan_step(const std::string& rule, py::handle params, py::handle states,
               const std::vector<int64_t>& group_sizes, py::handle hyper, py::handle lr_tensors,
               const std::vector<int64_t>& fresh, py::handle grad_scale, py::handle found_inf,
               py::handle schedule_state, py::handle schedule, py::handle owners, py::handle clip,
               int64_t master_mode, int64_t seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusedopt::step_", "")
                             .typed<StepSig>();
  const RuleId id = rule_by_name("fusedopt.plan_step", rule);
  const GroupArgs a(hyper, lr_tensors, grad_scale, found_inf, schedule_state, schedule);
  PlanReader plan(params, states, owners);
  PlanTensors t;
  if (!read_plan(id, plan, group_sizes, group_roles(id, a.hyper, group_sizes.size()), master_mode,
                 /*with_grads=*/true, t)) {
    return false;
  }
  const std::optional<at::Tensor> clip_t = optional_tensor(clip, "clip");
  BelowAutograd below;
  op.call(rule, t.params, t.grads, t.states, t.masters, t.steps, group_sizes, a.hyper, a.lrs, fresh,
          a.grad_scale, a.found_inf, a.schedule_state, a.schedule, clip_t, master_mode, seed);
  return true;
}

// A plan of plain params whose state dicts the optimizer tracks (any edit to them rebuilds the
// plan on the Python side), validated once and kept as a table (StepArgs). Each step reads only
// what can change without such an edit: every param's grad and storage, checked against the
// table with grad_fits. Anything that does not fit (a grad of another dtype, shape, layout or
// device, a param given new data) makes the step validate everything again, exactly as the op
// does, raising the op's errors or refreshing the table. The step calls its device's kernel
// directly (the op's own backend code, registered as a StepRunner).
class StepPlan {
 public:
  StepPlan(RuleId id, std::string rule, PlanTensors tensors, std::vector<int64_t> group_sizes,
           std::vector<uint32_t> roles, int64_t master_mode)
      : id_(id), rule_(std::move(rule)), t_(std::move(tensors)),
        group_sizes_(std::move(group_sizes)), roles_(std::move(roles)), master_mode_(master_mode) {
    const c10::DeviceType type = t_.params.empty() ? c10::DeviceType::CPU : t_.params[0].device().type();
    run_ = step_runner(type);
    TORCH_CHECK(run_ != nullptr, "fusedopt: no fused step for params on ", c10::DeviceTypeName(type));
  }

  // False, having changed nothing: a param lost its grad or a group now uses other state roles.
  bool step(py::handle hyper, py::handle lr_tensors, const std::vector<int64_t>& fresh,
            py::handle grad_scale, py::handle found_inf, py::handle schedule_state,
            py::handle schedule, py::handle clip, int64_t seed) {
    const char* op = "fusedopt::step_";
    RECORD_FUNCTION(op, std::vector<c10::IValue>());
    const GroupArgs a(hyper, lr_tensors, grad_scale, found_inf, schedule_state, schedule);
    const std::optional<at::Tensor> clip_t = optional_tensor(clip, "clip");
    if (group_roles(id_, a.hyper, group_sizes_.size()) != roles_) return false;
    const size_t n = t_.params.size();
    const Check check = check_all(/*unscaling=*/a.grad_scale.has_value());
    if (check == Check::no_grad) return false;
    if (check == Check::fits) {
      for (const int64_t k : last_fresh_) table_.tensors[static_cast<size_t>(k)].fresh = false;
      read_hyper(op, a.hyper, table_.num_groups, table_.num_cols, table_);
      finish_step_args(op, table_, fresh, a.lrs, a.schedule_state, a.schedule, a.grad_scale,
                       a.found_inf, clip_t, seed);
    } else {
      valid_ = false;
      std::vector<at::Tensor> grads;  // for this call only: the plan keeps no grad alive
      grads.reserve(n);
      for (size_t i = 0; i < n; ++i) grads.push_back(grad_of(i));
      table_ = collect_step_args(op, rule_, t_.params, grads, t_.states, t_.masters, t_.steps,
                                 group_sizes_, a.hyper, a.lrs, fresh, a.grad_scale, a.found_inf,
                                 a.schedule_state, a.schedule, clip_t, master_mode_, seed);
      record_state_storage();
      table_.distinct_step_counters = step_counters_distinct(table_);
      table_.params_adjacent = any_params_adjacent(table_);
      valid_ = true;
    }
    last_fresh_ = fresh;
    run_(table_);
    return true;
  }

  enum class Check { fits, misfit, no_grad };
  // Params per thread in the per-step check: reading a param's objects is a few memory round
  // trips, which threads overlap as well as prefetches do, each core with its own.
  static constexpr int64_t kCheckGrain = 2048;

  // Whether every param has a grad (no_grad: one has none) that fits the table, and every state
  // tensor is where the table has it (misfit: validate again). Records the fitting grads'
  // addresses in the table and bumps the version of each fitting param (and, when the step
  // unscales them, its grad) as it goes, while the param's objects are in cache: a second pass
  // over the params for the versions cost a fifth of a flat 10,000-tensor step's host time. As
  // in the validating path (collect_common), a param bumped before a later param fails the check
  // keeps its new version even when the step then raises: versions only have to change when a
  // tensor may have, and a spurious one can only make autograd refuse, never accept, a backward.
  // Threads share the params and write only their own range's slots and counters.
  Check check_all(bool unscaling) {
    const size_t n = t_.params.size();
    std::atomic<bool> no_grad{false}, misfit{!valid_};
    at::parallel_for(0, static_cast<int64_t>(n), kCheckGrain, [&](int64_t b, int64_t e) {
      const auto begin = static_cast<size_t>(b), end = static_cast<size_t>(e);
      bool fits = !misfit.load(std::memory_order_relaxed) && states_unmoved(begin, end, n);
      for (size_t i = begin; i < end; ++i) {
        prefetch_ahead(i, end);
        const at::Tensor& g = grad_of(i);
        if (!g.defined()) {
          no_grad = true;
          return;
        }
        if (!fits) continue;
        TensorSlot& s = table_.tensors[i];
        if (grad_fits(g, t_.params[i], s, table_.device)) {
          s.grad = g.data_ptr();
          bump_version(t_.params[i]);
          if (unscaling) bump_version(g);
        } else {
          fits = false;
        }
      }
      if (!fits) misfit = true;
    });
    return no_grad ? Check::no_grad : (misfit ? Check::misfit : Check::fits);
  }

  // How many slots the last step's table runs as, merged as its backend merges them (device
  // step counters stay apart): tests check that a flat storage runs as one tensor per group.
  int64_t coalesced_slots() {
    if (!valid_) return -1;
    const CoalescedSlots flat(table_, table_.device.is_cpu());
    return static_cast<int64_t>(table_.tensors.size());
  }

 private:
  // What the loop above reads of each param lives in objects scattered over the heap: its
  // TensorImpl, AutogradMeta and StorageImpl, its grad's TensorImpl and StorageImpl. Read one
  // param after another, each is a memory round trip the loop waits on; fetched a few params
  // ahead, level by level (each level's address is in the level before), they overlap. A
  // TensorImpl spans several cache lines (sizes and strides sit between the storage and the
  // numel), so each is fetched whole.
  void prefetch_ahead(size_t i, size_t n) const {
    if (i + 16 < n) prefetch_object(t_.params[i + 16].unsafeGetTensorImpl());
    if (i + 8 < n) {
      const c10::TensorImpl* p = t_.params[i + 8].unsafeGetTensorImpl();
      if (const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(p->autograd_meta())) {
        __builtin_prefetch(&meta->grad_);
      }
      __builtin_prefetch(p->unsafe_storage().unsafeGetStorageImpl());
      // Its version counter, a heap object of its own, for the bump: its address read through
      // VariableVersion's one pointer member (torch gives no accessor; a prefetch of a wrong
      // address would only be useless, never unsafe).
      static_assert(sizeof(c10::VariableVersion) == sizeof(void*));
      __builtin_prefetch(*reinterpret_cast<const void* const*>(&p->version_counter()), 1);
    }
    if (i + 4 < n) {
      if (const c10::TensorImpl* g = grad_impl(i + 4)) prefetch_object(g);
    }
    if (i + 2 < n) {
      const c10::TensorImpl* g = grad_impl(i + 2);
      if (g != nullptr && g->has_storage()) __builtin_prefetch(g->unsafe_storage().unsafeGetStorageImpl());
    }
  }
  template <typename T>
  static void prefetch_object(const T* obj) {
    const char* p = reinterpret_cast<const char*>(obj);
    for (size_t off = 0; off < sizeof(T); off += 64) __builtin_prefetch(p + off);
    __builtin_prefetch(p + sizeof(T) - 1);
  }
  // The two cache lines of a TensorImpl that storage_of reads: its storage handle and, at the
  // end of the object in torch's layout, its offset and numel (a layout that moved them would
  // only make the second prefetch useless). Half of the lines prefetch_object would fetch.
  static void prefetch_storage_fields(const c10::TensorImpl* t) {
    __builtin_prefetch(&t->unsafe_storage());
    __builtin_prefetch(reinterpret_cast<const char*>(t) + sizeof(c10::TensorImpl) - 1);
  }
  // The param's grad, read as TensorImpl::grad() does but without its virtual call.
  const at::Tensor& grad_of(size_t i) const {
    static const at::Tensor undefined;
    const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(
        t_.params[i].unsafeGetTensorImpl()->autograd_meta());
    return meta == nullptr ? undefined : meta->grad_;
  }
  const c10::TensorImpl* grad_impl(size_t i) const {
    const at::Tensor& g = grad_of(i);
    return g.defined() ? g.unsafeGetTensorImpl() : nullptr;
  }

  // Every state tensor of params [begin, end) (of n) still has the storage and size the table
  // was validated with (a storage swapped in place, `.data = ...` or `.set_()`, makes the step
  // validate again). Each list is split in proportion to the params (threads take their share).
  bool states_unmoved(size_t begin, size_t end, size_t n) const {
    size_t offset = 0;
    for (const std::vector<at::Tensor>* list : {&t_.states, &t_.masters, &t_.steps}) {
      const size_t m = list->size(), from = begin * m / n, to = end * m / n;
      for (size_t j = from; j < to; ++j) {
        if (j + 8 < to) prefetch_storage_fields((*list)[j + 8].unsafeGetTensorImpl());
        if (!(storage_of((*list)[j]) == held_[offset + j])) return false;
      }
      offset += m;
    }
    return true;
  }
  void record_state_storage() {
    held_.clear();
    for (const std::vector<at::Tensor>* list : {&t_.states, &t_.masters, &t_.steps}) {
      for (const at::Tensor& t : *list) held_.push_back(storage_of(t));
    }
  }
  // Where a tensor's elements are, read from its TensorImpl alone: `.data = `, `.set_()` and a
  // resize_ (which changes the size, or reallocates only when it grows) all change one of these.
  struct StateStorage {
    const void* storage;
    int64_t offset, numel;
    bool operator==(const StateStorage& o) const {
      return storage == o.storage && offset == o.offset && numel == o.numel;
    }
  };
  static StateStorage storage_of(const at::Tensor& t) {
    const c10::TensorImpl* i = t.unsafeGetTensorImpl();
    return {i->unsafe_storage().unsafeGetStorageImpl(), i->storage_offset(), i->numel()};
  }

  RuleId id_;
  std::string rule_;
  PlanTensors t_;  // params and state tensors (its grads stay empty: read at every step)
  std::vector<StateStorage> held_;  // of t_'s states, masters and steps, in that order
  std::vector<int64_t> group_sizes_;
  std::vector<uint32_t> roles_;
  int64_t master_mode_;
  StepRunner run_ = nullptr;
  StepArgs table_;
  bool valid_ = false;  // table_ was validated by collect_step_args
  std::vector<int64_t> last_fresh_;
};

// A StepPlan over the params and state dicts, or None when a state entry is missing (the
// optimizer's plan is stale).
py::object make_step_plan(const std::string& rule, py::handle params, py::handle states,
                          const std::vector<int64_t>& group_sizes, py::handle hyper,
                          int64_t master_mode) {
  const RuleId id = rule_by_name("fusedopt.StepPlan", rule);
  std::vector<uint32_t> roles = group_roles(id, tensor(hyper, "hyper"), group_sizes.size());
  PlanReader plan(params, states, py::none());
  PlanTensors t;
  if (!read_plan(id, plan, group_sizes, roles, master_mode, /*with_grads=*/false, t)) {
    return py::none();
  }
  return py::cast(StepPlan(id, rule, std::move(t), group_sizes, std::move(roles), master_mode));
}

// Whether the sequences in `lists`, one after another, hold exactly the objects of `expected`
// (identity): the plan's check that no param was replaced in its group's list, at a pointer
// comparison per param.
bool same_items(py::handle lists, py::handle expected) {
  const py::list want = py::reinterpret_borrow<py::list>(expected);
  Py_ssize_t j = 0;
  for (const py::handle list : py::reinterpret_borrow<py::list>(lists)) {
    const py::object seq = py::reinterpret_steal<py::object>(PySequence_Fast(list.ptr(), "params must be a sequence"));
    if (!seq) throw py::error_already_set();
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
    if (j + n > PyList_GET_SIZE(want.ptr())) return false;
    PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
    for (Py_ssize_t k = 0; k < n; ++k) {
      if (items[k] != PyList_GET_ITEM(want.ptr(), j + k)) return false;
    }
    j += n;
  }
  return j == PyList_GET_SIZE(want.ptr());
}

}  // namespace

void register_eager_entry(py::module_& m) {
  m.def("same_items", &same_items, py::arg("lists"), py::arg("expected"),
        "Whether the lists, concatenated, hold exactly the objects of expected (a list), by identity.");
  m.def("plan_step", &plan_step, py::arg("rule"), py::arg("params"), py::arg("states"),
        py::arg("group_sizes"), py::arg("hyper"), py::arg("lr_tensors"), py::arg("fresh"),
        py::arg("grad_scale"), py::arg("found_inf"), py::arg("schedule_state"),
        py::arg("schedule"), py::arg("owners") = py::none(), py::arg("clip") = py::none(),
        py::arg("master_mode") = 0, py::arg("seed") = -1,
        "torch.ops.fusedopt.step_ on a plan (params and their state dicts), read anew: grads, state "
        "tensors, masters and step counters are read here, without boxing. With owners (DTensor "
        "params whose local shards params holds), grads are read from them. False, with nothing "
        "changed: the plan is stale.");
  py::class_<StepPlan>(m, "StepPlan",
                       "A validated step over plain params and tracked state dicts: each step "
                       "re-reads only the grads and the params' storage.")
      .def("step", &StepPlan::step, py::arg("hyper"), py::arg("lr_tensors"), py::arg("fresh"),
           py::arg("grad_scale"), py::arg("found_inf"), py::arg("schedule_state"),
           py::arg("schedule"), py::arg("clip") = py::none(), py::arg("seed") = -1,
           "One fused step. False, with nothing changed: a param lost its grad (rebuild the plan).")
      .def("coalesced_slots", &StepPlan::coalesced_slots,
           "The tensor slots its last step ran as, adjacent flat params merged (-1: no step yet).");
  m.def("make_step_plan", &make_step_plan, py::arg("rule"), py::arg("params"), py::arg("states"),
        py::arg("group_sizes"), py::arg("hyper"), py::arg("master_mode") = 0,
        "A StepPlan, or None when a state entry is missing.");
}

}  // namespace fusedopt
