# The worker image. Models are mounted (or baked in) at /models; nothing is downloaded at run time.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY schemas ./schemas
COPY models/__init__.py models/__main__.py models/tiny.py ./models/
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT ["python", "-m", "worker"]
CMD ["run", "/models"]
