#!/usr/bin/env bash
# Build FP16 TensorRT plans for the GPU model repository from the same ONNX files the CPU stack serves.
#
#   posemesh models prepare --out run/onnx          # dynamic batch + uint8 inputs (mesh/models.py)
#   deploy/tensorrt/build_engines.sh run/onnx deploy/tensorrt/model_repository
#
# Runs trtexec inside NVIDIA's Triton container (TensorRT must match the server that loads the plans:
# build with the same image tag you deploy). Batch profile 1..32, optimised for 16. Needs a GPU; it
# cannot run on the CPU-only development machines, where the CPU repository (model_repository/) is used.
set -euo pipefail
ONNX_DIR=${1:?usage: build_engines.sh ONNX_DIR REPOSITORY}
REPO=${2:?usage: build_engines.sh ONNX_DIR REPOSITORY}
IMAGE=${TRITON_IMAGE:-nvcr.io/nvidia/tritonserver:24.10-py3}

# model name -> input tensor name and its per-sample shape (must match mesh/models.py)
declare -A INPUT=( [yolox]="images:3x416x416" [blazepose_lite]="input_1:256x256x3"
                   [blazepose_full]="input_1:256x256x3" [rtmpose]="input:3x256x192" )

for model in "${!INPUT[@]}"; do
  name=${INPUT[$model]%%:*}
  shape=${INPUT[$model]#*:}
  mkdir -p "$REPO/$model/1"
  echo "building $model ($name ${shape}, batch 1..32)"
  docker run --rm --gpus all -v "$(realpath "$ONNX_DIR")":/onnx:ro -v "$(realpath "$REPO")":/repo "$IMAGE" \
    /usr/src/tensorrt/bin/trtexec --onnx="/onnx/$model.onnx" --saveEngine="/repo/$model/1/model.plan" --fp16 \
      --minShapes="$name:1x$shape" --optShapes="$name:16x$shape" --maxShapes="$name:32x$shape"
done
echo "plans written under $REPO; serve with: tritonserver --model-repository=$REPO"
