# edgekit agent for NVIDIA Jetson (L4T / JetPack base with CUDA and TensorRT). Engines are built on the device by
# trtexec from the shipped ONNX, so this image carries trtexec and no torch.
# Run with the NVIDIA runtime: docker run --runtime nvidia --network host -v $PWD/token:/run/edgekit/token:ro IMAGE
ARG BASE_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0
FROM ${BASE_IMAGE}
ARG EDGEKIT_VERSION=0.1.0

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-pip python3-numpy python3-psutil \
    && rm -rf /var/lib/apt/lists/*
COPY wheels/ /wheels/
RUN python3 -m pip install --no-cache-dir --no-index --find-links /wheels "edgekit[agent]==${EDGEKIT_VERSION}" \
    && rm -rf /wheels \
    && useradd --create-home --uid 10001 --groups video edgekit
# trtexec ships in the JetPack image outside PATH.
ENV PATH="/usr/src/tensorrt/bin:${PATH}"
USER 10001
WORKDIR /home/edgekit
EXPOSE 8765
CMD ["edgekit", "agent", "serve", "--host", "0.0.0.0", "--port", "8765", "--token-file", "/run/edgekit/token", "--data-dir", "/home/edgekit/data"]
