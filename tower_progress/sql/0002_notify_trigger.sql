-- NOTIFY trigger function for the production jobs table. The daemon attaches it at start-up:
--   CREATE TRIGGER tower_progress_notify AFTER INSERT OR UPDATE OR DELETE ON <jobs table>
--   FOR EACH ROW EXECUTE FUNCTION tower_progress.notify_job_change('<id column>');
-- The payload is {"id": <id as text>, "op": TG_OP, "schema": ..., "table": ...}; listeners
-- reload the row by id. It must never break the producer's write, so any error inside is
-- turned into a warning.
CREATE OR REPLACE FUNCTION tower_progress.notify_job_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    row_id text;
BEGIN
    BEGIN
        IF TG_OP = 'DELETE' THEN
            row_id := to_jsonb(OLD) ->> TG_ARGV[0];
        ELSE
            row_id := to_jsonb(NEW) ->> TG_ARGV[0];
        END IF;
        IF row_id IS NOT NULL AND octet_length(row_id) <= 1000 THEN
            PERFORM pg_notify('tower_progress', json_build_object(
                'id', row_id, 'op', TG_OP,
                'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME)::text);
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'tower_progress.notify_job_change on %.%: %',
            TG_TABLE_SCHEMA, TG_TABLE_NAME, SQLERRM;
    END;
    RETURN NULL;
END
$$;
