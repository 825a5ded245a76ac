-- Inspection records, reviews and retained images (SQLite).
CREATE TABLE inspections (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT    NOT NULL UNIQUE,
    created_ms      INTEGER NOT NULL,
    scope           TEXT    NOT NULL,
    factory         TEXT,
    line            TEXT,
    part_id         TEXT,
    capture_id      TEXT,
    idempotency_key TEXT,
    model           TEXT    NOT NULL,
    model_version   TEXT    NOT NULL,
    plugins         TEXT    NOT NULL,
    verdict         TEXT    NOT NULL,
    label           TEXT    NOT NULL,
    score           REAL    NOT NULL,
    anomaly_score   REAL,
    defects         TEXT    NOT NULL,
    timings         TEXT    NOT NULL,
    image_sha256    TEXT,
    heatmap_sha256  TEXT,
    storage_warning TEXT,
    response        TEXT    NOT NULL,
    review_verdict  TEXT,
    reviewed_by     TEXT,
    reviewed_ms     INTEGER
);
CREATE UNIQUE INDEX inspections_idempotency ON inspections (scope, idempotency_key);
CREATE INDEX inspections_created ON inspections (created_ms);
CREATE INDEX inspections_factory_line ON inspections (factory, line, seq);
CREATE INDEX inspections_verdict ON inspections (verdict, seq);

CREATE TABLE reviews (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    inspection_id TEXT    NOT NULL REFERENCES inspections (id),
    verdict       TEXT    NOT NULL,
    reviewer      TEXT    NOT NULL,
    note          TEXT,
    created_ms    INTEGER NOT NULL
);
CREATE INDEX reviews_inspection ON reviews (inspection_id, seq);

CREATE TABLE images (
    sha256       TEXT    PRIMARY KEY,
    bytes        INTEGER NOT NULL,
    content_type TEXT    NOT NULL,
    created_ms   INTEGER NOT NULL,
    last_used_ms INTEGER NOT NULL
);
CREATE INDEX images_last_used ON images (last_used_ms);
