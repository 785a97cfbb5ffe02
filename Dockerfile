# The loracache daemon's image. Two variants, from this one file:
#
#   CUDA (default), on the official PyTorch runtime image, whose torch it keeps:
#     docker build -t loracache:cuda .
#   CPU, on a slim Python image, with torch's CPU build:
#     docker build -t loracache:cpu --build-arg BASE=python:3.11-slim --build-arg TORCH=cpu .
#
# It runs as user and group loracache (10001; workers join group 10001 to reach the socket),
# `loracache serve --config /etc/loracache/config.toml` by default, and is healthy while
# `loracache ping` answers (podman/buildah: build with --format docker to keep the check).
# deploy/check-image.sh checks an image as the cluster runs it; deploy/README.md shows how to
# run it on Kubernetes.
#
# Both variants run the same torch release: the CUDA base's tag names it, TORCH_VERSION pins the
# CPU build to it (change both together). Workers on torch 2.5 or newer open its CUDA handles.
ARG BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE}
ARG TORCH=keep
ARG TORCH_VERSION=2.5.1

RUN if [ "$TORCH" = cpu ]; then \
      pip install --no-cache-dir "torch==${TORCH_VERSION}" \
        --index-url https://download.pytorch.org/whl/cpu; \
    fi \
 && groupadd --system --gid 10001 loracache \
 && useradd --system --uid 10001 --gid loracache --no-create-home --home-dir /tmp loracache \
 && install -d -o loracache -g loracache -m 0750 /run/loracache /var/cache/loracache \
 && install -d /srv/loras

WORKDIR /opt/loracache
COPY pyproject.toml README.md ./
COPY daemon daemon
COPY client client
COPY shared shared
RUN pip install --no-cache-dir . && rm -rf /opt/loracache/build
COPY systemd/config.toml /etc/loracache/config.toml

USER loracache:loracache
# No LORACACHE_SOCKET: the environment would win over the config file's socket. The commands
# find it through /etc/loracache/config.toml.
ENV HOME=/tmp
HEALTHCHECK --interval=20s --timeout=5s --start-period=60s CMD ["loracache", "ping"]
ENTRYPOINT ["loracache"]
CMD ["serve", "--config", "/etc/loracache/config.toml"]
