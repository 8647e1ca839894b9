-- A highlight on a court with a camera becomes a clip (agent/media/pipeline.py). clip_state:
--   none      no camera on the court: the marker alone is synced (highlight.created), the cloud cuts it
--   pending   waiting for press + 20 s and the segment that covers it, then cut
--   ready     cut (clip_path, clip_sha256...), waiting for upload
--   uploaded  the cloud has it, hash checked; the local file stays until the storage budget needs room
--   missed    no footage (camera down, ring lost in a restart) or the cut kept failing: the cloud is told
--   failed    the cloud refused the clip for good (clip_error says why)
--   evicted   deleted by the storage budget before it was uploaded (with a warning; the cloud is told)
ALTER TABLE highlights ADD COLUMN clip_path TEXT;
ALTER TABLE highlights ADD COLUMN clip_sha256 TEXT;
ALTER TABLE highlights ADD COLUMN clip_bytes INTEGER;
ALTER TABLE highlights ADD COLUMN clip_start_at INTEGER;      -- wall ms of the clip's first frame
ALTER TABLE highlights ADD COLUMN trim_start_s REAL;          -- wanted start minus actual start (see media/clips.py)
ALTER TABLE highlights ADD COLUMN clip_duration_ms INTEGER;   -- as ffprobe measured it
ALTER TABLE highlights ADD COLUMN clip_ready_at INTEGER;
ALTER TABLE highlights ADD COLUMN upload_url TEXT;            -- the tus upload: a restarted agent resumes it
ALTER TABLE highlights ADD COLUMN uploaded_at INTEGER;
ALTER TABLE highlights ADD COLUMN clip_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE highlights ADD COLUMN clip_error TEXT;
CREATE INDEX highlights_clip_work ON highlights (clip_state, pressed_at) WHERE clip_state IN ('pending', 'ready');
CREATE INDEX highlights_clip_files ON highlights (uploaded_at) WHERE clip_path IS NOT NULL;
