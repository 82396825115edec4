#!/usr/bin/env bash
# The checks only a GPU can make, prepared for one device run of under 10 minutes on one H100/H200
# (docs/benchmarks.md says how to carry the webdataset wheel there):
#
#   tests       the nvJPEG equivalence test (through nvImageCodec where its GPU backend loads), the GPU decoder's
#               probe, and the fp16 loss-scaler fault test, which skip without a GPU
#   loader      bench_loader with --decode device: decode-only and loader img/s on the GPU, main-process and
#               worker CPU per image, and 1, 2, 4 processes sharing the decoder; nvImageCodec's GPU decoder
#               where it loads (the log's first lines say if it does not), and the CPU loaders with region decoding
#   loader_tv   the same decode-only and loader rows with TorchCodec/torchvision on the GPU (--no-nvimgcodec-gpu)
#
# nvImageCodec travels as wheels (nothing can be fetched there): nvidia_nvimgcodec_cu13 (25 MB) and the nvidia-nvjpeg
# wheel of CUDA 13 that its "nvjpeg" extra names, carried beside the webdataset wheel (64 MiB in all) and installed
# with pip install --no-deps first; without nvidia-nvjpeg its GPU backend does not load and (d)/(e) say so.
#   resolution  bench_resolution on the GPU: img/s at each size of FFCV's ramps, in bf16
#   train       bench_train: ResNet-18 and ResNet-50, bf16, channels_last, eager: ours, timm's loop, the real
#               loader with --decode cpu and with --decode device
#
# Usage: bash bench/gpu_checks.sh [STEP ...]   (default: tests loader resolution train, about 2, 3, 1 and 4
# minutes; loader_tv, 3 more, only when named)
# Each step's log goes to $OUT/STEP.log (OUT defaults to /tmp/gpu_checks); a step that fails or runs out of
# time does not stop the next. Record every figure, with this script's command, in docs/benchmarks.md.
set -uo pipefail

OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests loader resolution train)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
for s in "${steps[@]}"; do
    case $s in
        tests) step tests 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_device_decode.py \
                   tests/test_faults.py -k "nvjpeg or fp16 or nvimgcodec or probe" ;;
        loader) step loader 200 python3 -m bench.bench_loader --device cuda --images 1536 --batch-size 256 \
                    --rounds 2 --decode-procs 1 2 4 --decode-images 6144 --work /tmp/gpu_checks_loader ;;
        loader_tv) step loader_tv 200 python3 -m bench.bench_loader --device cuda --images 1536 --batch-size 256 \
                    --rounds 2 --no-nvimgcodec-gpu --work /tmp/gpu_checks_loader ;;
        resolution) step resolution 60 python3 bench/bench_resolution.py --device cuda --batch-size 256 ;;
        train) step train 250 python3 bench/bench_train.py --archs resnet18,resnet50 --precisions bf16 \
                   --channels-last on --compile off --real-loader all --decode both --rounds 1 --steps 50 \
                   --budget-s 230 --out "$OUT/bench_train.md" ;;
        *) echo "unknown step $s (tests, loader, loader_tv, resolution, train)"; exit 2 ;;
    esac
done
