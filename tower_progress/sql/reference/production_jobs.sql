-- Reference shape of the production system's job table. tower-progress never creates this
-- table in a configured database: it is applied only to the embedded database (so
-- `./start.sh --simulate` has something to watch), the simulator's producer and the tests.
CREATE TABLE IF NOT EXISTS public.production_jobs (
    id             bigserial PRIMARY KEY,
    title          text,
    status         text        NOT NULL DEFAULT 'pending',
    comfyui_job_id text,
    total_frames   integer,
    workflow       jsonb,
    error          text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS production_jobs_comfyui_job_id_idx ON public.production_jobs (comfyui_job_id);
