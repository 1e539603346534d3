-- Handler versions uploaded through the API, and each type's rollout: which
-- version serves, which one is on canary and for what share of jobs, and
-- whether the type is paused. Workers and gateways load this at start and
-- again on every NOTIFY quern_handlers.
CREATE TABLE quern_handler_versions (
    type        TEXT NOT NULL,
    version     TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    component   BYTEA NOT NULL,
    manifest    TEXT NOT NULL,
    size_bytes  BIGINT NOT NULL,
    uploaded_by TEXT NOT NULL,
    uploaded_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (type, version)
);

CREATE TABLE quern_handler_rollouts (
    type             TEXT PRIMARY KEY,
    active_version   TEXT,
    previous_version TEXT,
    canary_version   TEXT,
    canary_percent   SMALLINT NOT NULL DEFAULT 0 CHECK (canary_percent BETWEEN 0 AND 99),
    paused           BOOLEAN NOT NULL DEFAULT FALSE,
    updated_at       TIMESTAMPTZ NOT NULL
);
