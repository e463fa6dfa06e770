//! What a site's operator sees of local training: the progress bar (loss, step rate, ETA) of
//! each round, hidden with `--quiet` for service managers, and with `--tensorboard DIR` the
//! local curves as TensorBoard scalars: the loss of every step (`loss/step`, at the global
//! step), each round's mean loss (`loss/round`) and the Dice of the global model on the
//! site's validation cases (`dice/<class>`, at the round of the model evaluated).

use std::path::Path;

use anyhow::Result;
use fedtalent_report::EventWriter;
use indicatif::{ProgressBar, ProgressStyle};
use tracing::{info, warn};

#[derive(Default)]
pub struct LocalCurves {
    quiet: bool,
    events: Option<EventWriter>,
}

impl LocalCurves {
    pub fn new(quiet: bool, tensorboard: Option<&Path>) -> Result<Self> {
        let events = tensorboard.map(EventWriter::create).transpose()?;
        if let Some(events) = &events {
            info!("TensorBoard scalars go to {}", events.path().display());
        }
        Ok(LocalCurves { quiet, events })
    }

    /// A round's bar of `steps` steps (hidden when quiet).
    pub fn progress_bar(&self, steps: u64, round: u32) -> ProgressBar {
        if self.quiet {
            return ProgressBar::hidden();
        }
        let style = ProgressStyle::with_template(
            "round {msg} [{bar:30}] {pos}/{len} steps, loss {prefix}, {per_sec} (ETA {eta})",
        )
        .expect("a valid template");
        let bar = ProgressBar::new(steps).with_style(style.progress_chars("=> "));
        bar.set_message(round.to_string());
        bar
    }

    /// The loss of global step `step`.
    pub fn step(&mut self, step: u64, loss: f64) {
        self.add("loss/step", loss, step as i64);
    }

    /// A finished round: its mean loss, and the Dice measured on the model of `round - 1`.
    pub fn round(&mut self, round: u32, loss: f32, dice: &[(String, f32)]) {
        self.add("loss/round", loss as f64, round as i64);
        for (class, d) in dice {
            self.add(&format!("dice/{class}"), *d as f64, round as i64 - 1);
        }
        self.flush();
    }

    pub fn flush(&mut self) {
        if let Some(events) = &mut self.events {
            if let Err(e) = events.flush() {
                warn!("TensorBoard scalars not written: {e:#}");
            }
        }
    }

    /// Adds a scalar; a write error is a warning and stops the curves, never the training.
    fn add(&mut self, tag: &str, value: f64, step: i64) {
        if let Some(events) = &mut self.events {
            if let Err(e) = events.add_scalar(tag, value, step) {
                warn!("TensorBoard scalars stop here: {e:#}");
                self.events = None;
            }
        }
    }
}
