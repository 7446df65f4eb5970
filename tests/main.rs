//! Plinth's integration tests: one binary, real PostgreSQL, real HTTP server.
//! Every test gets its own database (see `harness`).

mod harness;
mod processes;

mod access;
mod api_keys;
mod audit;
mod backup;
mod billing;
mod billing_life;
mod billing_stripe;
mod console;
mod console_browser;
mod contract;
mod deploy;
mod http_basics;
mod idempotency;
mod identity;
mod impersonation;
mod isolation;
mod lanes;
mod lifecycle;
mod load_balancer;
mod mail_and_jobs;
mod members;
mod metrics;
mod migrations;
mod personal_data;
mod pg_restart;
mod policy;
mod postgres_tls;
mod projects;
mod provisioning;
mod replicas;
mod routing;
mod secrets;
mod security;
mod self_service;
mod shards;
mod shared_limits;
mod smtp;
mod stripe;
mod token_flood;
mod traces;
mod world;
