-- Traces: the W3C `traceparent` of the span that queued a job (when traces
-- are exported), so that the job's span continues that trace.
ALTER TABLE public.jobs ADD COLUMN traceparent text;
