# The provscope node agent, installed from this repository (docker-compose.yml builds
# it with the repository as context). NVML comes from the NVIDIA container runtime when
# the GPU override (docker-compose.gpu.yml) is used; without GPUs the agent samples the
# host only.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY provscope ./provscope
COPY agent ./agent
COPY exporters ./exporters
COPY dashboards ./dashboards
RUN pip install --no-cache-dir '.[gpu,postgres]' && rm -rf /src
WORKDIR /
CMD ["provscope", "agent"]
