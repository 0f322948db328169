# The image of the ServerApp and ClientApp SuperExecs: Flower 1.41's SuperExec
# plus fedlr and its dependencies. SuperLink and SuperNodes use Flower's images.
#   docker compose build && docker compose up
# For CUDA clients build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
FROM flwr/superexec:1.41.0

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
USER root
RUN python -m pip install --no-cache-dir "torch>=2.6" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY fedlr ./fedlr
COPY strategies ./strategies
COPY clients ./clients
COPY experiments ./experiments
RUN python -m pip install --no-cache-dir -e . && mkdir -p /app/results && chown -R app:app /app
USER app
ENV FEDLR_CACHE=/app/results/.cache
