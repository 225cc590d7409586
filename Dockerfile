# ivr-bridge: docker build -t ivr-bridge . && docker run -p 8080:8080 -v ivr-data:/data ivr-bridge
#
# Build stage: wheels of the bridge and every dependency (any compiler stays here).
FROM python:3.11-slim AS build
# A C compiler for the resampling kernel (setup.py); without it the bridge falls back to numpy.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY ivr_bridge ./ivr_bridge
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Final stage: the installed package, no build or test tools, a non-root user, one volume.
FROM python:3.11-slim
# A numeric user (10001): resolvable on any host, and Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 ivr \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home ivr \
    && mkdir /data && chown 10001:10001 /data
COPY --from=build /wheels /wheels
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-index --find-links=/wheels ivr-bridge && rm -rf /wheels
# The call records (SQLite) live on the volume, at an absolute path the user can write.
ENV IVR_DATABASE_PATH=/data/ivr-bridge.db \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /data
VOLUME ["/data"]
USER 10001:10001
EXPOSE 8080
# Liveness only: /healthz stays 200 while the bridge drains its calls on SIGTERM.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# Exec form: the bridge is PID 1 and gets SIGTERM itself, which starts its drain
# (IVR_DRAIN_TIMEOUT_S); it starts no child processes, so it has none to reap.
STOPSIGNAL SIGTERM
ENTRYPOINT ["ivr-bridge"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
