//! What a committed round publishes for the people watching the federation: `progress.png`
//! in the state directory (redrawn from the whole metrics log) and, with `serve --tensorboard`,
//! the round's scalars in a TensorBoard run. Neither may hold up or fail a round: errors are
//! warnings, and drawing runs off the async runtime.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use fedtalent_report::EventWriter;
use tracing::{info, warn};

use super::Coordinator;
use crate::curves::{self, Curves};
use crate::metrics::MetricsLine;
use crate::state::StateDir;

/// Size of `progress.png` (2 × 2 figures), as nnU-Net's.
const PROGRESS_SIZE: (u32, u32) = (1600, 1100);

#[derive(Default)]
pub(super) struct Publisher {
    tensorboard: Mutex<Option<EventWriter>>,
    /// Held while progress.png is redrawn: a redraw reads the log after its round's lines were
    /// appended, so the one that runs last draws the newest log.
    drawing: Arc<Mutex<()>>,
}

impl Coordinator {
    /// Writes each committed round's scalars as TensorBoard events into `dir`.
    pub fn log_curves_to(&self, dir: &Path) -> Result<()> {
        let writer = EventWriter::create(dir)?;
        info!("TensorBoard scalars go to {}", writer.path().display());
        *self.publisher.tensorboard.lock().unwrap_or_else(|p| p.into_inner()) = Some(writer);
        Ok(())
    }

    /// Publishes a committed round, whose metrics `lines` were just appended to the log.
    pub(super) fn publish_round(&self, lines: &[MetricsLine]) {
        if let Some(writer) = self.publisher.tensorboard.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            let written = curves::scalars(lines)
                .iter()
                .try_for_each(|(tag, step, value)| writer.add_scalar(tag, *value, *step))
                .and_then(|()| writer.flush());
            if let Err(e) = written {
                warn!("TensorBoard scalars not written: {e:#}");
            }
        }
        let (state, drawing) = (self.state.clone(), self.publisher.drawing.clone());
        let redraw = move || {
            let _one_at_a_time = drawing.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = write_progress_png(&state) {
                warn!("{} not redrawn: {e:#}", state.progress_path().display());
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(redraw)),
            Err(_) => redraw(),
        }
    }
}

/// Draws `progress.png` from the state directory's metrics log (atomically replaced).
pub fn write_progress_png(state: &StateDir) -> Result<()> {
    write_progress_png_to(&state.read_metrics()?, &state.progress_path())
}

/// Draws the progress figure of `metrics` into `path` (atomically replaced).
pub fn write_progress_png_to(metrics: &[MetricsLine], path: &Path) -> Result<()> {
    let png = fedtalent_report::plot::png(&Curves::new(metrics).figures(), 2, PROGRESS_SIZE)?;
    fedtalent_report::write_atomic(path, &png)
}
