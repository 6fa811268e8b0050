"""Ahead-of-time compilation of every Triton kernel here for a given GPU target.

No GPU is needed: `triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget(...))`
lowers to PTX and, through the ptxas that ships with Triton, to a cubin. The representative
specialisations below are the ones SD models launch (fp16 / bf16 / fp32, SD head dims,
the cross- and flash-attention paths, GroupNorm with and without add / SiLU).

Run it in a process where TRITON_INTERPRET is unset: under the interpreter `@triton.jit`
returns interpreted functions, which cannot be compiled.
"""
import os

import torch

DTYPES = ("fp32", "fp16", "bf16")
ELEMENT_SIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _signature(arg_names, pointers, dtype, floats, constexprs):
    """Triton signature dict: pointers -> '*dtype', floats -> 'fp32', constexprs, the rest 'i32'."""
    sig = {}
    for name in arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name] if pointers[name].startswith("*") else "*" + dtype
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def kernel_specs():
    """[(label, jit_fn, pointers, float_args, constexprs, dtype)] for every kernel and variant."""
    from .attention import (CROSS_MAX_BYTES, _attention_kernel, cross_tile_bytes, launch_config,
                            precision)
    from .group_norm import _group_norm_kernel
    from .lora_merge import _lora_merge_kernel

    specs = []
    for dt in DTYPES:
        for has_add, silu in ((False, False), (True, True)):
            specs.append((f"group_norm[{dt},add={has_add},silu={silu}]", _group_norm_kernel,
                          dict.fromkeys(["X", "Y", "W", "BIAS", "ADD"], ""), {"eps"},
                          dict(HAS_ADD=has_add, SILU=silu, BLOCK_C=16, BLOCK_S=256), dt))
        for d in (64, 80, 160):  # 40 pads to 64: the same specialisation as 64
            for kernel in ("cross", "flash"):  # cross: the 77 text tokens in one 128-key tile
                if kernel == "cross" and cross_tile_bytes(77, d, ELEMENT_SIZE[dt]) > CROSS_MAX_BYTES:
                    continue  # the launcher sends this case to the flash kernel
                constexprs = dict(launch_config(kernel, 77, d), PRECISION=precision(TORCH_DTYPE[dt]))
                specs.append((f"attention_{kernel}[{dt},D={d}]", _attention_kernel,
                              dict.fromkeys("QKVO", ""), {"qk_scale"}, constexprs, dt))
        specs.append((f"lora_merge[{dt}]", _lora_merge_kernel,
                      {"W": "", "U": "", "DN": "", "SCALE": "*fp32"}, set(),
                      dict(BLOCK_O=64, BLOCK_I=64, BLOCK_R=16), dt))
    return specs


def compile_all(arch=80, labels=None):
    """Compile every kernel spec for sm_<arch>; returns {label: {"ptx": str, "cubin": bytes}}.
    `labels` (an iterable of labels from `kernel_specs`) restricts what is compiled."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernels.aot.compile_all needs TRITON_INTERPRET unset")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    specs = kernel_specs()
    if labels is not None:
        labels = set(labels)
        unknown = labels - {spec[0] for spec in specs}
        if unknown:
            raise ValueError(f"unknown kernel labels: {sorted(unknown)}")
        specs = [spec for spec in specs if spec[0] in labels]
    out = {}
    for label, fn, pointers, floats, constexprs, dt in specs:
        sig = _signature(fn.arg_names, pointers, dt, floats, constexprs)
        compiled = triton.compile(ASTSource(fn, sig, constexprs), target=target)
        out[label] = {"ptx": compiled.asm["ptx"], "cubin": compiled.asm["cubin"]}
    return out


__all__ = ["compile_all", "kernel_specs"]
