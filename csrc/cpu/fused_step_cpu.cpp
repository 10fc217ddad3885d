// CPU implementation of the fused ops: one parallel region per step over the flattened
// work list of all tensors of all param groups, SIMD through at::vec with a scalar tail.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

namespace fusedopt {
// at::vec overloads of the helpers the shared update rules call; they must be declared
// before update_rules.h so its templates see them.
template <typename T>
inline at::vec::Vectorized<T> fo_sqrt(const at::vec::Vectorized<T>& x) { return x.sqrt(); }
template <typename T>
inline at::vec::Vectorized<T> fo_neg(const at::vec::Vectorized<T>& x) { return x.neg(); }
template <typename T>
inline at::vec::Vectorized<T> fo_max(const at::vec::Vectorized<T>& a,
                                     const at::vec::Vectorized<T>& b) {
  return at::vec::maximum(a, b);  // NaN-propagating, like torch.maximum
}
}  // namespace fusedopt

#include "../step_args.h"
#include "../update_rules.h"
#include "../work_list.h"

namespace fusedopt {
namespace {

// Elements per work-list chunk: large enough that per-chunk bookkeeping vanishes, small
// enough that a big tensor spreads evenly over the threads.
constexpr int64_t kCpuChunk = 1 << 16;
// Below this many elements a step runs on the calling thread: waking the pool costs more.
constexpr int64_t kMinParallelElems = 1 << 15;

// Unscaling multiplies by the float32 reciprocal of the scale, as GradScaler.unscale_ does,
// so a fused step matches the unscale-then-step path of torch.optim exactly.
struct GradUnscale {
  bool active = false;
  double inv_scale = 1.0;
};

// Loads the S-typed math values of W consecutive T elements and stores them back. For the
// 16-bit types a Vectorized<T> holds two Vectorized<float>s; for float/double T == S.
template <typename T, typename S>
struct Lanes {
  using VecS = at::vec::Vectorized<S>;
  using VecT = at::vec::Vectorized<T>;
  static constexpr int64_t kParts = std::is_same_v<T, S> ? 1 : 2;
  static constexpr int64_t kWidth = VecS::size() * kParts;
  VecS v[kParts];

  static Lanes load(const T* ptr) {
    Lanes l;
    if constexpr (kParts == 1) {
      l.v[0] = VecS::loadu(ptr);
    } else {
      auto both = at::vec::convert_to_float<T>(VecT::loadu(ptr));
      l.v[0] = std::get<0>(both);
      l.v[1] = std::get<1>(both);
    }
    return l;
  }
  void store(T* ptr) const {
    if constexpr (kParts == 1) {
      v[0].store(ptr);
    } else {
      at::vec::convert_from_float<T>(v[0], v[1]).store(ptr);
    }
  }
};

template <typename T, typename S>
void adam_chunk(const TensorSlot& s, int64_t begin, int64_t end, const AdamCoeffs<S>& c,
                const GradUnscale& unscale) {
  T* P = static_cast<T*>(s.param);
  T* G = static_cast<T*>(s.grad);
  T* M = static_cast<T*>(s.state0);
  T* V2 = static_cast<T*>(s.state1);
  T* VM = static_cast<T*>(s.state2);
  using L = Lanes<T, S>;
  using VecS = typename L::VecS;
  const VecS inv_scale(static_cast<S>(unscale.inv_scale));
  int64_t i = begin;
  for (; i + L::kWidth <= end; i += L::kWidth) {
    L p = L::load(P + i), g = L::load(G + i), m = L::load(M + i), v = L::load(V2 + i);
    L vm = c.amsgrad ? L::load(VM + i) : L{};
    for (int64_t k = 0; k < L::kParts; ++k) {
      if (unscale.active) g.v[k] = g.v[k] * inv_scale;
      adam_update<VecS, S>(p.v[k], g.v[k], m.v[k], v.v[k], vm.v[k], c);
    }
    p.store(P + i);
    m.store(M + i);
    v.store(V2 + i);
    if (c.amsgrad) vm.store(VM + i);
    if (unscale.active) g.store(G + i);
  }
  for (; i < end; ++i) {
    S p = static_cast<S>(P[i]), g = static_cast<S>(G[i]), m = static_cast<S>(M[i]);
    S v = static_cast<S>(V2[i]);
    S vm = c.amsgrad ? static_cast<S>(VM[i]) : S(0);
    if (unscale.active) {
      g = g * static_cast<S>(unscale.inv_scale);
      G[i] = static_cast<T>(g);
    }
    adam_update<S, S>(p, g, m, v, vm, c);
    P[i] = static_cast<T>(p);
    M[i] = static_cast<T>(m);
    V2[i] = static_cast<T>(v);
    if (c.amsgrad) VM[i] = static_cast<T>(vm);
  }
}

template <typename T, typename S>
void sgd_chunk(const TensorSlot& s, int64_t begin, int64_t end, const SgdCoeffs<S>& c,
               const GradUnscale& unscale) {
  T* P = static_cast<T*>(s.param);
  T* G = static_cast<T*>(s.grad);
  T* B = static_cast<T*>(s.state0);
  using L = Lanes<T, S>;
  using VecS = typename L::VecS;
  const VecS inv_scale(static_cast<S>(unscale.inv_scale));
  int64_t i = begin;
  for (; i + L::kWidth <= end; i += L::kWidth) {
    L p = L::load(P + i), g = L::load(G + i);
    L b = (c.has_momentum && !s.fresh) ? L::load(B + i) : L{};
    for (int64_t k = 0; k < L::kParts; ++k) {
      if (unscale.active) g.v[k] = g.v[k] * inv_scale;
      sgd_update<VecS, S>(p.v[k], g.v[k], b.v[k], s.fresh, c);
    }
    p.store(P + i);
    if (c.has_momentum) b.store(B + i);
    if (unscale.active) g.store(G + i);
  }
  for (; i < end; ++i) {
    S p = static_cast<S>(P[i]), g = static_cast<S>(G[i]);
    S b = (c.has_momentum && !s.fresh) ? static_cast<S>(B[i]) : S(0);
    if (unscale.active) {
      g = g * static_cast<S>(unscale.inv_scale);
      G[i] = static_cast<T>(g);
    }
    sgd_update<S, S>(p, g, b, s.fresh, c);
    P[i] = static_cast<T>(p);
    if (c.has_momentum) B[i] = static_cast<T>(b);
  }
}

// Many small tensors live in scattered allocations where the hardware prefetcher restarts at
// every one; fetching the head of the next chunk while this one computes hides that latency.
constexpr int kPrefetchLines = 8;

inline void prefetch_chunk(const TensorSlot& s, int64_t begin) {
  const int64_t elem = s.dtype == Elem::f64 ? 8 : (s.dtype == Elem::f32 ? 4 : 2);
  const int64_t bytes = std::min<int64_t>((s.numel - begin) * elem, kPrefetchLines * 64);
  for (const void* base : {s.param, s.grad, s.state0, s.state1, s.state2}) {
    if (base == nullptr) continue;
    const char* p = static_cast<const char*>(base) + begin * elem;
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 1, 3);
  }
}

// Runs `per_chunk(slot, begin, end)` over all chunks of all tensors in one parallel region.
template <typename F>
void for_each_chunk(const StepArgs& args, const F& per_chunk) {
  std::vector<int64_t> numels;
  numels.reserve(args.tensors.size());
  int64_t total = 0;
  for (const auto& s : args.tensors) {
    numels.push_back(s.numel);
    total += s.numel;
  }
  const std::vector<WorkChunk> chunks = build_work_list(numels, kCpuChunk);
  const int64_t parts = total < kMinParallelElems ? 1 : at::get_num_threads();
  const std::vector<int64_t> bounds = balance_work(chunks, parts);
  auto run_parts = [&](int64_t first, int64_t last) {
    for (int64_t part = first; part < last; ++part) {
      for (int64_t c = bounds[part]; c < bounds[part + 1]; ++c) {
        if (c + 1 < bounds[part + 1]) {
          const WorkChunk& n = chunks[static_cast<size_t>(c + 1)];
          prefetch_chunk(args.tensors[static_cast<size_t>(n.tensor)], n.begin);
        }
        const WorkChunk& w = chunks[static_cast<size_t>(c)];
        per_chunk(args.tensors[static_cast<size_t>(w.tensor)], w.begin, w.end);
      }
    }
  };
  if (parts == 1) {
    run_parts(0, 1);
  } else {
    at::parallel_for(0, parts, 1, run_parts);
  }
}

// Reads the GradScaler inputs; returns false when found_inf says to skip the whole step.
bool read_amp(const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf, GradUnscale& unscale) {
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) return false;
  if (grad_scale.has_value()) {
    unscale.active = true;
    unscale.inv_scale = static_cast<double>(static_cast<float>(1.0 / grad_scale->item<double>()));
  }
  return true;
}

// In-kernel schedule, CPU side: the step uses lr(t) (written into the group's lr column),
// and once it has run every scheduled group's lr tensor receives lr(t + 1) and t advances.
template <int LR, int BEGIN, int COUNT>
void apply_schedule(StepArgs& args) {
  if (args.schedule_step == nullptr) return;
  const auto t = static_cast<double>(*args.schedule_step);
  for (int64_t g = 0; g < args.num_groups; ++g) {
    args.hyper[g * args.num_cols + LR] = scheduled_lr(args, g, LR, BEGIN, COUNT, t);
  }
}

template <int LR, int BEGIN, int COUNT>
void advance_schedule(const StepArgs& args) {
  if (args.schedule_step == nullptr) return;
  const auto next = static_cast<double>(*args.schedule_step + 1);
  for (int64_t g = 0; g < args.num_groups; ++g) {
    const ScheduleOut& out = args.schedule_out[static_cast<size_t>(g)];
    if (out.lr == nullptr) continue;
    const double lr = scheduled_lr(args, g, LR, BEGIN, COUNT, next);
    if (out.is_double) {
      *static_cast<double*>(out.lr) = lr;
    } else {
      *static_cast<float*>(out.lr) = static_cast<float>(lr);
    }
  }
  *args.schedule_step += 1;
}

// The Adam coefficients of one group at the step most of its tensors are at (the first seen).
struct AdamCoeffCache {
  int64_t group = 0;
  bool valid = false;
  double step = 0.0;
  AdamCoeffs<float> f;
  AdamCoeffs<double> d;

  template <typename S>
  AdamCoeffs<S> make(const StepArgs& args, double at_step) const {
    using namespace adam_col;
    const int64_t g = group;
    return make_adam_coeffs<S>(args.at(g, lr), args.at(g, beta1), args.at(g, beta2), args.at(g, eps),
                               args.at(g, weight_decay), args.at(g, amsgrad) != 0.0,
                               args.at(g, maximize) != 0.0, args.at(g, decoupled) != 0.0, at_step);
  }
  void prepare(const StepArgs& args, double at_step) {
    if (valid) return;
    valid = true;
    step = at_step;
    f = make<float>(args, at_step);
    d = make<double>(args, at_step);
  }
};

void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
              at::TensorList state_steps, c10::IntArrayRef group_sizes, const at::Tensor& hyper,
              at::TensorList lr_tensors, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf, at::TensorList schedule_state,
              const std::optional<at::Tensor>& schedule) {
  using namespace adam_col;
  StepArgs args = collect_adam_args("fusedopt::adam_", params, grads, exp_avgs, exp_avg_sqs,
                                    max_exp_avg_sqs, state_steps, group_sizes, hyper, lr_tensors,
                                    grad_scale, found_inf, schedule_state, schedule);
  GradUnscale unscale;
  if (!read_amp(grad_scale, found_inf, unscale)) return;
  apply_schedule<lr, sched_begin, sched_count>(args);
  // Step counters first, serially: every chunk of a tensor then reads the same new count.
  for (const auto& s : args.tensors) {
    if (s.step_is_double) {
      *static_cast<double*>(s.step) += 1.0;
    } else {
      *static_cast<float*>(s.step) += 1.0f;
    }
  }
  // Bias corrections cost two pow() calls; tensors of a group almost always share a step, so
  // the coefficients are computed once per (group, step) per group table row.
  std::vector<AdamCoeffCache> caches(static_cast<size_t>(args.num_groups));
  for (int64_t g = 0; g < args.num_groups; ++g) caches[static_cast<size_t>(g)].group = g;
  for (const auto& s : args.tensors) {
    const double step = s.step_is_double ? *static_cast<const double*>(s.step)
                                         : static_cast<double>(*static_cast<const float*>(s.step));
    caches[static_cast<size_t>(s.group)].prepare(args, step);
  }
  for_each_chunk(args, [&](const TensorSlot& s, int64_t begin, int64_t end) {
    const double step = s.step_is_double ? *static_cast<const double*>(s.step)
                                         : static_cast<double>(*static_cast<const float*>(s.step));
    const AdamCoeffCache& cache = caches[static_cast<size_t>(s.group)];
    const bool hit = cache.valid && cache.step == step;
    switch (s.dtype) {
      case Elem::f32:
        adam_chunk<float, float>(s, begin, end, hit ? cache.f : cache.make<float>(args, step), unscale);
        break;
      case Elem::f64:
        adam_chunk<double, double>(s, begin, end, hit ? cache.d : cache.make<double>(args, step), unscale);
        break;
      case Elem::f16:
        adam_chunk<c10::Half, float>(s, begin, end, hit ? cache.f : cache.make<float>(args, step), unscale);
        break;
      case Elem::bf16:
        adam_chunk<c10::BFloat16, float>(s, begin, end, hit ? cache.f : cache.make<float>(args, step), unscale);
        break;
    }
  });
  advance_schedule<lr, sched_begin, sched_count>(args);
}

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             c10::IntArrayRef group_sizes, const at::Tensor& hyper, at::TensorList lr_tensors,
             c10::IntArrayRef fresh_buffers, const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf, at::TensorList schedule_state,
             const std::optional<at::Tensor>& schedule) {
  using namespace sgd_col;
  StepArgs args = collect_sgd_args("fusedopt::sgd_", params, grads, momentum_buffers, group_sizes,
                                   hyper, lr_tensors, fresh_buffers, grad_scale, found_inf,
                                   schedule_state, schedule);
  GradUnscale unscale;
  if (!read_amp(grad_scale, found_inf, unscale)) return;
  apply_schedule<lr, sched_begin, sched_count>(args);
  for_each_chunk(args, [&](const TensorSlot& s, int64_t begin, int64_t end) {
    const int64_t g = s.group;
    auto coeffs = [&](auto zero) {
      return make_sgd_coeffs<decltype(zero)>(args.at(g, lr), args.at(g, momentum),
                                             args.at(g, dampening), args.at(g, weight_decay),
                                             args.at(g, nesterov) != 0.0,
                                             args.at(g, maximize) != 0.0);
    };
    switch (s.dtype) {
      case Elem::f32: sgd_chunk<float, float>(s, begin, end, coeffs(0.0f), unscale); break;
      case Elem::f64: sgd_chunk<double, double>(s, begin, end, coeffs(0.0), unscale); break;
      case Elem::f16: sgd_chunk<c10::Half, float>(s, begin, end, coeffs(0.0f), unscale); break;
      case Elem::bf16: sgd_chunk<c10::BFloat16, float>(s, begin, end, coeffs(0.0f), unscale); break;
    }
  });
  advance_schedule<lr, sched_begin, sched_count>(args);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("adam_", &adam_cpu);
  m.impl("sgd_", &sgd_cpu);
}

// A sparse gradient routes the call here; the shared validation rejects it with a message
// that names the tensor, instead of the dispatcher's "no kernel for SparseCPU".
TORCH_LIBRARY_IMPL(fusedopt, SparseCPU, m) {
  m.impl("adam_", &adam_cpu);
  m.impl("sgd_", &sgd_cpu);
}

}  // namespace fusedopt
