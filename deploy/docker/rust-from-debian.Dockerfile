# A stand-in for the official `rust:<version>-bookworm` image, made from Debian's packages, for
# machines that reach an apt mirror but no container registry (build.sh uses it only when
# the official image cannot be pulled). Debian bookworm-security's rustc-web/cargo-web are
# newer than the version in the tag; build.sh checks they are at least that version.
# Built with `--network host` (apt reaches the mirror the host uses) and no context.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends rustc-web cargo-web build-essential pkg-config ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# Where the official image keeps cargo's home, so the Dockerfile's cache mounts fit both.
ENV CARGO_HOME=/usr/local/cargo
ENV PATH=/usr/local/cargo/bin:$PATH
