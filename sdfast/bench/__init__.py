"""The benchmark suite behind `sdfast bench`: sdfast against diffusers (eager), diffusers
accelerated by `sdfast.accelerate`, sdfast with its ops forced to the pure-torch reference, and
ONNX Runtime, measured in the same run.

    sdfast bench --arch sd15 --suite unet --resolution 256 --batch 2 --json out.json --plot out.png

Modules: `arch` (random-weight models at real shapes, in the real file formats), `runtimes`
(the sides of a comparison, one registry), `measure` (interleaved repeats, medians and spread,
the machine), `suites` (kernels, unet, e2e, lora, load, memory), `kernels` (the per-op cases
and the GEMM roofline, shared with bench/kernels.py), `child` (the fresh process of the load and
memory suites), `report` (table, JSON, bar chart), `cli`.

Importing this package imports nothing heavy (the load suite's child process starts its clock
after importing it).
"""
