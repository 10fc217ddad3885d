#include "step_args.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include <string>
#include <utility>

#include "update_rules.h"

namespace fusedopt {
namespace {

// The storage type of a float32/float64/float16/bfloat16 tensor; false for any other dtype.
bool float_elem(const at::Tensor& t, Elem& out) {
  switch (t.scalar_type()) {
    case at::kFloat: out = Elem::f32; return true;
    case at::kDouble: out = Elem::f64; return true;
    case at::kHalf: out = Elem::f16; return true;
    case at::kBFloat16: out = Elem::bf16; return true;
    default: return false;
  }
}

Elem elem_of(const char* op, const char* what, int64_t i, const at::Tensor& t) {
  Elem e = Elem::f32;
  TORCH_CHECK_TYPE(float_elem(t, e), op, ": ", what, "[", i, "] has dtype ", t.scalar_type(),
                   "; fusedopt supports float32, float64, float16 and bfloat16 params",
                   t.is_complex() ? " (complex params are passed as real views by the "
                                    "optimizer classes)" : "");
  return e;
}

// The kernels walk a param and its companions with one index over their memory.
bool same_layout(const at::Tensor& t, const at::Tensor& param) {
  return (t.is_contiguous() && param.is_contiguous()) || t.strides() == param.strides() ||
         t.numel() <= 1;
}

// A companion of params[i] (its grad or a state tensor) must match it exactly in dtype,
// shape, device and memory layout, since the kernels walk all of them with one index.
void* companion_ptr(const char* op, const char* what, int64_t i, const at::Tensor& t,
                    const at::Tensor& param, int64_t pi, bool same_dtype = true) {
  TORCH_CHECK(t.defined(), op, ": ", what, "[", i, "] is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", what, "[", i, "] is sparse (layout ",
              t.layout(), "); fusedopt does not support sparse gradients, please consider "
              "SparseAdam instead");
  TORCH_CHECK(t.device() == param.device(), op, ": ", what, "[", i, "] is on ", t.device(),
              " but params[", pi, "] is on ", param.device());
  if (same_dtype) {
    TORCH_CHECK_TYPE(t.scalar_type() == param.scalar_type(), op, ": ", what, "[", i,
                     "] has dtype ", t.scalar_type(), " but params[", pi, "] has dtype ",
                     param.scalar_type());
  }
  TORCH_CHECK(t.sizes() == param.sizes(), op, ": ", what, "[", i, "] has shape ", t.sizes(),
              " but params[", pi, "] has shape ", param.sizes());
  TORCH_CHECK(same_layout(t, param), op, ": ", what, "[", i,
              "] has strides ", t.strides(), " but params[", pi, "] has strides ",
              param.strides(), "; fusedopt needs a gradient and state laid out like the "
              "param (a grad set by hand: give it the param's layout, e.g. torch.empty_like(param)"
              ".copy_(grad); the optimizer classes copy a state into its param's layout)");
  return t.data_ptr();
}

void check_param(const char* op, int64_t i, const at::Tensor& p) {
  TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined");
  TORCH_CHECK(p.layout() == at::kStrided, op, ": params[", i, "] is not a dense tensor");
  TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": params[", i, "] of shape ", p.sizes(),
              " and strides ", p.strides(), " is a view with gaps or overlaps; fusedopt "
              "updates dense tensors only (make the parameter contiguous)");
}

// Maps tensor i of the step to its param group through the group sizes.
std::vector<int32_t> groups_of(const char* op, c10::IntArrayRef group_sizes, int64_t n) {
  std::vector<int32_t> group(static_cast<size_t>(n));
  int64_t i = 0;
  for (size_t g = 0; g < group_sizes.size(); ++g) {
    TORCH_CHECK(group_sizes[g] >= 0, op, ": group_sizes[", g, "] is negative");
    TORCH_CHECK(i + group_sizes[g] <= n, op, ": group_sizes add up to more than the ", n,
                " params given");
    for (int64_t k = 0; k < group_sizes[g]; ++k) group[static_cast<size_t>(i++)] = static_cast<int32_t>(g);
  }
  TORCH_CHECK(i == n, op, ": group_sizes add up to ", i, " but ", n, " params were given");
  return group;
}

}  // namespace

void read_hyper(const char* op, const at::Tensor& hyper, int64_t groups, int64_t cols,
                StepArgs& out) {
  TORCH_CHECK(hyper.device().is_cpu() && hyper.scalar_type() == at::kDouble && hyper.dim() == 2,
              op, ": hyper must be a 2-D float64 CPU tensor, got ", hyper.scalar_type(), " of ",
              hyper.dim(), " dims on ", hyper.device());
  TORCH_CHECK(hyper.size(0) == groups && hyper.size(1) == cols, op, ": hyper has shape ",
              hyper.sizes(), " but ", groups, " groups of ", cols, " columns were expected");
  const at::Tensor h = hyper.contiguous();
  const double* data = h.data_ptr<double>();
  out.hyper.assign(data, data + groups * cols);
  out.num_groups = groups;
  out.num_cols = cols;
}

namespace {

// Resolves the lr of each group: a float in its lr column, or an index into lr_tensors. Each lr
// tensor is recorded (out.lr_tensor); a CPU one's value is also written into the lr column and
// its index cleared, so kernels that read host values need nothing else.
void resolve_lrs(const char* op, StepArgs& out, at::TensorList lr_tensors) {
  const int lr_col = col::lr, index_col = col::lr_index;
  out.lr_tensor.assign(static_cast<size_t>(out.num_groups), LrTensor{});
  for (int64_t g = 0; g < out.num_groups; ++g) {
    const double idx = out.at(g, index_col);
    TORCH_CHECK(idx == -1.0 || (idx >= 0.0 && idx == static_cast<double>(static_cast<int64_t>(idx))), op,
                ": group ", g, " has lr_index ", idx, "; it must be -1 (the lr column holds the lr) or "
                "the index of a tensor in lr_tensors");
    if (idx < 0) continue;
    const auto k = static_cast<int64_t>(idx);
    TORCH_CHECK(k < static_cast<int64_t>(lr_tensors.size()), op, ": group ", g,
                " refers to lr_tensors[", k, "] but only ", lr_tensors.size(), " were given");
    const at::Tensor& lr = lr_tensors[k];
    check_scalar_tensor(op, "lr", lr, out.device);
    const bool wide = lr.scalar_type() == at::kFloat || lr.scalar_type() == at::kDouble;
    TORCH_CHECK_TYPE(wide || lr.device().is_cpu(), op, ": an lr tensor on ", lr.device(),
                     " must be float32 or float64, got ", lr.scalar_type());
    if (wide) {
      out.lr_tensor[static_cast<size_t>(g)] = {lr.data_ptr(), lr.scalar_type() == at::kDouble,
                                               lr.device().is_cpu()};
    }
    if (lr.device().is_cpu()) {
      out.hyper[g * out.num_cols + lr_col] = lr.item<double>();
      out.hyper[g * out.num_cols + index_col] = -1.0;
    }
  }
}

// Validates the in-kernel schedule arguments and records them in `out`.
void read_schedule(const char* op, StepArgs& out, at::TensorList schedule_state,
                   const std::optional<at::Tensor>& schedule) {
  const int begin_col = col::sched_begin, count_col = col::sched_count;
  out.schedule_out.assign(static_cast<size_t>(out.num_groups), ScheduleOut{});
  out.schedule_step = nullptr;  // (a plan's table keeps the last step's)
  out.phases.clear();
  int64_t scheduled = 0;
  for (int64_t g = 0; g < out.num_groups; ++g) scheduled += out.at(g, count_col) > 0 ? 1 : 0;
  if (scheduled == 0 && schedule_state.empty()) return;
  TORCH_CHECK(schedule.has_value(), op, ": groups have in-kernel schedules but no schedule table "
              "was given");
  const at::Tensor& table = *schedule;
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kDouble && table.dim() == 2 &&
                  table.size(1) == phase_col::count,
              op, ": schedule must be a float64 CPU tensor of shape [rows, ", phase_col::count,
              "], got ", table.scalar_type(), " of shape ", table.sizes(), " on ", table.device());
  const at::Tensor rows = table.contiguous();
  out.phases.assign(rows.data_ptr<double>(), rows.data_ptr<double>() + rows.numel());
  TORCH_CHECK(static_cast<int64_t>(schedule_state.size()) == scheduled + 1, op,
              ": schedule_state must hold the step counter and one lr tensor for each of the ",
              scheduled, " scheduled groups, got ", schedule_state.size(), " tensors");
  const at::Tensor& counter = schedule_state[0];
  TORCH_CHECK(counter.numel() == 1 && counter.scalar_type() == at::kLong &&
                  counter.device() == out.device,
              op, ": schedule_state[0] must be a one-element int64 step counter on ", out.device,
              ", got ", counter.scalar_type(), " with ", counter.numel(), " elements on ",
              counter.device());
  out.schedule_step = counter.data_ptr<int64_t>();
  int64_t k = 1;
  for (int64_t g = 0; g < out.num_groups; ++g) {
    const double count = out.at(g, count_col), begin = out.at(g, begin_col);
    if (count <= 0) continue;
    TORCH_CHECK(begin >= 0 && begin + count <= static_cast<double>(table.size(0)), op,
                ": group ", g, " names schedule rows [", begin, ", ", begin + count,
                ") but the table has ", table.size(0), " rows");
    const at::Tensor& lr = schedule_state[k++];
    TORCH_CHECK(lr.numel() == 1 && lr.device() == out.device &&
                    (lr.scalar_type() == at::kFloat || lr.scalar_type() == at::kDouble),
                op, ": the lr tensor of scheduled group ", g, " must be a one-element float32 or "
                "float64 tensor on ", out.device);
    out.schedule_out[static_cast<size_t>(g)] = {lr.data_ptr(), lr.scalar_type() == at::kDouble};
  }
}

}  // namespace

void bump_version(const at::Tensor& t) { t.unsafeGetTensorImpl()->bump_version(); }

bool grad_fits(const at::Tensor& grad, const at::Tensor& param, const TensorSlot& s,
               c10::Device device) {
  Elem e = Elem::f32;
  return param.layout() == at::kStrided && param.data_ptr() == s.param &&
         param.numel() == s.numel && float_elem(param, e) && e == s.dtype &&
         param.is_non_overlapping_and_dense() && grad.layout() == at::kStrided &&
         grad.device() == device && grad.scalar_type() == param.scalar_type() &&
         grad.sizes() == param.sizes() && same_layout(grad, param);
}

namespace {

// Whether `role` of the next slot starts where the current run's ends (both null: unused).
bool continues(const void* run, int64_t run_numel, const void* next, Elem e) {
  if (run == nullptr || next == nullptr) return run == next;
  return static_cast<const char*>(run) + run_numel * elem_size(e) == next;
}

double step_value(const void* p, bool is_double) {
  return is_double ? *static_cast<const double*>(p) : static_cast<double>(*static_cast<const float*>(p));
}

bool joins(const TensorSlot& run, const TensorSlot& s, bool merge_steps) {
  if (s.numel == 0 || run.numel == 0 || s.group != run.group || s.dtype != run.dtype ||
      s.master_kind != run.master_kind || s.fresh != run.fresh ||
      s.step_is_double != run.step_is_double) {
    return false;
  }
  const Elem master = run.master_kind == Master::full ? Elem::f32 : Elem::i16;
  if (!continues(run.param, run.numel, s.param, s.dtype) ||
      !continues(run.grad, run.numel, s.grad, s.dtype) ||
      !continues(run.master, run.numel, s.master, master)) {
    return false;
  }
  for (int k = 0; k < kMaxStates; ++k) {
    if (s.state_dtype[k] != run.state_dtype[k] ||
        !continues(run.state[k], run.numel, s.state[k], run.state_dtype[k])) {
      return false;
    }
  }
  if (run.step == nullptr || s.step == nullptr) return run.step == s.step;
  const Elem counter = run.step_is_double ? Elem::f64 : Elem::f32;
  return merge_steps && continues(run.step, run.step_count, s.step, counter) &&
         step_value(run.step, run.step_is_double) == step_value(s.step, s.step_is_double);
}

}  // namespace

bool coalesce_slots(const StepTable& t, bool merge_steps, std::vector<TensorSlot>& out) {
  const std::vector<TensorSlot>& in = t.tensors;
  if (t.rounding_seed >= 0 || !t.params_adjacent) return false;
  size_t first = 1;  // the first slot that joins its predecessor
  while (first < in.size() && !joins(in[first - 1], in[first], merge_steps)) ++first;
  if (first >= in.size()) return false;
  out.assign(in.begin(), in.begin() + static_cast<std::ptrdiff_t>(first));
  for (size_t i = first; i < in.size(); ++i) {
    TensorSlot& run = out.back();
    if (joins(run, in[i], merge_steps)) {
      run.numel += in[i].numel;
      if (run.step != nullptr) run.step_count += in[i].step_count;
    } else {
      out.push_back(in[i]);
    }
  }
  return true;
}

bool any_params_adjacent(const StepTable& t) {
  for (size_t i = 1; i < t.tensors.size(); ++i) {
    const TensorSlot &a = t.tensors[i - 1], &b = t.tensors[i];
    if (a.dtype == b.dtype && a.param != nullptr && continues(a.param, a.numel, b.param, a.dtype)) return true;
  }
  return false;
}

bool step_counters_distinct(const StepTable& t) {
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;  // [first byte, end) of each slot's counters
  spans.reserve(t.tensors.size());
  for (const TensorSlot& s : t.tensors) {
    if (s.step == nullptr) continue;
    const auto first = reinterpret_cast<uintptr_t>(s.step);
    spans.emplace_back(first, first + static_cast<uintptr_t>(s.step_count) * (s.step_is_double ? 8 : 4));
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].first < spans[i - 1].second) return false;
  }
  return true;
}

namespace {
StepRunner runners[static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)] = {};
}  // namespace

bool register_step_runner(c10::DeviceType type, StepRunner run) {
  runners[static_cast<size_t>(type)] = run;
  return true;
}

StepRunner step_runner(c10::DeviceType type) { return runners[static_cast<size_t>(type)]; }

double scheduled_lr(const StepTable& args, int64_t group, double t) {
  const double count = args.at(group, col::sched_count);
  if (count <= 0) return args.at(group, col::lr);
  const auto begin = static_cast<int64_t>(args.at(group, col::sched_begin));
  return schedule_lr(args.phases.data() + begin * phase_col::count, static_cast<int64_t>(count), t);
}

void check_kernel_steps(const char* op, const StepTable& args) {
  for (size_t i = 0; i < args.tensors.size(); ++i) {
    const TensorSlot& s = args.tensors[i];
    TORCH_CHECK_TYPE(s.step == nullptr || !s.step_is_double, op, ": state_steps[", i,
                     "] must be float32 on CUDA (the kernel increments it in place), got Double");
  }
}

void check_scalar_tensor(const char* op, const char* what, const at::Tensor& t,
                         c10::Device device) {
  TORCH_CHECK(t.numel() == 1, op, ": ", what, " must have exactly one element, got ", t.numel());
  TORCH_CHECK(t.device().is_cpu() || t.device() == device, op, ": ", what, " is on ", t.device(),
              " but the params are on ", device);
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", what,
                   " must be a floating-point tensor, got ", t.scalar_type());
}

namespace {

// What both ops share: the hyperparameter table, each tensor's group, and each param with its
// gradient (checked, recorded, version bumped). The op then adds its state tensors.
StepArgs collect_common(const char* op, RuleId rule, at::TensorList params, at::TensorList grads,
                        c10::IntArrayRef group_sizes, const at::Tensor& hyper, bool unscaling) {
  const auto n = static_cast<int64_t>(params.size());
  TORCH_CHECK(grads.size() == params.size(), op, ": params and grads must have the same "
              "length, got ", params.size(), " and ", grads.size());
  const int64_t cols = visit_rule(rule, [](auto r) { return static_cast<int64_t>(decltype(r)::count); });
  StepArgs out;
  out.rule = rule;
  read_hyper(op, hyper, static_cast<int64_t>(group_sizes.size()), cols, out);
  const std::vector<int32_t> group = groups_of(op, group_sizes, n);
  if (n > 0) out.device = params[0].device();
  out.tensors.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_param(op, i, p);
    TORCH_CHECK(p.device() == out.device, op, ": params[", i, "] is on ", p.device(),
                " but params[0] is on ", out.device, "; call the op once per device");
    TensorSlot& s = out.tensors[static_cast<size_t>(i)];
    s.param = p.data_ptr();
    bump_version(p);
    s.grad = companion_ptr(op, "grads", i, grads[i], p, i);
    if (unscaling) bump_version(grads[i]);
    s.numel = p.numel();
    s.group = group[static_cast<size_t>(i)];
    s.dtype = elem_of(op, "params", i, p);
  }
  return out;
}

struct Range {
  uintptr_t begin, end;
  size_t i;
};

// Sorts ranges by address. Tensors allocated one after another are ascending but for a few jumps
// (a few dozen among 10,000): their ascending runs are merged pairwise, in O(n log runs), where a
// full sort of 10,000 cost half as much as the rest of an op's validation.
void sort_by_begin(std::vector<Range>& r) {
  const auto less = [](const Range& a, const Range& b) { return a.begin < b.begin; };
  std::vector<size_t> runs{0};
  for (size_t k = 1; k < r.size(); ++k) {
    if (less(r[k], r[k - 1])) runs.push_back(k);
  }
  if (runs.size() > 256) {
    std::sort(r.begin(), r.end(), less);
    return;
  }
  runs.push_back(r.size());  // runs[j] .. runs[j + 1]: run j
  while (runs.size() > 2) {
    std::vector<size_t> merged{0};
    for (size_t j = 0; j + 2 < runs.size(); j += 2) {
      const auto at = [&](size_t k) { return r.begin() + static_cast<std::ptrdiff_t>(runs[k]); };
      std::inplace_merge(at(j), at(j + 1), at(j + 2), less);
      merged.push_back(runs[j + 2]);
    }
    if (runs.size() % 2 == 0) merged.push_back(runs.back());  // an odd run out, kept for the next pass
    runs = std::move(merged);
  }
}

// The first two slots (by index) whose `span`s (begin, end byte addresses; empty: none) overlap,
// if any. Spans are usually in ascending address order already (flat storage, or tensors
// allocated in param order) or nearly so: one pass checks that, and sorting is only needed to
// find the pair.
template <typename SpanOf>
std::optional<std::pair<size_t, size_t>> overlapping_slots(const StepArgs& out, const SpanOf& span) {
  std::vector<Range> ranges;
  ranges.reserve(out.tensors.size());
  for (size_t i = 0; i < out.tensors.size(); ++i) {
    const auto [b, e] = span(out.tensors[i]);
    if (b != e) ranges.push_back({b, e, i});
  }
  const auto apart = [](const Range& a, const Range& b) { return a.end <= b.begin; };
  bool ordered = true;
  for (size_t k = 1; k < ranges.size() && ordered; ++k) ordered = apart(ranges[k - 1], ranges[k]);
  if (ordered) return std::nullopt;
  sort_by_begin(ranges);
  for (size_t k = 1; k < ranges.size(); ++k) {
    if (!apart(ranges[k - 1], ranges[k])) {
      return std::make_pair(std::min(ranges[k - 1].i, ranges[k].i), std::max(ranges[k - 1].i, ranges[k].i));
    }
  }
  return std::nullopt;
}

using Span = std::pair<uintptr_t, uintptr_t>;
Span bytes_of(const TensorSlot& s, const void* p, int64_t elem) {
  const auto b = reinterpret_cast<uintptr_t>(p);
  return {b, p == nullptr ? b : b + static_cast<uintptr_t>(s.numel * elem)};
}

// Every tensor a step writes is updated by one thread (or CUDA block) per chunk, all chunks at
// once: two params (or their states, masters) sharing memory would be updated concurrently, a
// race whose result depends on the timing. Refused, naming both (the optimizer classes refuse a
// param listed twice before this). Run where the arguments are validated: a plan's later steps
// keep these tensors (their storage is checked at every step).
void check_written_apart(const char* op, const StepArgs& out) {
  if (const auto pair = overlapping_slots(out, [](const TensorSlot& s) { return bytes_of(s, s.param, elem_size(s.dtype)); })) {
    TORCH_CHECK(false, op, ": params[", pair->first, "] and params[", pair->second, "] share memory; "
                "the step updates every param of a call at once, in parallel, so a param given twice "
                "(or two overlapping views) would be updated concurrently: give each param once");
  }
  if (const auto pair = overlapping_slots(out, [](const TensorSlot& s) {
        return bytes_of(s, s.master, s.master_kind == Master::full ? 4 : 2);
      })) {
    TORCH_CHECK(false, op, ": the masters of params[", pair->first, "] and params[", pair->second,
                "] share memory; each param needs a master of its own");
  }
  const char* const* roles = visit_rule(out.rule, [](auto r) { return decltype(r)::kRoles; });
  const int num_roles = visit_rule(out.rule, [](auto r) { return decltype(r)::kStates; });
  for (int k = 0; k < num_roles; ++k) {
    if (const auto pair = overlapping_slots(out, [&](const TensorSlot& s) {
          return bytes_of(s, s.state[k], elem_size(s.state_dtype[k]));
        })) {
      TORCH_CHECK(false, op, ": the '", roles[k], "' states of params[", pair->first, "] and params[",
                  pair->second, "] share memory; each param needs state tensors of its own");
    }
  }
}

// With a grad scale every kernel writes each grad back unscaled, in place (as torch's fused
// optimizers do): a grad shared by two params would be unscaled twice, concurrently. Grads can
// change at every step: checked at every step that unscales.
void check_grads_apart(const char* op, const StepArgs& out) {
  if (const auto pair = overlapping_slots(out, [](const TensorSlot& s) { return bytes_of(s, s.grad, elem_size(s.dtype)); })) {
    TORCH_CHECK(false, op, ": params[", pair->first, "] and params[", pair->second, "] have grads that "
                "share memory; with a grad scale (GradScaler) the step unscales every grad in place, so a "
                "shared grad would be unscaled twice: give each param a grad of its own (e.g. .clone())");
  }
}

// The arguments after the tensor lists, also shared: lr tensors, the in-kernel schedule, the
// GradScaler scalars and the clip.
void finish_common(const char* op, StepArgs& out, at::TensorList lr_tensors,
                   at::TensorList schedule_state, const std::optional<at::Tensor>& schedule,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& clip = std::nullopt) {
  resolve_lrs(op, out, lr_tensors);
  read_schedule(op, out, schedule_state, schedule);
  if (grad_scale.has_value()) {
    check_scalar_tensor(op, "grad_scale", *grad_scale, out.device);
    check_grads_apart(op, out);
  }
  if (found_inf.has_value()) check_scalar_tensor(op, "found_inf", *found_inf, out.device);
  if (clip.has_value()) {
    const at::Tensor& c = *clip;
    TORCH_CHECK(c.numel() == 2 && (c.scalar_type() == at::kFloat || c.scalar_type() == at::kDouble) &&
                    c.is_contiguous() && (out.tensors.empty() || c.device() == out.device),
                op, ": clip must be a contiguous float32 or float64 tensor of 2 elements (the grad "
                "norm and the clip coefficient, from fusedopt::grad_norm_) on ", out.device, ", got ",
                c.scalar_type(), " with ", c.numel(), " elements on ", c.device());
  }
  out.grad_scale = grad_scale;
  out.found_inf = found_inf;
  out.clip_data = clip.has_value() ? clip->data_ptr() : nullptr;
  out.clip_is_double = clip.has_value() && clip->scalar_type() == at::kDouble;
}

// A param's step counter: one element, float32 or float64, on the step's device.
void read_step(const char* op, int64_t i, const at::Tensor& st, TensorSlot& s, c10::Device device) {
  TORCH_CHECK(st.numel() == 1, op, ": state_steps[", i, "] must have one element, got ",
              st.numel());
  TORCH_CHECK(st.scalar_type() == at::kFloat || st.scalar_type() == at::kDouble, op,
              ": state_steps[", i, "] must be float32 or float64, got ", st.scalar_type());
  TORCH_CHECK(st.device() == device, op, ": state_steps[", i, "] is on ", st.device(),
              " but params[", i, "] is on ", device);
  s.step = st.data_ptr();
  s.step_is_double = st.scalar_type() == at::kDouble;
}

Elem state_elem(const char* op, int64_t k, const at::Tensor& t) {
  Elem e = Elem::f32;
  TORCH_CHECK_TYPE(float_elem(t, e), op, ": states[", k, "] has dtype ", t.scalar_type(),
                   "; optimizer states may be float32, float64, float16 or bfloat16");
  return e;
}

}  // namespace

StepArgs collect_adam_args(const char* op, at::TensorList params, at::TensorList grads,
                           at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                           at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                           c10::IntArrayRef group_sizes, const at::Tensor& hyper,
                           at::TensorList lr_tensors, const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf,
                           at::TensorList schedule_state, const std::optional<at::Tensor>& schedule) {
  using R = AdamRule;
  const auto n = static_cast<int64_t>(params.size());
  TORCH_CHECK(grads.size() == params.size() && exp_avgs.size() == params.size() &&
                  exp_avg_sqs.size() == params.size() && state_steps.size() == params.size(),
              op, ": params, grads, exp_avgs, exp_avg_sqs and state_steps must have the same "
              "length, got ", params.size(), ", ", grads.size(), ", ", exp_avgs.size(), ", ",
              exp_avg_sqs.size(), " and ", state_steps.size());
  StepArgs out = collect_common(op, RuleId::adam, params, grads, group_sizes, hyper,
                                grad_scale.has_value());
  size_t next_max = 0;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TensorSlot& s = out.tensors[static_cast<size_t>(i)];
    s.state[0] = companion_ptr(op, "exp_avgs", i, exp_avgs[i], p, i);
    s.state[1] = companion_ptr(op, "exp_avg_sqs", i, exp_avg_sqs[i], p, i);
    s.state_dtype[0] = s.state_dtype[1] = s.state_dtype[2] = s.dtype;
    if (out.at(s.group, R::amsgrad) != 0.0) {
      TORCH_CHECK(next_max < max_exp_avg_sqs.size(), op, ": params[", i, "] is in an amsgrad "
                  "group but max_exp_avg_sqs has only ", max_exp_avg_sqs.size(), " tensors");
      s.state[2] = companion_ptr(op, "max_exp_avg_sqs", static_cast<int64_t>(next_max),
                               max_exp_avg_sqs[next_max], p, i);
      ++next_max;
    }
    read_step(op, i, state_steps[i], s, out.device);
  }
  TORCH_CHECK(next_max == max_exp_avg_sqs.size(), op, ": max_exp_avg_sqs has ",
              max_exp_avg_sqs.size(), " tensors but the amsgrad groups hold ", next_max, " params");
  finish_common(op, out, lr_tensors, schedule_state, schedule, grad_scale, found_inf);
  check_written_apart(op, out);
  return out;
}

StepArgs collect_sgd_args(const char* op, at::TensorList params, at::TensorList grads,
                          at::TensorList momentum_buffers, c10::IntArrayRef group_sizes,
                          const at::Tensor& hyper, at::TensorList lr_tensors,
                          c10::IntArrayRef fresh_buffers,
                          const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf,
                          at::TensorList schedule_state, const std::optional<at::Tensor>& schedule) {
  using R = SgdRule;
  const auto n = static_cast<int64_t>(params.size());
  StepArgs out = collect_common(op, RuleId::sgd, params, grads, group_sizes, hyper,
                                grad_scale.has_value());
  size_t next_buf = 0;
  for (int64_t i = 0; i < n; ++i) {
    TensorSlot& s = out.tensors[static_cast<size_t>(i)];
    s.state_dtype[0] = s.dtype;
    if (out.at(s.group, R::momentum) == 0.0) continue;
    TORCH_CHECK(next_buf < momentum_buffers.size(), op, ": params[", i, "] is in a group "
                "with momentum but momentum_buffers has only ", momentum_buffers.size(),
                " tensors");
    s.state[0] = companion_ptr(op, "momentum_buffers", static_cast<int64_t>(next_buf),
                             momentum_buffers[next_buf], params[i], i);
    ++next_buf;
  }
  TORCH_CHECK(next_buf == momentum_buffers.size(), op, ": momentum_buffers has ",
              momentum_buffers.size(), " tensors but the groups with momentum hold ", next_buf,
              " params");
  for (const int64_t k : fresh_buffers) {
    // (a zero-element buffer has a null data pointer: ask the group, not the pointer)
    TORCH_CHECK(k >= 0 && k < n && out.at(out.tensors[static_cast<size_t>(k)].group, R::momentum) != 0.0,
                op, ": fresh_buffers names params[", k, "], which has no momentum buffer");
    out.tensors[static_cast<size_t>(k)].fresh = true;
  }
  finish_common(op, out, lr_tensors, schedule_state, schedule, grad_scale, found_inf);
  check_written_apart(op, out);
  return out;
}

RuleId rule_by_name(const char* op, const std::string& name) {
  for (int id = 0; id < kNumRules; ++id) {
    const char* n = visit_rule(static_cast<RuleId>(id), [](auto r) { return decltype(r)::kName; });
    if (name == n) return static_cast<RuleId>(id);
  }
  TORCH_CHECK(false, op, ": unknown rule '", name, "' (known: adam, sgd, rmsprop, adagrad, lion)");
  return RuleId::adam;
}

void finish_step_args(const char* op, StepArgs& out, c10::IntArrayRef fresh,
                      at::TensorList lr_tensors, at::TensorList schedule_state,
                      const std::optional<at::Tensor>& schedule,
                      const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& clip, int64_t seed) {
  const auto n = static_cast<int64_t>(out.tensors.size());
  for (const int64_t k : fresh) {
    // (a zero-element buffer has a null data pointer: ask the group, not the pointer)
    TORCH_CHECK(k >= 0 && k < n && out.rule == RuleId::sgd &&
                    out.at(out.tensors[static_cast<size_t>(k)].group, SgdRule::momentum) != 0.0,
                op, ": fresh names params[", k, "], which has no momentum buffer to start");
    out.tensors[static_cast<size_t>(k)].fresh = true;
  }
  out.rounding_seed = seed;
  finish_common(op, out, lr_tensors, schedule_state, schedule, grad_scale, found_inf, clip);
}

StepArgs collect_step_args(const char* op, const std::string& rule_name, at::TensorList params,
                           at::TensorList grads, at::TensorList states, at::TensorList masters,
                           at::TensorList state_steps, c10::IntArrayRef group_sizes,
                           const at::Tensor& hyper, at::TensorList lr_tensors,
                           c10::IntArrayRef fresh, const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf, at::TensorList schedule_state,
                           const std::optional<at::Tensor>& schedule,
                           const std::optional<at::Tensor>& clip, int64_t master_mode,
                           int64_t seed) {
  const RuleId rule = rule_by_name(op, rule_name);
  TORCH_CHECK(master_mode >= 0 && master_mode <= 2, op, ": master_mode must be 0 (none), 1 (float32 "
              "masters) or 2 (bfloat16 remainders), got ", master_mode);
  const auto mode = static_cast<Master>(master_mode);
  StepArgs out = collect_common(op, rule, params, grads, group_sizes, hyper, grad_scale.has_value());
  const auto n = static_cast<int64_t>(params.size());
  const bool has_step = visit_rule(rule, [](auto r) { return decltype(r)::kHasStep; });
  const int num_roles = visit_rule(rule, [](auto r) { return decltype(r)::kStates; });
  TORCH_CHECK(static_cast<int64_t>(state_steps.size()) == (has_step ? n : 0), op, ": the ",
              rule_name, " rule takes ", has_step ? "one step counter per param" : "no step counters",
              ", got ", state_steps.size(), " state_steps for ", n, " params");
  size_t next_state = 0, next_master = 0;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TensorSlot& s = out.tensors[static_cast<size_t>(i)];
    const double* row = &out.hyper[static_cast<size_t>(s.group * out.num_cols)];
    const uint32_t roles = visit_rule(rule, [&](auto r) { return role_mask<decltype(r)>(row); });
    for (int k = 0; k < num_roles; ++k) {
      s.state_dtype[k] = s.dtype;
      if (!(roles & (1u << k))) continue;
      TORCH_CHECK(next_state < states.size(), op, ": params[", i, "] needs ",
                  __builtin_popcount(roles), " state tensors (its group's settings) but states "
                  "has only ", states.size(), " tensors");
      const auto si = static_cast<int64_t>(next_state++);
      s.state[k] = companion_ptr(op, "states", si, states[si], p, i, /*same_dtype=*/false);
      s.state_dtype[k] = state_elem(op, si, states[si]);
      TORCH_CHECK(s.state_dtype[k] != Elem::f64 || s.dtype == Elem::f64, op, ": states[", si,
                  "] is float64 but params[", i, "] is ", p.scalar_type(),
                  "; float64 states go with float64 params only");
    }
    if (mode != Master::none && (s.dtype == Elem::f16 || s.dtype == Elem::bf16)) {
      TORCH_CHECK(next_master < masters.size(), op, ": params[", i, "] is ", p.scalar_type(),
                  " and master_mode is ", master_mode, " but masters has only ", masters.size(),
                  " tensors");
      const auto mi = static_cast<int64_t>(next_master++);
      const at::Tensor& m = masters[mi];
      if (mode == Master::full) {
        TORCH_CHECK_TYPE(m.scalar_type() == at::kFloat, op, ": masters[", mi, "] must be float32 "
                         "(the master copy of params[", i, "]), got ", m.scalar_type());
      } else {
        TORCH_CHECK_TYPE(s.dtype == Elem::bf16, op, ": params[", i, "] is ", p.scalar_type(),
                         "; master remainders need bfloat16 params");
        TORCH_CHECK_TYPE(m.scalar_type() == at::kShort, op, ": masters[", mi, "] must be int16 "
                         "(the master remainder of params[", i, "]), got ", m.scalar_type());
      }
      s.master = companion_ptr(op, "masters", mi, m, p, i, /*same_dtype=*/false);
      s.master_kind = mode;
    }
    if (has_step) read_step(op, i, state_steps[i], s, out.device);
  }
  TORCH_CHECK(next_state == states.size(), op, ": states has ", states.size(), " tensors but the "
              "params' groups use ", next_state);
  TORCH_CHECK(next_master == masters.size(), op, ": masters has ", masters.size(), " tensors but ",
              next_master, " params are 16-bit with master_mode ", master_mode);
  finish_step_args(op, out, fresh, lr_tensors, schedule_state, schedule, grad_scale, found_inf,
                   clip, seed);
  check_written_apart(op, out);
  return out;
}

}  // namespace fusedopt
