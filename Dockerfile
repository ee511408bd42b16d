# Flashtile's image, for k8s/ (KubeRay): the repo on Ray's own image, torch pinned, the embedded default model
# baked in. One file, two variants of torch:
#   docker build -t flashtile:0.1.0 .                          # VARIANT=cpu: CPU torch (a CPU-only cluster)
#   docker build --build-arg VARIANT=cuda -t flashtile:0.1.0 .  # CUDA torch: the gpu groups need it, CPU pods run it
# Nothing is downloaded but packages: the weights are the repo's (weights/, and the MiniLM encoder a package ships),
# and HF_HUB_OFFLINE keeps a running pod from ever fetching any.

# The Ray version must be k8s/render.py's RAY_VERSION (the RayService's rayVersion); tests/test_k8s.py checks it.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311

ARG RAY_VERSION
ARG VARIANT=cpu
# torch as the Makefile pins it, and the torchvision built for it (spandrel needs torchvision; left to resolve
# alone it would pull a torch of its own).
ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0
# The PyTorch index of the CUDA build (cu12x wheels bundle their CUDA runtime; the node needs only the driver).
ARG CUDA=cu128
# 1: build the embedded default model into the image's cache now, so pods don't build it on first use.
ARG BAKE_DEFAULT=1

# The base image's user ray (uid 1000, group users = 100) owns its Python: nothing here runs as root. Numeric, so
# Kubernetes' runAsNonRoot can verify it.
USER 1000:100
ENV FLASHTILE_CACHE=/home/ray/.cache/flashtile \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1

# torch first, from PyTorch's index for the variant: PyPI's Linux torch is a CUDA build, so an unpinned or
# PyPI-resolved torch would never give the CPU variant. Its own layer: code changes don't reinstall it.
RUN case "${VARIANT}" in \
        cpu) index="https://download.pytorch.org/whl/cpu" ;; \
        cuda) index="https://download.pytorch.org/whl/${CUDA}" ;; \
        *) echo "VARIANT must be cpu or cuda, not '${VARIANT}'" >&2; exit 1 ;; \
    esac \
    && pip install --no-cache-dir --index-url "${index}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# Editable, as in the Makefile: the embedded default finds its weights in the repo's weights/. torch, torchvision
# and Ray are named again so the rest resolves around them instead of replacing them.
COPY --chown=1000:100 . /home/ray/flashtile
WORKDIR /home/ray/flashtile
RUN pip install --no-cache-dir -e . "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        "ray[serve]==${RAY_VERSION}" \
    && if [ "${BAKE_DEFAULT}" = "1" ]; then flashtile build-default; fi

LABEL org.opencontainers.image.title="flashtile" \
      org.opencontainers.image.description="Flashtile on Ray Serve, torch ${TORCH_VERSION} (${VARIANT})"
