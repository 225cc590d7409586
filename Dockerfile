FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ivr_bridge ./ivr_bridge
RUN pip install --no-cache-dir .
EXPOSE 8080
USER nobody
CMD ["ivr-bridge", "serve", "--host", "0.0.0.0", "--port", "8080"]
