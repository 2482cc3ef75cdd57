# edgekit agent for CPU devices (Raspberry Pi 5, generic arm64 / x86 boards): ONNX Runtime + llama.cpp, no torch.
# Rendered by `edgekit docker build --target T`; BASE_IMAGE comes from the target profile.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# llama-cpp-python compiles llama.cpp; keep the compiler out of the final image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
COPY wheels/ /wheels/
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=4
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels "llama-cpp-python==0.3.36" "onnxruntime==1.32.0" \
        "psutil>=5.9" "numpy>=1.26"

FROM ${BASE_IMAGE}
ARG EDGEKIT_VERSION=0.1.0
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir --no-index --find-links /wheels "edgekit[agent]==${EDGEKIT_VERSION}" \
        "llama-cpp-python==0.3.36" "onnxruntime==1.32.0" \
    && rm -rf /wheels \
    && useradd --create-home --uid 10001 edgekit
USER 10001
WORKDIR /home/edgekit
EXPOSE 8765
# The token file is mounted at run time: docker run -v $PWD/token:/run/edgekit/token:ro -p 8765:8765 IMAGE
CMD ["edgekit", "agent", "serve", "--host", "0.0.0.0", "--port", "8765", "--token-file", "/run/edgekit/token", "--data-dir", "/home/edgekit/data"]
