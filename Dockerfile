# The worker image: the wheel and its dependencies, nothing else. Models are mounted (or baked in)
# at /models; nothing is downloaded at run time.
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY worker ./worker
# worker/demo_models/ links to these: the demo's tiny models and samples ship inside the wheel.
COPY models/tiny ./models/tiny
COPY models/samples ./models/samples
RUN pip wheel --no-deps --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
USER nobody
ENTRYPOINT ["python", "-m", "worker"]
CMD ["run", "/models"]
