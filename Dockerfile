# syntax=docker/dockerfile:1
# xlserve's image: `xlserve serve` as the entrypoint, so the arguments of `docker run` are those of
# `xlserve serve` (`api_server MODEL --tp 2`, or `proxy`). Two targets:
#   gpu (the default: the last stage)  JAX with its CUDA 12 wheels        docker build -t xlserve .
#   cpu                                JAX for CPUs, to try it anywhere   docker build --target cpu -t xlserve:cpu .
# It runs as user 1001 in group 0, and also as any other UID in group 0 (OpenShift gives containers an
# arbitrary UID with group 0; `docker run --user "$(id -u):0"` does the same), so everything it writes
# lives under /cache, owned by group 0 and writable by it: HOME, the Hugging Face cache (HF_HOME), the
# demo checkpoint and JAX's compilation cache ($XDG_CACHE_HOME/xlserve). Mount a volume there to keep
# downloads and compiled programs across restarts. docs/kubernetes.md says how to run it.

# The CUDA base image brings the NVIDIA container settings (NVIDIA_VISIBLE_DEVICES, driver capabilities);
# the CUDA libraries themselves (cuBLAS, cuDNN, NCCL, ptxas) come with jax[cuda12]'s wheels, so its small
# `base` flavour is enough. Any Ubuntu 24.04 image works for the cpu target (e.g. ubuntu:24.04).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${BASE_IMAGE} AS python
# Ubuntu's security updates replace these packages' versions, so the base image's tag is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# The project, installed into a virtual environment that the runtime stages copy whole.
FROM python AS build-cpu
RUN python3 -m venv /opt/xlserve
ENV PATH=/opt/xlserve/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY configs configs
COPY model model
COPY serving serving
COPY xlkernels xlkernels
RUN pip install --no-cache-dir .

FROM build-cpu AS build-gpu
RUN pip install --no-cache-dir "/src[gpu]"

FROM python AS runtime
# USER: Python's getpass.getuser() reads it first, so an arbitrary UID with no passwd entry never
# fails a look-up. PYTHONUNBUFFERED: log lines reach `docker logs` / `kubectl logs` as they are written.
ENV PATH=/opt/xlserve/bin:$PATH \
    HOME=/cache \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    USER=xlserve \
    PYTHONUNBUFFERED=1
RUN useradd --uid 1001 --gid 0 --home-dir /cache --no-create-home --shell /usr/sbin/nologin xlserve \
    && mkdir -p /cache/huggingface /cache/xlserve \
    && chown -R 1001:0 /cache \
    && chmod -R g=u /cache
WORKDIR /cache
VOLUME ["/cache"]
USER 1001
EXPOSE 23333
# /health is 200 while the server lives, compiling or not; readiness (/v1/ready) is for the traffic
# (Kubernetes' probes). Another port: set XLSERVE_SERVER_PORT as well (the proxy listens on 8000).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('XLSERVE_SERVER_PORT', '23333'), timeout=4)"]
ENTRYPOINT ["xlserve", "serve"]
CMD ["api_server"]

# A C++ compiler: the CPU's decode attention kernel is compiled on first use for the CPU it runs on
# (-march=native, cached under /cache/xlserve/native; without one, attention runs in XLA, slower).
FROM runtime AS cpu
USER 0
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
USER 1001
COPY --from=build-cpu /opt/xlserve /opt/xlserve

FROM runtime AS gpu
COPY --from=build-gpu /opt/xlserve /opt/xlserve
