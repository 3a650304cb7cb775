# One image for the web server and the workers (docker-compose.yml picks the command).
# GPU workers need torch's CUDA build: the default (PyPI's torch 2.13.0 for Linux x86_64). For a
# CPU-only image: docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    COMPRESSOR_DATA_DIR=/data \
    HF_HOME=/data/hf \
    DJANGO_STATIC_ROOT=/app/staticfiles

RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
ARG TORCH_INDEX_URL=""
COPY pyproject.toml constraints.txt ./
RUN pip install torch==2.13.0 -c constraints.txt ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

# Dependencies first, at the versions constraints.txt records: this layer is rebuilt only when pyproject.toml or
# constraints.txt change, not with every change of the code. The requirements are read from pyproject.toml
# (the project's own and its server extra's).
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['server']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt -c constraints.txt \
    && rm /tmp/requirements.txt

# Then the code, installed editable (its requirements are in place) so the templates and migrations are used
# from /app.
COPY . .
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 1000 app \
    && mkdir -p /data \
    && chown app /data \
    && DJANGO_SECRET_KEY=collectstatic-only python manage.py collectstatic --noinput

# GPU image (docker-compose builds it with WITH_VLLM=1): vLLM in /opt/vllm, apart from the service's torch.
ARG WITH_VLLM=0
RUN if [ "$WITH_VLLM" = "1" ]; then \
        python -m venv /opt/vllm && /opt/vllm/bin/pip install -r requirements-vllm.txt; \
    fi

USER app
VOLUME ["/data"]
EXPOSE 8000
# The web server's settings (gthread, WEB_CONCURRENCY processes of WEB_THREADS threads): compressor_app/gunicorn.py.
CMD ["gunicorn", "-c", "python:compressor_app.gunicorn", "compressor_app.wsgi:application"]
