# stratalign on a CUDA machine. Build: docker build -t stratalign .   Run: docker run --gpus all -v $PWD/store:/store stratalign demo --store /store
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /opt/stratalign
COPY pyproject.toml README.md ./
COPY stratalign ./stratalign
# PyPI's default torch wheel for Linux is the CUDA build. faiss-gpu-cu12 and faiss-cpu both install the
# `faiss` module and cannot live side by side: drop faiss-cpu (a core dependency) and reinstall the GPU build.
RUN pip install ".[gpu,clip,embedded]" \
    && pip uninstall -y faiss-cpu \
    && pip install --force-reinstall --no-deps faiss-gpu-cu12
ENTRYPOINT ["stratalign"]
CMD ["--help"]
