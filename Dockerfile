# Sesame: one binary, `sesame`. Build stage compiles it; the runtime image holds only it.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sesame-node --bin sesame \
    && strip target/release/sesame

FROM debian:bookworm-slim
# /data and /certs belong to the runtime user: a new named volume mounted on either takes
# their owner, so the user can write it (docker-compose.yml's data and certs volumes).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /data --uid 10001 sesame \
    && mkdir -p /data /certs && chown sesame /data /certs
COPY --from=build /src/target/release/sesame /usr/local/bin/sesame
USER sesame
VOLUME ["/data"]
# HTTP (API and pages) on TCP, the cluster link (QUIC) on UDP.
EXPOSE 7700/tcp 7800/udp
ENTRYPOINT ["sesame"]
CMD ["dev", "--data", "/data", "--http", "0.0.0.0:7700"]
