#!/bin/sh
# The CPU runs recorded in bench/results/ (issue 8's settings, SD1.5 shapes with random weights;
# the model is built once into $SDFAST_BENCH_DIR or ~/.cache/sdfast/bench, 4.3 GB).
#
#   [E2E_STEPS=20] sh bench/run_cpu_sd15.sh [extra sdfast bench flags, e.g. --threads 1]
#
# Each suite writes bench/results/cpu-sd15-<suite>.json and .png (replacing earlier runs).
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
run() {
    suite=$1; shift
    $PY -m sdfast bench --arch sd15 --suite "$suite" --overwrite \
        --json "bench/results/cpu-sd15-$suite.json" --plot "bench/results/cpu-sd15-$suite.png" "$@"
}
run kernels --resolution 256 --repeats 5 "$@"
run unet --resolution 256 --batch 2 --repeats 5 \
    --compare diffusers,diffusers-accelerated,torch-reference,onnxruntime "$@"
$PY -m sdfast bench --arch sd15 --suite unet --resolution 256 --batch 1 --repeats 5 --overwrite \
    --compare diffusers,diffusers-accelerated,torch-reference,onnxruntime \
    --json bench/results/cpu-sd15-unet-batch1.json --plot bench/results/cpu-sd15-unet-batch1.png "$@"
run e2e --resolution 512 --steps "${E2E_STEPS:-20}" --repeats 2 --cache-interval 3 --cache-depth 1 \
    --compare diffusers "$@"
run lora --repeats 5 "$@"
run load --repeats 5 "$@"
run memory --resolution 512 --steps 2 --repeats 2 "$@"
