//! The fedtalent coordinator: federation PKI operator, round runner, aggregator and exporter.

pub mod aggregate;
pub mod config;
pub mod curves;
pub mod metrics;
pub mod pki;
pub mod report;
pub mod server;
pub mod simulate;
pub mod state;

pub use config::FederationConfig;
pub use server::Coordinator;
