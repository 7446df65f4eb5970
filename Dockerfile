# Plinth's container image: `docker build -t plinth .`
#
# Two stages: the release build in Rust's image, then the binary alone in
# Debian slim (CA certificates for TLS to PostgreSQL, Stripe, SMTP and an
# OTLP collector), run as an unprivileged user. Migrations and the default
# plan catalog are built into the binary. See docs/deploy.md.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# The toolchain file pins 1.95.0, which this image has; its components
# (rustfmt, clippy) are not needed to build.
RUN rm rust-toolchain.toml \
    && cargo build --release --locked -p plinth \
    && cp target/release/plinth /usr/local/bin/plinth

FROM debian:bookworm-slim
# ca-certificates follows Debian's security updates; pinning its version
# would hold them back. postgresql-client gives pg_dump, pg_restore and psql
# for tenant backups and exports (docs/operations.md); it must be of the
# server's major version or newer (bookworm's is 15).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates postgresql-client \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/plinth --create-home plinth
COPY --from=build /usr/local/bin/plinth /usr/local/bin/plinth
USER 10001:10001
WORKDIR /var/lib/plinth
ENV PLINTH_LISTEN=0.0.0.0:8080 \
    PLINTH_DATA_DIR=/var/lib/plinth \
    PLINTH_LOG_FORMAT=json
EXPOSE 8080
# `plinth health` asks GET /health/ready on PLINTH_LISTEN (no curl here).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["plinth", "health"]
ENTRYPOINT ["plinth"]
CMD ["serve"]
