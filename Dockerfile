# loraship's images, built from one file (docker build --target NAME):
#
#   action  the GitHub Docker action (also the default, the last stage). Runs as root and relies on no
#           WORKDIR, as GitHub's "Dockerfile support for GitHub Actions" requires: the runner mounts the
#           workspace and makes it the working directory.
#   bot     `loraship serve` (webhook bot) and job-level `container:` use, as a non-root user (1001).
#
# `action` comes before `bot`, so `--target action` builds only `base` and `action`, with the classic
# builder too (it builds every stage up to the target).
#
# torch is the version the project tests (2.13.0), installed alone in the first layer so that a change
# to loraship's sources rebuilds only the small layers after it. Default: PyPI's build, which on Linux
# x86-64 is the CUDA one. For the slim CPU image pass --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (.github/workflows/image.yml builds and pushes both, tagged vX.Y.Z / vX and vX.Y.Z-cpu / vX-cpu).
FROM python:3.11-slim AS base

ARG TORCH_INDEX=https://pypi.org/simple

LABEL org.opencontainers.image.title="loraship" \
      org.opencontainers.image.description="Merge LoRA adapters into their base model, verify, publish." \
      org.opencontainers.image.licenses="Apache-2.0"

# PYTHONSAFEPATH: `python -m entrypoint` must never import a file or folder named `entrypoint` from
# the user's workspace (the working directory). HF_HOME: the download cache stays out of the
# workspace (no gigabytes in the user's checkout or artifacts); /github/home is the runner's home.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONSAFEPATH=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/github/home/.cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PYTHONPATH=/opt/loraship

# The large layer (about 1.2 GB for CPU torch), cached across source changes.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" torch==2.13.0

# Everything else pinned by constraints/docker.txt (torch is already there and is kept).
COPY pyproject.toml README.md LICENSE /opt/loraship/
COPY constraints/docker.txt /opt/loraship/constraints/docker.txt
COPY src /opt/loraship/src
COPY entrypoint /opt/loraship/entrypoint
RUN pip install --no-cache-dir -c /opt/loraship/constraints/docker.txt /opt/loraship

FROM base AS action
ENTRYPOINT ["/usr/local/bin/python", "-P", "-m", "entrypoint"]

FROM base AS bot
ENV HF_HOME=/home/loraship/.cache/huggingface
# /data (the queue, bot.yaml) belongs to the bot, so a named volume mounted there starts writable by it.
RUN useradd --create-home --uid 1001 loraship && install -d -o 1001 -g 1001 /data
USER 1001
ENTRYPOINT ["/usr/local/bin/loraship"]
CMD ["serve", "--config", "/data/bot.yaml", "--host", "0.0.0.0", "--port", "8080"]

# The default target (a build without --target, as GitHub builds a Dockerfile action): the action.
FROM action
