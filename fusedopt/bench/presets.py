"""Parameter-list presets: the shapes a real model hands its optimizer, and tensors for them.

Every preset is a function of the device (and of ``quick``) returning a :class:`Preset`: a
list of shapes plus a human-readable note on how it was scaled. The tensors themselves are
made by :func:`make_params`, from a dedicated, seeded ``torch.Generator``.

Presets
-------
``gpt2-small``  GPT-2 small (124M): 148 tensors, exactly the shapes of HF's GPT2LMHeadModel
                minus the tied lm_head: wte 50257x768, wpe 1024x768, 12 blocks of
                ln_1 w/b, attn.c_attn 768x2304 (+2304 bias), attn.c_proj 768x768 (+768),
                ln_2 w/b, mlp.c_fc 768x3072 (+3072), mlp.c_proj 3072x768 (+768), and ln_f w/b.
``many-small``  10,000 tensors of 1,024 elements: launch/dispatch overhead dominates.
``many-4k``     1,000 tensors of 4,096 elements: the FSDP2 case of ``--distributed fsdp2``, where
                torch's per-op DTensor dispatch dominates its step (not in the default run).
``huge``        one tensor, sized to the device (64M elements on CPU, 256M on a GPU).
``llama``       Llama-7B-style list (embed_tokens, per layer q/k/v/o, gate/up/down, two
                RMSNorm weights, final norm, untied lm_head), scaled to the device: on CPU
                hidden 1024 / intermediate 2752 / 8 layers (~168M params); on a GPU the real
                hidden 4096 / intermediate 11008 with as many of the 32 layers as fit in
                roughly half the free memory (about 6 on an 80 GB H100).
``mixed``       "Large-model precision": the GPT-2 small list (same shapes as ``gpt2-small``) in
                bfloat16, stepped by fusedopt with each precision option as its own row (none,
                master, master+rem, fp32-state, master+fp32-state, sr: see
                fusedopt.bench.optimizers) against torch's foreach and fused steps on the same
                bf16 params (torch keeps bf16 moments). Its defaults (:data:`PRESET_DEFAULTS`:
                bf16, Adam and SGD with momentum, those rows) apply where --dtypes, --optimizers,
                --impls or --precision are not given. Not in the default run.

``quick=True`` shrinks every preset to a few hundred thousand elements at most (smoke tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["Preset", "PRESETS", "DEFAULT_PRESETS", "PRESET_DEFAULTS", "get_preset", "make_params", "gpt2_shapes",
           "llama_shapes"]


@dataclass
class Preset:
    name: str
    shapes: list[tuple[int, ...]]
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        total = 0
        for s in self.shapes:
            n = 1
            for d in s:
                n *= d
            total += n
        return total

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)


def gpt2_shapes(n_layer: int = 12, n_embd: int = 768, vocab: int = 50257, n_ctx: int = 1024) -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 (HF GPT2LMHeadModel order, lm_head tied to wte so not listed)."""
    d = n_embd
    shapes: list[tuple[int, ...]] = [(vocab, d), (n_ctx, d)]
    for _ in range(n_layer):
        shapes += [
            (d,), (d,),                 # ln_1 weight, bias
            (d, 3 * d), (3 * d,),       # attn.c_attn (Conv1D: in x out), bias
            (d, d), (d,),               # attn.c_proj, bias
            (d,), (d,),                 # ln_2 weight, bias
            (d, 4 * d), (4 * d,),       # mlp.c_fc, bias
            (4 * d, d), (d,),           # mlp.c_proj, bias
        ]
    shapes += [(d,), (d,)]              # ln_f weight, bias
    return shapes


def llama_shapes(n_layer: int = 32, hidden: int = 4096, intermediate: int = 11008, vocab: int = 32000) -> list[tuple[int, ...]]:
    """Parameter shapes of a Llama(-7B)-style decoder (HF LlamaForCausalLM order, untied head)."""
    h, i = hidden, intermediate
    shapes: list[tuple[int, ...]] = [(vocab, h)]          # embed_tokens
    for _ in range(n_layer):
        shapes += [
            (h, h), (h, h), (h, h), (h, h),               # q_proj, k_proj, v_proj, o_proj
            (i, h), (i, h), (h, i),                       # gate_proj, up_proj, down_proj
            (h,), (h,),                                   # input_layernorm, post_attention_layernorm
        ]
    shapes += [(h,), (vocab, h)]                          # norm, lm_head
    return shapes


def _free_device_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    try:
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    except Exception:  # pragma: no cover - depends on the driver
        return None


# ---------------------------------------------------------------------------------------------
def _gpt2(device: torch.device, quick: bool) -> Preset:
    if quick:
        return Preset("gpt2-small", gpt2_shapes(n_layer=2, n_embd=64, vocab=1000, n_ctx=128),
                      "quick: GPT-2 shapes with 2 layers, n_embd 64, vocab 1000")
    return Preset("gpt2-small", gpt2_shapes(), "GPT-2 small, exact: 148 tensors, 124.4M params")


def _many_small(device: torch.device, quick: bool) -> Preset:
    n = 200 if quick else 10_000
    return Preset("many-small", [(1024,)] * n, f"{'quick: ' if quick else ''}{n:,} tensors x 1,024 elements")


def _many_4k(device: torch.device, quick: bool) -> Preset:
    n, k = (100, 512) if quick else (1_000, 4_096)
    return Preset("many-4k", [(k,)] * n, f"{'quick: ' if quick else ''}{n:,} tensors x {k:,} elements")


def _huge(device: torch.device, quick: bool) -> Preset:
    if quick:
        n = 1 << 18
    elif device.type == "cpu":
        n = 64 << 20
    else:
        n = 256 << 20
        free = _free_device_bytes(device)
        # p, g, 2-3 states and foreach temporaries: keep ~8 fp64 copies within half the free memory
        if free is not None:
            while n > (1 << 20) and n * 8 * 8 > free // 2:
                n //= 2
    return Preset("huge", [(n,)], f"{'quick: ' if quick else ''}one tensor of {n / 2**20:g}M elements")


_LLAMA_FULL = dict(hidden=4096, intermediate=11008, vocab=32000, n_layer=32)


def _llama(device: torch.device, quick: bool) -> Preset:
    if quick:
        cfg = dict(hidden=64, intermediate=172, vocab=1000, n_layer=2)
    elif device.type == "cpu":
        cfg = dict(hidden=1024, intermediate=2752, vocab=32000, n_layer=8)
    else:
        cfg = dict(_LLAMA_FULL)
        free = _free_device_bytes(device)
        per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
        fixed = 2 * 32000 * 4096 + 4096
        if free is not None:
            # budget: half the free memory at ~6 fp32 copies per param (p, g, m, v, 2 temporaries)
            budget = (free // 2) // (6 * 4)
            cfg["n_layer"] = max(1, min(32, (budget - fixed) // per_layer))
        else:
            cfg["n_layer"] = 4
    shapes = llama_shapes(**cfg)
    p = Preset("llama", shapes, "")
    full = Preset("llama-7b", llama_shapes(**_LLAMA_FULL)).numel
    p.note = (f"{'quick: ' if quick else ''}Llama-7B-style, scaled: hidden {cfg['hidden']}, intermediate {cfg['intermediate']}, "
              f"{cfg['n_layer']}/32 layers, vocab {cfg['vocab']}: {p.numel / 1e6:.1f}M params "
              f"({p.numel / full:.2%} of Llama-7B's {full / 1e9:.2f}B)")
    p.extra = cfg
    return p


def _mixed(device: torch.device, quick: bool) -> Preset:
    g = _gpt2(device, quick)
    return Preset("mixed", g.shapes, f"{g.note}; fusedopt precision options (mixed; bf16 params unless --dtypes says otherwise)")


PRESETS: dict[str, Callable[[torch.device, bool], Preset]] = {
    "gpt2-small": _gpt2,
    "many-small": _many_small,
    "many-4k": _many_4k,
    "huge": _huge,
    "llama": _llama,
    "mixed": _mixed,
}
DEFAULT_PRESETS = ("gpt2-small", "many-small", "huge", "llama")

# A preset's own defaults, used where the corresponding CLI flag (BenchConfig field) is not given.
PRESET_DEFAULTS: dict[str, dict[str, tuple[str, ...]]] = {
    "mixed": dict(
        dtypes=("bf16",),
        optimizers=("adam", "sgd"),
        impls=("fusedopt", "torch-foreach", "torch-fused"),
        precisions=("none", "master", "master+rem", "fp32-state", "master+fp32-state", "sr"),
    ),
}


def get_preset(name: str, device: torch.device | str = "cpu", quick: bool = False) -> Preset:
    """The :class:`Preset` called ``name`` for ``device`` (``quick`` for tiny smoke-test sizes)."""
    try:
        fn = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
    return fn(torch.device(device), quick)


def make_params(
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> list[torch.Tensor]:
    """Leaf tensors (``requires_grad=True``) for ``shapes`` with ``.grad`` already set.

    Values come from a fresh ``torch.Generator`` on ``device`` seeded with ``seed``:
    params ~ N(0, 0.02^2) (a typical init), grads ~ N(0, 1). Each tensor is its own
    allocation, as in a real model (no flat buffer that a kernel could exploit).
    """
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.empty(shape, dtype=dtype, device=device)
        p.normal_(0.0, 0.02, generator=gen)
        g = torch.empty(shape, dtype=dtype, device=device)
        g.normal_(0.0, 1.0, generator=gen)
        p.requires_grad_(True)
        p.grad = g
        params.append(p)
    return params
