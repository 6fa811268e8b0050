"""Triton kernels against their pure-torch references under the Triton interpreter.

The cases live in `triton_interpreted_cases.py` and run in a child pytest whose environment has
TRITON_INTERPRET=1 from the start: Triton reads that setting once per process, so inside this
session, where other tests (diffusers, torch) import Triton first, interpreted and compiled
kernels would mix ("Cannot call @triton.jit'd outside of the scope of a kernel").
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("triton_interpreted_cases.py")


def test_triton_kernels_match_references_under_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-rs", str(CASES)], capture_output=True, text=True, env=env,
                          cwd=CASES.parent, timeout=1800)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
    print(proc.stdout.splitlines()[-1])
