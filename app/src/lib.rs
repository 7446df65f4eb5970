//! Plinth's binary crate as a library: configuration, zero-configuration
//! PostgreSQL, telemetry and metrics, the HTTP application, the CLI and the example
//! product domain (projects and tasks).

pub mod api;
pub mod background;
pub mod backup;
pub mod cli;
pub mod config;
pub mod exports;
pub mod health;
pub mod metrics;
pub mod pg;
pub mod projects;
pub mod routes;
pub mod startup;
pub mod telemetry;
