# syntax=docker/dockerfile:1
# Sluice's REST gateway: `sluice gateway` in front of Triton's gRPC port. Build from the repository root
# (docker-compose.yml does); .dockerignore keeps the venv, models, caches and tests out of the context.
#
# The gateway itself needs no torch and no CUDA, but the project is one package whose dependencies include
# everything the compiler and the runtimes use: torch==2.13.0, transformers, onnx, onnxruntime and the
# nvidia-pytriton wheel (55 MB, it carries a tritonserver binary). Installing torch from PyTorch's CPU index first
# keeps it to the CPU wheel (hundreds of MB unpacked); from PyPI alone the same pin resolves to the CUDA build,
# which pulls several GB of nvidia-* wheels. Either way most of this image is code the gateway never imports:
# splitting the dependencies into extras (`sluice[gateway]`, `sluice[compile]`) would slim it to a few dozen MB.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Its own layer, so that a code change does not download torch again. Keep the version equal to pyproject.toml's.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /src
COPY . .
RUN pip install . && rm -rf /src

# A fixed, unprivileged uid: the mounted model repository only has to be world-readable.
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin sluice
USER 10001
WORKDIR /tmp

EXPOSE 8080
# The repository (for sluice.json) is mounted at /models. Inside a container the gateway must bind 0.0.0.0 to be
# reachable through a published port, and a non-loopback bind requires API keys (SLUICE_API_KEYS, or
# gateway.api_keys compiled into sluice.json): without any, it refuses to start. docker-compose.yml publishes
# the port on 127.0.0.1 only.
ENTRYPOINT ["sluice", "gateway"]
CMD ["--repository", "/models", "--triton-grpc", "triton:8001", "--host", "0.0.0.0", "--port", "8080"]
