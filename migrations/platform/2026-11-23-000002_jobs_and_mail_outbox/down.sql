DROP TABLE public.mail_outbox;
DROP TRIGGER jobs_queued ON public.jobs;
DROP FUNCTION public.plinth_notify_job_queued();
DROP TABLE public.jobs;
