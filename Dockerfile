# loraship as a Docker action: a CUDA-capable PyTorch runtime with loraship installed, pinned.
# Build and publish a prebuilt image (see the README) to save minutes per run.
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

LABEL org.opencontainers.image.title="loraship" \
      org.opencontainers.image.description="Merge LoRA adapters into their base model, verify, publish."

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/github/workspace/.cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PYTHONPATH=/opt/loraship

WORKDIR /opt/loraship
COPY pyproject.toml README.md ./
COPY constraints/docker.txt constraints/docker.txt
COPY src src
COPY entrypoint entrypoint
# torch comes from the base image (CUDA build); everything else is pinned by constraints/docker.txt.
RUN pip install --no-cache-dir -c constraints/docker.txt . \
    && useradd --create-home --uid 1001 loraship

# uid 1001 is the user of GitHub-hosted runners, who owns the mounted workspace.
USER 1001
ENTRYPOINT ["python", "-m", "entrypoint"]
