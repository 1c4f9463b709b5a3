-- The daemon's own schema: progress samples, stage durations (ETA priors), finished jobs.
-- Nothing here references the production table.
CREATE SCHEMA IF NOT EXISTS tower_progress;

CREATE TABLE tower_progress.progress_samples (
    job_id  text        NOT NULL,
    t       timestamptz NOT NULL,
    percent real,
    stage   text,
    step    integer,
    PRIMARY KEY (job_id, t)
);
-- Pruning by age.
CREATE INDEX progress_samples_t_idx ON tower_progress.progress_samples (t);

CREATE TABLE tower_progress.stage_durations (
    fingerprint text        NOT NULL,
    job_id      text        NOT NULL,
    stage       text        NOT NULL,
    seconds     real        NOT NULL,
    finished_at timestamptz NOT NULL,
    PRIMARY KEY (job_id, stage)
);
-- Priors: newest runs per fingerprint.
CREATE INDEX stage_durations_fingerprint_idx
    ON tower_progress.stage_durations (fingerprint, finished_at DESC);
CREATE INDEX stage_durations_finished_at_idx ON tower_progress.stage_durations (finished_at);

CREATE TABLE tower_progress.finished_jobs (
    job_id      text        PRIMARY KEY,
    title       text,
    state       text        NOT NULL,
    started_at  timestamptz,
    finished_at timestamptz NOT NULL,
    duration_s  real,
    instance    text,
    prompt_id   text,
    error       jsonb,
    job         jsonb       NOT NULL
);
-- Keyset pagination (newest first) and pruning by age.
CREATE INDEX finished_jobs_finished_at_idx
    ON tower_progress.finished_jobs (finished_at DESC, job_id DESC);
