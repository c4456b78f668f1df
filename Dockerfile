# The dawn image that cluster/ names: the dawn package (a wheel, not a checkout) and its pinned stack on the
# Ray image of the pinned Ray version.
#   CUDA nodes: docker build -t ghcr.io/dawn-platform/dawn:0.1.0-cuda .
#   CPU nodes:  docker build --build-arg BASE=rayproject/ray:2.60.0-py311-cpu \
#                 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t ghcr.io/dawn-platform/dawn:0.1.0-cpu .
ARG BASE=rayproject/ray:2.60.0-py311-gpu

FROM ${BASE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dawn ./dawn
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${BASE}
# PyPI's torch wheel is the CUDA build; CPU images take torch from the CPU index. Same pin as requirements.txt.
ARG TORCH_INDEX=https://pypi.org/simple
ARG TORCH_VERSION=2.13.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
USER 0
# g++ builds dawn's native CPU kernels on first use; espeak-ng speaks the synthetic corpus of `dawn demo`
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ espeak-ng \
    && rm -rf /var/lib/apt/lists/*
USER 1000
COPY --chown=1000 requirements.txt requirements-nodeps.txt /tmp/dawn/
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir -r /tmp/dawn/requirements.txt \
    && pip install --no-cache-dir --no-deps -r /tmp/dawn/requirements-nodeps.txt
COPY --from=wheel /wheels /tmp/dawn/wheels
RUN pip install --no-cache-dir --no-deps /tmp/dawn/wheels/*.whl && rm -rf /tmp/dawn
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
