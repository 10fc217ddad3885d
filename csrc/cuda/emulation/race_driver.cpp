// A standalone driver (no torch) that runs the emulated CUDA kernels under ThreadSanitizer:
// scripts/tsan_emulated_cuda.sh builds it with -fsanitize=thread and runs it. It packs tables with
// the shared host_tables (as the real glue does), launches Adam and SGD many times with every
// block running concurrently, and checks the step counters and the in-kernel schedule, so a race
// between blocks (the "last block" counters, the step and schedule counters) is reported by TSan
// and a lost update by the checks.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../step_table.h"
#include "../../update_rules.h"
#include "../device_tables.h"
#include "../host_tables.h"
#include "cuda_shim.h"

namespace {

using namespace fusedopt;
using namespace fusedopt::cuda;

int failures = 0;

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

struct Tensors {
  std::vector<std::vector<float>> p, g, m, v;
  std::vector<float> steps;
};

StepTable make_table(Tensors& t, const std::vector<int64_t>& sizes, int cols) {
  StepTable s;
  s.num_groups = 1;
  s.num_cols = cols;
  s.hyper.assign(static_cast<size_t>(cols), 0.0);
  s.lr_tensor.assign(1, LrTensor{});
  t.steps.assign(sizes.size(), 0.0f);
  for (size_t i = 0; i < sizes.size(); ++i) {
    const auto n = static_cast<size_t>(sizes[i]);
    t.p.emplace_back(n, 1.0f);
    t.g.emplace_back(n, 0.5f);
    t.m.emplace_back(n, 0.0f);
    t.v.emplace_back(n, 0.0f);
  }
  for (size_t i = 0; i < sizes.size(); ++i) {
    TensorSlot slot;
    slot.param = t.p[i].data();
    slot.grad = t.g[i].data();
    slot.state0 = t.m[i].data();
    slot.state1 = t.v[i].data();
    slot.step = &t.steps[i];
    slot.numel = sizes[i];
    s.tensors.push_back(slot);
  }
  return s;
}

void run(const StepTable& s, Rule rule, int grid, int block, int launches) {
  HostTables tables = pack_tables(s, rule, /*chunk_elems=*/16);
  if (tables.tensors.empty()) tables.tensors.resize(sizeof(DeviceChunk));
  std::vector<int32_t> counters(static_cast<size_t>(tables.num_tensors + 1), 0);
  LaunchArgs la = make_launch_args(tables, s, tables.groups.data(), tables.tensors.data(), counters.data());
  la.grid = launch_grid(tables, grid);
  la.block = block;
  for (int i = 0; i < launches; ++i) {
    check((rule == Rule::adam ? launch_adam(la, nullptr) : launch_sgd(la, nullptr)) == 0, "launch");
  }
  for (const int32_t c : counters) check(c == 0, "completion counters return to zero");
}

}  // namespace

int main() {
  fusedopt_emulation::schedule() = {/*concurrent=*/true, 0};
  const std::vector<int64_t> sizes = {0, 1, 15, 16, 17, 100, 64, 3};
  {  // Adam with an in-kernel schedule: step counters and the schedule counter
    Tensors t;
    StepTable s = make_table(t, sizes, adam_col::count);
    s.hyper[adam_col::lr] = 1e-3;
    s.hyper[adam_col::beta1] = 0.9;
    s.hyper[adam_col::beta2] = 0.999;
    s.hyper[adam_col::eps] = 1e-8;
    s.hyper[adam_col::sched_begin] = 0;
    s.hyper[adam_col::sched_count] = 1;
    s.phases = {0, kLinear, 1.0, 0.0, 100, 0, 0, 0};  // lr from 1 down to 0 over 100 steps
    int64_t sched_step = 0;
    float next_lr = 0;
    s.schedule_step = &sched_step;
    s.schedule_out.assign(1, ScheduleOut{&next_lr, false});
    run(s, Rule::adam, /*grid=*/6, /*block=*/8, /*launches=*/20);
    for (const float st : t.steps) check(st == 20.0f, "every Adam step counter advanced 20 times");
    check(sched_step == 20, "the schedule advanced once per launch");
    check(std::fabs(next_lr - 0.8f) < 1e-6f, "the next lr is lr(20) = 0.8");
  }
  {  // SGD with momentum, no schedule
    Tensors t;
    StepTable s = make_table(t, sizes, sgd_col::count);
    s.hyper[sgd_col::lr] = 0.1;
    s.hyper[sgd_col::momentum] = 0.9;
    run(s, Rule::sgd, /*grid=*/5, /*block=*/4, /*launches=*/10);
    // every element sees the same gradient: p = 1 - 0.1 * sum of buffers over 10 steps
    double buf = 0, p = 1;
    for (int i = 0; i < 10; ++i) {
      buf = buf * 0.9 + 0.5;
      p -= 0.1 * buf;
    }
    for (const auto& v : t.p) {
      for (const float x : v) check(std::fabs(x - p) < 1e-5, "SGD momentum result");
    }
  }
  std::printf("%s\n", failures == 0 ? "emulated kernels under ThreadSanitizer: all checks passed"
                                     : "emulated kernels under ThreadSanitizer: checks FAILED");
  return failures == 0 ? 0 : 1;
}
