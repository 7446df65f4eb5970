DROP TRIGGER jobs_queued ON public.jobs;
CREATE TRIGGER jobs_queued
    AFTER INSERT OR UPDATE OF status, run_at ON public.jobs
    FOR EACH ROW WHEN (NEW.status = 'queued' AND NEW.kind <> 'billing.event')
    EXECUTE FUNCTION public.plinth_notify_job_queued();
ALTER TABLE public.jobs DROP COLUMN wake;
