// The Python module fusedopt._C: loading it registers the ops (static initialisers in the
// other translation units); this file only reports how the extension was built.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <tuple>

#include "update_rules.h"
#include "work_list.h"

namespace py = pybind11;

namespace fusedopt {
void register_eager_entry(py::module_& m);  // eager_entry.cpp
void register_flat_grads(py::module_& m);   // flat_grads.cpp
}

namespace {

py::dict columns(std::initializer_list<std::pair<const char*, int>> cols) {
  py::dict d;
  for (const auto& c : cols) d[c.first] = c.second;
  return d;
}

bool cpu_supports_build_isa() {
#if defined(FUSEDOPT_CPU_AVX2) && (defined(__x86_64__) || defined(__i386__))
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
#if defined(FUSEDOPT_CPU_AVX512)
  return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return avx2;
#endif
#else
  return true;
#endif
}

// The shared work list as plain lists, so tests check the chunking and balancing that the
// CPU and CUDA kernels both rely on: ([(tensor, begin, end), ...], part bounds).
std::tuple<std::vector<std::tuple<int64_t, int64_t, int64_t>>, std::vector<int64_t>> work_list(
    const std::vector<int64_t>& numels, int64_t chunk_elems, int64_t parts) {
  std::vector<std::tuple<int64_t, int64_t, int64_t>> out;
  std::vector<fusedopt::WorkChunk> chunks;
  try {
    chunks = fusedopt::build_work_list(numels, chunk_elems);
    auto bounds = fusedopt::balance_work(chunks, parts);
    for (const auto& c : chunks) out.emplace_back(c.tensor, c.begin, c.end);
    return {out, bounds};
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  using namespace fusedopt;
  m.doc() = "fusedopt compiled ops (registered as torch.ops.fusedopt.*)";
#ifdef FUSEDOPT_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
#if defined(FUSEDOPT_CPU_AVX512)
  m.attr("CPU_ISA") = "avx512";
#elif defined(FUSEDOPT_CPU_AVX2)
  m.attr("CPU_ISA") = "avx2";
#else
  m.attr("CPU_ISA") = "default";
#endif
  register_eager_entry(m);
  register_flat_grads(m);
  m.def("work_list", &work_list, py::arg("numels"), py::arg("chunk_elems"), py::arg("parts"),
        "The fused step's work list: chunks of at most chunk_elems elements per tensor, and "
        "the bounds that split them into `parts` ranges of nearly equal element count.");
  py::dict phase;
  for (const auto& c : {std::pair<const char*, int>{"start", phase_col::start}, {"kind", phase_col::kind},
                        {"a", phase_col::a}, {"b", phase_col::b}, {"n", phase_col::n},
                        {"gamma", phase_col::gamma}, {"power", phase_col::power}, {"flag", phase_col::flag}}) {
    phase[c.first] = c.second;
  }
  m.attr("PHASE_COLUMNS") = phase;
  m.def("schedule_lr", [](const std::vector<double>& rows, double t) {
    if (rows.empty() || rows.size() % phase_col::count != 0) {
      throw py::value_error("schedule rows must be a non-empty multiple of 8 values");
    }
    return schedule_lr(rows.data(), static_cast<int64_t>(rows.size() / phase_col::count), t);
  }, py::arg("rows"), py::arg("t"), "The in-kernel schedule evaluator (flattened phase rows).");
  m.def("cpu_supports_build_isa", &cpu_supports_build_isa,
        "Whether this CPU runs the instruction set the CPU kernels were compiled for.");
  // Each rule's hyper columns (shared ones first), state roles (torch's state-dict keys, in the
  // order the op takes them) and whether it counts steps.
  py::dict rules;
  for (int id = 0; id < kNumRules; ++id) {
    visit_rule(static_cast<RuleId>(id), [&](auto r) {
      using R = decltype(r);
      py::dict cols = columns({{"lr", col::lr}, {"lr_index", col::lr_index},
                               {"sched_begin", col::sched_begin}, {"sched_count", col::sched_count}});
      for (int k = 0; k < static_cast<int>(R::count) - static_cast<int>(col::first_rule); ++k) {
        cols[R::kColumns[k]] = static_cast<int>(col::first_rule) + k;
      }
      py::list roles, uses;
      for (const char* role : R::kRoles) roles.append(role);
      // when a group keeps each role: None (always), or (column, "nonzero" | "positive")
      for (const RoleUse& u : R::kUses) {
        if (u.use == Use::always) {
          uses.append(py::none());
        } else {
          uses.append(py::make_tuple(R::kColumns[u.col - col::first_rule],
                                     u.use == Use::nonzero ? "nonzero" : "positive"));
        }
      }
      py::dict d;
      d["columns"] = cols;
      d["roles"] = roles;
      d["role_uses"] = uses;
      d["has_step"] = R::kHasStep;
      rules[R::kName] = d;
    });
  }
  m.attr("RULES") = rules;
  m.attr("ADAM_COLUMNS") = rules["adam"]["columns"];
  m.attr("SGD_COLUMNS") = rules["sgd"]["columns"];
}
