# syntax=docker/dockerfile:1
# Triton Inference Server for Sluice's compiled model repository, on a GPU host.
#
# The model repository is NOT baked in: `sluice compile` writes it on the host (with `device: gpu` in config.yaml)
# and it is mounted read-only at /models (docker-compose.yml, deploy/k8s/triton.yaml). Each service is a
# Python-backend model whose 1/model.py imports the copied 1/runtimes/ package; this image only adds the packages
# those runtimes import.
#
# 24.10 is Triton 2.51.0, the release the project runs locally through the nvidia-pytriton==0.7.0 wheel. It is
# Ubuntu 22.04 with CUDA 12.6 and cuDNN 9.5, and its Python backend stub is built for the image's system Python,
# 3.10: the packages go into that interpreter, and every pin below is the newest release that still ships
# Python 3.10 wheels unless its comment says otherwise.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# numpy 1.26.4: Triton 2.51's Python backend does not support numpy 2 (a known issue in the 2.51/2.52 release
#   notes; the pybind11 bump that fixes it landed after 24.10), and 1.26.4 is what the project's own venv runs.
# onnxruntime-gpu 1.23.2: the last release with Python 3.10 wheels; its PyPI build targets CUDA 12.x + cuDNN 9,
#   which is what the image carries. The exported graphs are ONNX IR 8, opset 17, well within its range.
# tokenizers 0.23.3: the same release as the project's venv (abi3 wheels, Python >= 3.10).
# transformers 5.20.2: the last 5.x with Python 3.10 support (5.21+ need 3.11); same major as the venv (5.24),
#   so the LLM runtime's DynamicCache / AutoModelForCausalLM calls behave the same. It requires torch >= 2.6.
# torch 2.9.1: a CUDA build from PyPI; its nvidia-*-cu12 wheels bring CUDA 12.8 libraries, which run on the R560+
#   drivers Triton 24.10 asks for (CUDA minor-version compatibility). Later releases are not simply better here:
#   torch 2.14.1 on PyPI is a CUDA 13 build (nvidia-*-cu13), which needs a 580+ driver. The project's
#   torch==2.13.0 pin is the host's CPU wheel; the version matters little to the LLM runtime, which loads plain
#   safetensors and uses torch only through transformers and a few tensor ops.
# torch and onnxruntime never meet in one process: each model instance is its own Python stub process, and the
#   embedding/reranker runtimes import onnxruntime only, the LLM runtime torch only.
RUN python3 -m pip install \
        numpy==1.26.4 \
        onnxruntime-gpu==1.23.2 \
        tokenizers==0.23.3 \
        transformers==5.20.2 \
        torch==2.9.1 \
    && python3 -c "import numpy, onnxruntime, tokenizers, torch, transformers"

# The runtimes load artifacts from the mounted repository only; nothing may reach a model hub at run time.
# triton-server (uid 1000) is created by NVIDIA's image without a home directory, hence HF_HOME under /tmp.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface

USER triton-server
EXPOSE 8000 8001 8002

# Flags live in docker-compose.yml / deploy/k8s/triton.yaml; this is the plain form for `docker run`.
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=none", \
     "--cache-config=local,size=268435456"]
