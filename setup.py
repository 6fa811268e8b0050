"""Build and install sdfast.

`setup.py` drives CMake (CMakeLists.txt), which builds the torch-free pybind11 module
`sdfast._C` (CPU kernels, always) and `sdfast._C_cuda` (CUDA kernels, when the toolkit is
found). `kernels/` (Triton) installs as `sdfast.kernels`.

Set SDFAST_NO_EXT=1 to skip the native build entirely: every op then runs on the pure-torch
reference backend (slower, same results).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build every native target with one CMake invocation."""

    def run(self):
        if os.environ.get("SDFAST_NO_EXT") == "1":
            return
        if shutil.which("cmake") is None:
            raise RuntimeError("cmake is required to build sdfast's native kernels "
                               "(or set SDFAST_NO_EXT=1 to use the torch reference only)")
        import pybind11

        # A fixed build dir (ignored by git): rebuilds are incremental and the C++ tests stay
        # where tests/test_ops_cpu.py runs them with ctest.
        build_dir = ROOT / "build" / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        out_dir = Path(self.get_ext_fullpath(self.extensions[0].name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DSDFAST_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        cfg += os.environ.get("SDFAST_CMAKE_ARGS", "").split()
        subprocess.check_call(["cmake", str(ROOT), *cfg], cwd=build_dir)
        jobs = os.environ.get("SDFAST_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "--build", ".", "-j", jobs], cwd=build_dir)


setup(
    name="sdfast",
    version="0.1.0",
    description="A fast Stable Diffusion runtime",
    packages=find_packages(include=["sdfast", "sdfast.*"]) + ["sdfast.kernels"],
    package_dir={"sdfast.kernels": "kernels"},
    package_data={"sdfast": ["text/data/*", "builtin/*"]},
    python_requires=">=3.11",  # tomllib (training configs)
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "pillow",
        "tokenizers",
        "tqdm",
        "accelerate",  # sdfast train (single process, torchrun and accelerate launch)
    ],
    extras_require={
        "test": [
            "pytest",
            "diffusers>=0.30",
            "transformers>=4.40",
            "peft",
            "accelerate",
            "scipy",
            "torchsde",
            "triton>=3.9; platform_system == 'Linux'",
            "onnx>=1.16",
            "onnxruntime>=1.18",
        ],
        # `sdfast export onnx` and the onnxruntime backend (TensorRT: pip install tensorrt)
        "export": ["onnx>=1.16", "onnxruntime>=1.18"],
    },
    ext_modules=[CMakeExtension("sdfast._C")],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["sdfast=sdfast.cli:main"]},
)
