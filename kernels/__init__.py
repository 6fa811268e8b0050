"""Triton kernels, installed as `sdfast.kernels`.

Each file holds one op: the math in a docstring, a pure-torch reference `<op>_ref`, the
@triton.jit kernel(s) and the launcher. Nothing here imports sdfast.
"""
