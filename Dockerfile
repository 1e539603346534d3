# syntax=docker/dockerfile:1
# quern: the gateway and a worker in one container (`quern serve`).
#
#   docker build -t quern .
#   docker run -p 3001:3001 -e DATABASE_URL=postgres://… -e QUERN_JWT_SECRET=… quern
#
# The build stage compiles the host and every handler (wasm32-wasip2) with the
# registry and the build directory in cache mounts, so a rebuild after a source
# change recompiles only what changed. The runtime stage is distroless: glibc,
# CA certificates (for https upstreams), the stripped binary and the built
# handlers; no shell, no package manager, an unprivileged user.

FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN rustup target add wasm32-wasip2
COPY . .
# The binary leaves the cache mount by a copy; the empty data directory is
# made here because the runtime image has no shell to make it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    CI=true cargo xtask build-handlers \
 && CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --release --locked -p quern \
 && cp target/release/quern /usr/local/bin/quern \
 && rm -rf handlers-dist/fixtures \
 && mkdir -p /data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/quern /usr/local/bin/quern
COPY --from=build /src/handlers-dist /opt/quern/handlers
COPY --from=build --chown=65532:65532 /data /var/lib/quern

# The customer's settings (seed 000, section 6) keep their names; quern's own
# are QUERN_*. docs/operating.md and docs/queue.md list every variable.
ENV PORT=3001 \
    QUERN_BIND=0.0.0.0 \
    QUERN_DATA_DIR=/var/lib/quern \
    QUERN_HANDLERS_DIR=/opt/quern/handlers \
    WORKER_CONCURRENCY=5 \
    WORKER_POLL_INTERVAL_MS=1000 \
    WORKER_MAX_RETRIES=3 \
    WORKER_RETRY_DELAY_MS=2000 \
    WORKER_STUCK_JOB_TIMEOUT_MS=300000 \
    ENABLE_CACHE=true \
    CACHE_TTL_HOURS=24 \
    LOG_LEVEL=info \
    QUERN_HANDLER_ENV=YOLO_URL,OLLAMA_URL,OLLAMA_MODEL,OLLAMA_VISION_MODEL,GEMINI_API_KEY,GEMINI_BASE_URL,GEMINI_MODEL,OPENAI_BASE_URL,OPENAI_API_KEY,OPENAI_MODEL,WHATSAPP_API_URL,WHATSAPP_TOKEN,WHATSAPP_PHONE_NUMBER_ID,WHATSAPP_TIMEOUT_MS,WHATSAPP_APP_SECRET,WHATSAPP_VERIFY_TOKEN
# Set at run time, never baked in:
#   DATABASE_URL          postgres://… (Supabase: the pooler's session URL); SQLite in the data dir without it
#   QUERN_JWT_SECRET      Supabase's JWT secret (or QUERN_JWKS_URL for asymmetric keys)
#   WORKER_ID             this worker's name (default: <hostname>-<pid>)
#   YOLO_URL, OLLAMA_URL, GEMINI_API_KEY, …   the variables QUERN_HANDLER_ENV above offers the shipped
#                         handlers (each reads those its manifest lists); QUERN_VAR_<NAME> offers another.
#                         WHATSAPP_APP_SECRET and WHATSAPP_VERIFY_TOKEN are read by the gateway to check
#                         Meta's webhook calls; no shipped manifest grants them to a handler

USER nonroot
WORKDIR /var/lib/quern
EXPOSE 3001
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["quern", "healthcheck"]
ENTRYPOINT ["quern"]
CMD ["serve"]
