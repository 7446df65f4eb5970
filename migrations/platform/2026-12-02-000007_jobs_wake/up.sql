-- Whether queueing a job wakes the workers is the enqueuer's choice, made
-- through the jobs crate (`NewJob::wake`), not a job kind named in a
-- trigger. The billing inbox queues with wake = false and wakes the workers
-- itself, debounced (plinth_jobs::wake_soon).
ALTER TABLE public.jobs ADD COLUMN wake boolean NOT NULL DEFAULT true;
UPDATE public.jobs SET wake = false WHERE kind = 'billing.event';
DROP TRIGGER jobs_queued ON public.jobs;
CREATE TRIGGER jobs_queued
    AFTER INSERT OR UPDATE OF status, run_at ON public.jobs
    FOR EACH ROW WHEN (NEW.status = 'queued' AND NEW.wake)
    EXECUTE FUNCTION public.plinth_notify_job_queued();
