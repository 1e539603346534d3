-- Handler versions uploaded through the API, and each type's rollout (see
-- migrations/postgres); timestamps in microseconds since the Unix epoch.
CREATE TABLE quern_handler_versions (
    type        TEXT NOT NULL,
    version     TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    component   BLOB NOT NULL,
    manifest    TEXT NOT NULL,
    size_bytes  INTEGER NOT NULL,
    uploaded_by TEXT NOT NULL,
    uploaded_at INTEGER NOT NULL,
    PRIMARY KEY (type, version)
);

CREATE TABLE quern_handler_rollouts (
    type             TEXT PRIMARY KEY,
    active_version   TEXT,
    previous_version TEXT,
    canary_version   TEXT,
    canary_percent   INTEGER NOT NULL DEFAULT 0 CHECK (canary_percent BETWEEN 0 AND 99),
    paused           INTEGER NOT NULL DEFAULT 0,
    updated_at       INTEGER NOT NULL
);
