# t2v in a container: `t2v serve` (the API) and `t2v worker` from one image.
#   docker build -t t2v .                                  # CPU
#   docker build -t t2v:cuda --build-arg FEATURES=cuda \
#     --build-arg BUILD_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04 \
#     --build-arg RUNTIME_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 .   # NVIDIA GPUs
# (the CUDA build images need a Rust toolchain: the build stage installs one when missing)
ARG BUILD_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILD_IMAGE} AS build
ARG FEATURES=""
RUN if ! command -v cargo >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential && \
      curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal; \
    fi
ENV PATH="/root/.cargo/bin:${PATH}"
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY crates crates
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p t2v-cli --bin t2v ${FEATURES:+--features $FEATURES} && \
    cp target/release/t2v /usr/local/bin/t2v

FROM ${RUNTIME_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* && \
    groupadd --system --gid 10001 t2v && \
    useradd --system --uid 10001 --gid t2v --home-dir /var/lib/t2v --create-home t2v && \
    mkdir -p /data /models && chown t2v:t2v /data /models
COPY --from=build /usr/local/bin/t2v /usr/local/bin/t2v
# The model cache (a volume: downloaded once) and the results (a volume every process shares).
ENV HF_HOME=/models
VOLUME ["/data", "/models"]
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["t2v"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--data", "/data"]
