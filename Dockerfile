# The corral image docker-compose.yml runs: the `corral` command with Flower, as a plain user.
FROM docker.io/library/python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /var/lib/corral --create-home corral
WORKDIR /src
COPY pyproject.toml README.md ./
COPY broker broker
COPY worker worker
COPY controller controller
RUN pip install --no-cache-dir '.[monitor]' && rm -rf /src

USER corral
WORKDIR /var/lib/corral
ENTRYPOINT ["corral"]
CMD ["--help"]
