# llmwarm for GPUs, on the official vLLM OpenAI image of the pinned vLLM release.
#
#   docker build -t llmwarm .
#   docker run --gpus all -p 8000:8000 llmwarm meta-llama/Llama-3.1-8B-Instruct [vllm serve flags]
#
# Like the vLLM image, the arguments are MODEL and `vllm serve` flags; the port answers 503
# until the warm-up is done. Configuration by environment: see the README ("Container").
# BASE: vLLM's image; scripts/build-image checks these layers here on Dockerfile.cpu's `engine`
# stage (vLLM's CPU build), since no GPU image can be pulled or run on this CI machine.
ARG VLLM_VERSION=0.32.0
ARG BASE=vllm/vllm-openai:v${VLLM_VERSION}
FROM ${BASE}

# vLLM (and torch) come with the base image: install llmwarm alone, not its [gpu] extra.
COPY pyproject.toml README.md /opt/llmwarm/
COPY llmwarm /opt/llmwarm/llmwarm
RUN python3 -m pip install --no-cache-dir /opt/llmwarm \
 && python3 -c "import llmwarm, vllm; print('llmwarm on vLLM', vllm.__version__)"

# Defaults a flag overrides; the cache directory is where `llmwarm bake` puts compile caches
# (an image layer: see deploy/README.md), empty until then.
ENV LLMWARM_REPORT=/var/lib/llmwarm/report.json \
    LLMWARM_CACHE_DIR=/var/cache/llmwarm
RUN mkdir -p /var/lib/llmwarm /var/cache/llmwarm
EXPOSE 8000
# Exec form: llmwarm is PID 1 and gets SIGTERM itself (it drains, then stops the engine).
ENTRYPOINT ["llmwarm", "serve"]
