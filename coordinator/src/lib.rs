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

/// Tests that draw from libtorch's global RNG (networks built from a seed and compared) hold
/// this, so that tests on other threads do not draw between the seed and the draws.
#[cfg(test)]
pub(crate) fn torch_rng() -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
