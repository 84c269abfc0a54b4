# syntax=docker/dockerfile:1.7
# tidemark's container image: a build stage (dependencies cached in a layer of their
# own) and a distroless runtime without a shell or package manager, running as a
# non-root user on a read-only root filesystem; state lives on /var/lib/tidemark/data.
#
#   docker build -t tidemark:dev .
#   docker run --read-only -v tidemark-data:/var/lib/tidemark/data -p 8080:8080 \
#     -e TIDEMARK__HTTP__ALLOW_UNAUTHENTICATED=true tidemark:dev
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config libssl-dev zlib1g-dev gcc g++ make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, from the manifests alone: this layer is rebuilt only when
# Cargo.toml or Cargo.lock change, not with every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin benches \
 && echo 'fn main() {}' > src/bin/tidemark.rs \
 && echo 'fn main() {}' > src/bin/tidemark-sim.rs \
 && echo 'fn main() {}' > benches/hot_paths.rs \
 && echo 'fn main() {}' > benches/kafka_replay.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bins \
 && rm -rf src benches
COPY . .
# zlib is the one shared library the runtime image lacks (glibc and OpenSSL are in it).
RUN touch src/lib.rs src/bin/tidemark.rs src/bin/tidemark-sim.rs \
 && cargo build --release --locked --bins \
 && mkdir -p /out/usr/local/bin /out/var/lib/tidemark/data "/out/usr/lib/$(gcc -print-multiarch)" \
 && cp target/release/tidemark target/release/tidemark-sim /out/usr/local/bin/ \
 && cp -L "$(ldd target/release/tidemark | awk '/libz\.so/ {print $3}')" "/out/usr/lib/$(gcc -print-multiarch)/"

FROM gcr.io/distroless/base-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="tidemark" \
      org.opencontainers.image.description="A supervised, actor-based runtime for real-time sensor analytics" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/tidemark/tidemark" \
      org.opencontainers.image.documentation="https://github.com/tidemark/tidemark/blob/main/docs/operations.md"
COPY --from=build /out/usr/ /usr/
COPY --from=build --chown=65532:65532 /out/var/lib/tidemark /var/lib/tidemark
WORKDIR /var/lib/tidemark
# The embedded default store (sqlite://data/tidemark.db) and ingest log live here.
VOLUME ["/var/lib/tidemark/data"]
ENV TIDEMARK__HTTP__LISTEN=0.0.0.0:8080 \
    TIDEMARK__LOG__FORMAT=json
USER 65532:65532
EXPOSE 8080
# tidemark checkpoints every partition and drains its sinks on SIGTERM (shutdown.timeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tidemark"]
CMD ["run"]
