"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed).

The compile runs in a subprocess with TRITON_INTERPRET unset: under the interpreter
`@triton.jit` yields interpreted functions, which cannot be compiled. One representative
specialisation per kernel and path keeps this under a minute; `kernels.aot.compile_all()`
with no labels compiles the full set (every dtype, head dim and flag).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

ROOT = Path(__file__).resolve().parents[1]
LABELS = [
    "group_norm[fp16,add=True,silu=True]",
    "group_norm[fp32,add=False,silu=False]",
    "attention_cross[fp16,D=80]",
    "attention_flash[bf16,D=160]",
    "attention_flash[fp32,D=64]",
    "lora_merge[bf16]",
]
SCRIPT = """
import json, sys
from sdfast.kernels.aot import compile_all
labels = json.loads(sys.argv[2])
out = compile_all(int(sys.argv[1]), labels)
print(json.dumps({k: {"ptx_target": ".target sm_%s" % sys.argv[1] in v["ptx"],
                      "entry": ".entry" in v["ptx"],
                      "cubin_elf": v["cubin"][:4] == b"\\x7fELF"} for k, v in out.items()}))
"""


def _launched_kernels():
    """`{name: jit function}` of every `@triton.jit` function in kernels/*.py that the host
    launches (`name[grid](...)`), found in the files themselves; the device helpers that
    kernels call (`_load_rows`, ...) are not launched and need no spec."""
    import ast
    import importlib

    from triton.runtime.jit import KernelInterface

    kernels = {}
    for path in sorted((ROOT / "kernels").glob("*.py")):
        if path.stem == "__init__":
            continue
        tree = ast.parse(path.read_text())
        jitted = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                  and any(ast.unparse(d) in ("triton.jit", "jit") or ast.unparse(d).startswith(
                      ("triton.jit(", "jit(")) for d in node.decorator_list)}
        launched = {node.func.value.id for node in ast.walk(tree) if isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Subscript) and isinstance(node.func.value, ast.Name)}
        module = importlib.import_module(f"sdfast.kernels.{path.stem}")
        objects = {name: obj for name, obj in vars(module).items() if isinstance(obj, KernelInterface)}
        assert set(objects) == jitted, f"{path.name}: {sorted(objects)} != @triton.jit {sorted(jitted)}"
        kernels.update({name: objects[name] for name in jitted & launched})
    return kernels


def test_every_kernel_has_a_spec():
    """Every Triton kernel in kernels/*.py has an AOT spec, and LABELS (what
    `test_compile_for_arch` compiles) covers each one."""
    from sdfast.kernels.aot import kernel_specs

    kernels = _launched_kernels()
    assert {"_group_norm_kernel", "_attention_kernel", "_lora_merge_kernel"} <= set(kernels)
    specs = {spec[0]: spec[1] for spec in kernel_specs()}
    assert set(LABELS) <= set(specs)
    for name, fn in kernels.items():
        assert any(spec is fn for spec in specs.values()), f"{name} has no spec in kernel_specs()"
        assert any(specs[label] is fn for label in LABELS), f"no label in LABELS compiles {name}"
    for path in ("attention_cross", "attention_flash"):    # the two launch paths of one kernel
        assert any(label.startswith(path + "[") for label in LABELS)


@pytest.mark.parametrize("arch", [80, 90])
def test_compile_for_arch(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(arch), json.dumps(LABELS)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(result) == sorted(LABELS)
    for label, checks in result.items():
        assert all(checks.values()), f"{label} for sm_{arch}: {checks}"


def test_compile_all_refuses_interpreter(monkeypatch):
    from sdfast.kernels.aot import compile_all
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_all(80)
