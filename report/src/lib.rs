//! What researchers and operators look at: figures drawn as PNG or inline SVG, TensorBoard
//! event files and mask previews. The data behind them (metrics logs, predictions) stays in
//! the crates that own it; this crate only draws and writes.

pub mod fonts;
pub mod plot;
pub mod preview;
pub mod tensorboard;

pub use plot::{Figure, LineChart, Marker, Series, StackedBars, StatusGrid};
pub use plotters::style::RGBColor;
pub use tensorboard::EventWriter;

/// Writes `bytes` to `path` atomically (a reader never sees half a figure).
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    fedtalent_atomic::write(path, bytes, 0o644).with_context(|| format!("writing {}", path.display()))
}
