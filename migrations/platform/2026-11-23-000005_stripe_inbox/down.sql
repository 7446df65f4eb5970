DROP TRIGGER jobs_queued ON public.jobs;
CREATE TRIGGER jobs_queued
    AFTER INSERT OR UPDATE OF status, run_at ON public.jobs
    FOR EACH ROW WHEN (NEW.status = 'queued') EXECUTE FUNCTION public.plinth_notify_job_queued();
DROP TABLE public.subscriptions;
DROP TABLE public.billing_customers;
DROP TABLE public.stripe_events;
