#!/usr/bin/env bash
# Entrypoint of Dockerfile.triton: give the `unet` model a TensorRT plan built for this GPU, then run the
# command (CMD: serve.py). Plans are specific to a GPU model and a TensorRT version, so they are built where
# they run, on first start, from the FP32 ONNX of the newest shipped version (build_engines.py --onnx latest),
# and checked there against ONNX Runtime before Triton starts.
#
#   HEMOSEG_TARGET=auto      (default) TensorRT plan when a GPU is visible, else the CPU model (ONNX Runtime);
#                            a failed plan build falls back to the CPU model, with a warning.
#   HEMOSEG_TARGET=tensorrt  the plan or nothing: exit 1 if there is no GPU or the build fails.
#   HEMOSEG_TARGET=cpu       never build a plan.
#   HEMOSEG_ENGINE_CACHE     (default /engines) finished plans are kept there, keyed by GPU model, TensorRT
#                            version and shipped ONNX: mount a volume there and later containers skip the build.
set -euo pipefail
cd /opt/hemoseg
repo=/opt/hemoseg/model_repository
unet=$repo/unet
target=${HEMOSEG_TARGET:-auto}
cache=${HEMOSEG_ENGINE_CACHE:-/engines}

log() { echo "entrypoint: $*" >&2; }
newest() { ls "$unet" | grep -E '^[0-9]+$' | sort -n | tail -n1; }
fail_or_cpu() {
  if [ "$target" = tensorrt ]; then log "$1 (HEMOSEG_TARGET=tensorrt): not starting"; exit 1; fi
  log "$1: serving the CPU model (ONNX Runtime)"
}

case "$target" in auto|tensorrt|cpu) ;; *) log "HEMOSEG_TARGET must be auto, tensorrt or cpu, not '$target'"; exit 1;; esac

if [ "$target" != cpu ] && ! grep -q 'platform: *"tensorrt_plan"' "$unet/config.pbtxt"; then
  if ! nvidia-smi -L >/dev/null 2>&1; then
    fail_or_cpu "no GPU visible (docker run --gpus all?)"
  else
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | tr -cs 'A-Za-z0-9' '_')
    trt=$(python3 -c 'import tensorrt; print(tensorrt.__version__)')
    onnx_sum=$(cat "$unet"/[0-9]*/*.onnx | sha256sum | cut -c1-16)
    key="$cache/${gpu}_trt${trt}_onnx${onnx_sum}"
    if [ -f "$key/config.pbtxt" ]; then
      log "TensorRT plan from the cache: $key"
      cp -r "$key"/[0-9]* "$unet"/
      cp "$key/config.pbtxt" "$unet/config.pbtxt"
    else
      log "building the TensorRT FP16 plan for ${gpu} (TensorRT ${trt}); once per GPU model with a cache volume"
      if python3 build_engines.py --target tensorrt --model-repository "$repo" --onnx latest; then
        version=$(newest)
        if mkdir -p "$key.partial" 2>/dev/null && cp -r "$unet/$version" "$unet/config.pbtxt" "$key.partial/" \
            && mv "$key.partial" "$key"; then
          log "plan cached in $key"
        else
          log "warning: could not cache the plan in $cache (no volume mounted?)"
        fi
      else
        fail_or_cpu "the TensorRT plan could not be built (see above)"
      fi
    fi
  fi
fi
exec "$@"
