// The grads of a flat storage (fusedopt.flatten_): each param's grad is a view of one buffer
// per bucket, so the fused step sees one contiguous tensor (step_args.cpp coalesces it) and
// zero_grad is one memset.
//
// torch's zero_grad(set_to_none=True) leaves every grad None, and the next backward would give
// each param a fresh tensor of its own. A hook on each param (a C++ tensor hook: it runs before
// the param's AccumulateGrad, in the engine's thread, with no Python) attaches the param's zeroed
// slot as its grad first, so AccumulateGrad adds into the slot in place. Params that get no
// gradient keep grad None, exactly as in torch. The hook never attaches a slot to a param that
// no longer lives in the bucket (its data replaced), and zeroes a slot first when its grad was
// dropped without the bucket's memset (`p.grad = None`, nn.Module.zero_grad). It attaches only
// when the backward accumulates into the param: torch.autograd.grad runs the hook too, but
// returns the gradient and leaves `.grad` as it is.
//
// A slot is the param's grad tensor itself, so `p.grad.data = other` re-points the slot: the
// bucket notices (slot_intact), treats that grad as the user's (zero_grad zeroes it or sets it
// to None as torch does) and makes the param a new view of its place in the buffer.
#include <ATen/core/Tensor.h>
#include <c10/util/intrusive_ptr.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <memory>
#include <string>
#include <vector>

namespace py = pybind11;

namespace fusedopt {
namespace {

using WeakTensor = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Bucket {
  explicit Bucket(c10::weak_intrusive_ptr<c10::StorageImpl> s) : storage(std::move(s)) {}
  at::Tensor grads;                 // the flat grad buffer
  std::vector<at::Tensor> slots;    // each param's grad view of it
  std::vector<WeakTensor> params;   // weak: the hooks the params own point here
  std::vector<int64_t> offsets;     // each param's storage offset in the flat param buffer
  int64_t base = 0;                 // the first param's (the grad buffer starts there)
  std::vector<std::vector<int64_t>> shapes;  // each param's shape when it was flattened
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;  // the flat param buffer's
  std::vector<uint8_t> dirty;       // the slot was attached since the last memset
  std::vector<uint8_t> released;    // the param left the bucket (flattened again)

  // The param, when it is alive and still a view of the flat param buffer at its place.
  at::Tensor param(size_t i) const {
    if (released[i]) return {};
    c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl = params[i].lock();
    if (!impl) return {};
    at::Tensor p(std::move(impl));
    const c10::intrusive_ptr<c10::StorageImpl> s = storage.lock();
    if (!s || !p.has_storage() || p.storage().unsafeGetStorageImpl() != s.get() ||
        p.storage_offset() != offsets[i] || p.sizes() != c10::IntArrayRef(shapes[i]) ||
        p.scalar_type() != grads.scalar_type() || p.device() != grads.device()) {
      return {};
    }
    return p;
  }

  bool holds_grad(const at::Tensor& p, size_t i) const {
    const at::Tensor& g = p.grad();
    return g.defined() && g.unsafeGetTensorImpl() == slots[i].unsafeGetTensorImpl();
  }

  // A view of param i's place in the grad buffer.
  at::Tensor view_of(size_t i) const {
    return grads.narrow(0, offsets[i] - base, c10::multiply_integers(shapes[i])).view(shapes[i]);
  }

  // Whether slot i is still that view (`.data = ` on the grad tensor re-points it).
  bool slot_intact(size_t i) const {
    const at::Tensor& g = slots[i];
    return g.has_storage() &&
           g.storage().unsafeGetStorageImpl() == grads.storage().unsafeGetStorageImpl() &&
           g.storage_offset() == grads.storage_offset() + offsets[i] - base &&
           g.sizes() == c10::IntArrayRef(shapes[i]) && g.is_contiguous() &&
           g.scalar_type() == grads.scalar_type() && g.device() == grads.device();
  }

  // Slot i as a view of its place again (the old tensor is the user's now). Its elements hold
  // whatever the buffer had: zeroed before it is attached.
  void renew_slot(size_t i) {
    slots[i] = view_of(i);
    dirty[i] = 1;
  }

  // Whether the running backward accumulates into p's .grad: every backward() does, and
  // backward(inputs=...) for the inputs; torch.autograd.grad only captures the gradient.
  static bool accumulates(const at::Tensor& p) {
    const auto* info = torch::autograd::get_current_graph_task_exec_info();
    if (info == nullptr || info->empty()) return true;  // backward() over the whole graph
    const c10::intrusive_ptr<torch::autograd::Node> acc = torch::autograd::impl::try_get_grad_accumulator(p);
    if (!acc) return false;
    const auto it = info->find(acc.get());
    return it != info->end() && it->second.needed_;
  }

  // Before param i's gradient is accumulated: give it its slot when it has no grad.
  void attach(size_t i) {
    const at::Tensor p = param(i);
    if (!p.defined() || p.grad().defined() || !accumulates(p)) return;
    if (!slot_intact(i)) renew_slot(i);
    if (dirty[i]) slots[i].zero_();
    dirty[i] = 1;
    p.mutable_grad() = slots[i];
  }
};

class FlatGrads {
 public:
  FlatGrads(const std::vector<at::Tensor>& params, const at::Tensor& grads,
            const std::vector<int64_t>& offsets)
      : b_(std::make_shared<Bucket>(storage_of_first(params))) {
    TORCH_CHECK(params.size() == offsets.size(), "fusedopt.FlatGrads: one offset per param");
    Bucket& b = *b_;
    b.grads = grads;
    b.offsets = offsets;
    b.dirty.assign(params.size(), 0);
    b.released.assign(params.size(), 0);
    b.base = params[0].storage_offset();
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& p = params[i];
      TORCH_CHECK(p.storage().unsafeGetStorageImpl() == params[0].storage().unsafeGetStorageImpl() &&
                      p.storage_offset() == offsets[i] && p.is_contiguous(),
                  "fusedopt.FlatGrads: params[", i, "] is not a view of the flat param buffer");
      b.params.emplace_back(p.getIntrusivePtr());
      b.shapes.emplace_back(p.sizes().begin(), p.sizes().end());
      b.slots.push_back(b.view_of(i));
      // a grad it already has moves into its slot (a sparse or mismatched one stays as it is)
      const at::Tensor& g = p.grad();
      if (g.defined() && g.layout() == at::kStrided && g.sizes() == p.sizes() &&
          g.scalar_type() == p.scalar_type() && g.device() == p.device()) {
        b.slots[i].copy_(g);
        p.mutable_grad() = b.slots[i];
        b.dirty[i] = 1;
      }
    }
    for (size_t i = 0; i < params.size(); ++i) {
      if (!params[i].requires_grad()) {
        hooks_.push_back(-1);
        continue;
      }
      std::weak_ptr<Bucket> weak = b_;
      hooks_.push_back(static_cast<int64_t>(params[i].register_hook([weak, i](const at::Tensor&) {
        if (const std::shared_ptr<Bucket> bucket = weak.lock()) bucket->attach(i);
      })));
    }
  }

  static c10::weak_intrusive_ptr<c10::StorageImpl> storage_of_first(const std::vector<at::Tensor>& params) {
    TORCH_CHECK(!params.empty() && params[0].has_storage(), "fusedopt.FlatGrads: no params");
    return params[0].storage().getWeakStorageImpl();
  }

  // The slot of param i (its grad while it is flat).
  at::Tensor slot(int64_t i) const { return b_->slots.at(static_cast<size_t>(i)); }

  // optimizer.zero_grad for the bucket's flat grads: one memset; with set_to_none, each param
  // whose grad is its slot gets None (the hooks bring the zeroed slot back at the next
  // backward). Returns the params whose grads are not their slots (or were their slots until
  // given other data), untouched: the caller zeroes those as torch does.
  std::vector<at::Tensor> zero_grad(bool set_to_none) {
    Bucket& b = *b_;
    b.grads.zero_();
    std::vector<at::Tensor> others;
    for (size_t i = 0; i < b.params.size(); ++i) {
      b.dirty[i] = 0;
      if (b.released[i]) continue;
      c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl = b.params[i].lock();
      if (!impl) continue;
      at::Tensor p(std::move(impl));
      if (b.holds_grad(p, i) && !b.slot_intact(i)) {  // `p.grad.data = ...`: the user's tensor now
        b.renew_slot(i);
        b.dirty[i] = 0;  // zeroed by the memset above
      }
      if (!b.holds_grad(p, i)) {
        if (p.grad().defined()) others.push_back(std::move(p));
      } else if (set_to_none) {
        p.mutable_grad().reset();
      } else {
        b.dirty[i] = 1;  // attached, and zero now
      }
    }
    return others;
  }

  // Lets go of param i (flattened again into another bucket): its hook goes, and neither
  // zero_grad nor a hook touches it any more.
  void release(const at::Tensor& p, int64_t i) {
    const auto k = static_cast<size_t>(i);
    TORCH_CHECK(k < hooks_.size() && b_->params[k].lock().get() == p.unsafeGetTensorImpl(),
                "fusedopt.FlatGrads.release: params[", i, "] is not that tensor");
    if (hooks_[k] >= 0) p.remove_hook(static_cast<unsigned>(hooks_[k]));
    hooks_[k] = -1;
    b_->released[k] = 1;
  }

 private:
  std::shared_ptr<Bucket> b_;
  std::vector<int64_t> hooks_;  // each param's hook index (-1: none)
};

}  // namespace

void register_flat_grads(py::module_& m) {
  py::class_<FlatGrads>(m, "FlatGrads",
                        "The grads of one flat bucket (fusedopt.flatten_): a view per param of one "
                        "buffer, re-attached by a hook when a backward finds the grad None.")
      .def(py::init<const std::vector<at::Tensor>&, const at::Tensor&, const std::vector<int64_t>&>(),
           py::arg("params"), py::arg("grads"), py::arg("offsets"))
      .def("slot", &FlatGrads::slot, py::arg("i"))
      .def("zero_grad", &FlatGrads::zero_grad, py::arg("set_to_none") = true,
           "One memset of the bucket's grads; with set_to_none, the slots attached as grads are "
           "detached. Returns the params whose grads are not their slots, untouched.")
      .def("release", &FlatGrads::release, py::arg("param"), py::arg("i"));
}

}  // namespace fusedopt
