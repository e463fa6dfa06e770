//! The metrics log `state/metrics.jsonl`: one JSON object per line, typed here once for the
//! writer (the round task) and the readers (`coordinator report`, `coordinator status`).
//!
//! The keys are a format other tools read (`scripts/`, researchers' notebooks): per site and
//! round `round, site, n_cases, weight, train_loss, bytes_up, durations_ms, payload_digest`;
//! per reported class `round, model_round, site, class, dice`; per round `round, kind =
//! "round", wall_ms, close_ms, sites` (and since issue 17 a site line's `upload_ms` and a
//! round line's `participation`).

use std::collections::BTreeMap;

use fedtalent_protocol::PhaseTimings;
use serde::{Deserialize, Serialize};

use crate::aggregate::Update;

/// One line of the metrics log. Untagged: the round summary carries `kind = "round"`, the other
/// two are told apart by their keys (a Dice line has `class`; a site line `n_cases`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MetricsLine {
    Round(RoundLine),
    Dice(DiceLine),
    Site(SiteLine),
}

/// A completed round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundLine {
    pub round: u32,
    pub kind: RoundKind,
    /// From opening the round to its commit.
    pub wall_ms: u64,
    /// Aggregation, metrics and the atomic checkpoint.
    pub close_ms: u64,
    /// Sites whose update counted.
    pub sites: usize,
    /// With `[plan.privacy]`: the account after this round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacySpent>,
    /// Who was expected and who was refused (absent in logs of older builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub participation: Option<Participation>,
}

/// Who took part in a round: the sites it waited for (those of `[federation].sites` not
/// removed) and every refusal while it was open. A site expected that neither reported nor
/// was refused was absent (late, stalled or offline).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Participation {
    pub expected: Vec<String>,
    pub refusals: Vec<RefusalNote>,
}

/// An update refused while a round was open, with the reason the site was told.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefusalNote {
    pub site: String,
    pub reason: String,
}

/// `[plan.privacy]`'s account after a round: (ε, δ) of the rounds so far, the noise added to
/// this round's backbone aggregate and the sites whose change was clipped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacySpent {
    pub epsilon: f64,
    pub delta: f64,
    pub noise_std: f64,
    pub clipped: Vec<String>,
}

/// The `kind` of a [`RoundLine`]: always `"round"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundKind {
    Round,
}

impl RoundLine {
    pub fn new(round: u32, wall_ms: u64, close_ms: u64, sites: usize) -> Self {
        RoundLine { round, kind: RoundKind::Round, wall_ms, close_ms, sites, privacy: None, participation: None }
    }

    pub fn with_privacy(self, privacy: Option<PrivacySpent>) -> Self {
        RoundLine { privacy, ..self }
    }

    pub fn with_participation(self, participation: Participation) -> Self {
        RoundLine { participation: Some(participation), ..self }
    }
}

/// One site's update that counted in a round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteLine {
    pub round: u32,
    pub site: String,
    pub n_cases: u32,
    /// Its backbone weight sqrt(n_k) / Σ sqrt(n_j).
    pub weight: f64,
    pub train_loss: f32,
    pub bytes_up: u64,
    pub durations_ms: PhaseTimings,
    pub payload_digest: String,
    /// Receiving the payload, measured at the coordinator (0 in logs of older builds).
    #[serde(default)]
    pub upload_ms: u64,
    /// The model streamed to the site in the round (0 in logs of older builds).
    #[serde(default)]
    pub bytes_down: u64,
}

/// A class's validation Dice, reported by its site at the start of `round`, of the global
/// model of `model_round` (= round - 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiceLine {
    pub round: u32,
    pub model_round: u32,
    pub site: String,
    pub class: String,
    pub dice: f32,
}

impl MetricsLine {
    /// The lines of a round's updates: one per site, then one per class it reported Dice of.
    /// `downloads`: bytes of the model streamed to each site during the round.
    pub fn of_updates(
        round: u32,
        updates: &[&Update],
        weights: &[f64],
        downloads: &BTreeMap<String, u64>,
    ) -> Vec<MetricsLine> {
        let mut lines = Vec::new();
        for (u, &weight) in updates.iter().zip(weights) {
            lines.push(MetricsLine::Site(SiteLine {
                round,
                site: u.site.clone(),
                n_cases: u.header.n_cases,
                weight,
                train_loss: u.header.train_loss,
                bytes_up: u.bytes,
                durations_ms: u.header.durations_ms,
                payload_digest: u.header.payload_digest.clone(),
                upload_ms: u.upload_ms,
                bytes_down: downloads.get(&u.site).copied().unwrap_or(0),
            }));
            for (class, dice) in &u.header.dice {
                // Dice is measured on the global model the round started from.
                let (site, class, model_round, dice) = (u.site.clone(), class.clone(), round - 1, *dice);
                lines.push(MetricsLine::Dice(DiceLine { round, model_round, site, class, dice }));
            }
        }
        lines
    }

    pub fn round(&self) -> u32 {
        match self {
            MetricsLine::Round(l) => l.round,
            MetricsLine::Dice(l) => l.round,
            MetricsLine::Site(l) => l.round,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The keys other tools read stay as they were, and each kind of line reads back as itself.
    #[test]
    fn lines_keep_their_keys_and_read_back_as_their_kind() {
        let site = MetricsLine::Site(SiteLine {
            round: 2,
            site: "a".into(),
            n_cases: 4,
            weight: 0.5,
            train_loss: 0.25,
            bytes_up: 10,
            durations_ms: PhaseTimings { download: 1, evaluate: 2, train: 3 },
            payload_digest: "d".into(),
            upload_ms: 7,
            bytes_down: 20,
        });
        let dice =
            MetricsLine::Dice(DiceLine { round: 2, model_round: 1, site: "a".into(), class: "a/x".into(), dice: 0.75 });
        let round = MetricsLine::Round(RoundLine::new(2, 100, 5, 1));
        assert_eq!(
            serde_json::to_value(&site).unwrap(),
            json!({"round": 2, "site": "a", "n_cases": 4, "weight": 0.5, "train_loss": 0.25, "bytes_up": 10,
                   "durations_ms": {"download": 1, "evaluate": 2, "train": 3}, "payload_digest": "d", "upload_ms": 7,
                   "bytes_down": 20})
        );
        assert_eq!(
            serde_json::to_value(&dice).unwrap(),
            json!({"round": 2, "model_round": 1, "site": "a", "class": "a/x", "dice": 0.75})
        );
        assert_eq!(
            serde_json::to_value(&round).unwrap(),
            json!({"round": 2, "kind": "round", "wall_ms": 100, "close_ms": 5, "sites": 1})
        );
        for line in [site, dice, round] {
            let text = serde_json::to_string(&line).unwrap();
            assert_eq!(serde_json::from_str::<MetricsLine>(&text).unwrap(), line, "{text}");
        }
    }

    /// A site line of an older build (its durations named freely) still reads.
    #[test]
    fn older_site_lines_still_read() {
        let old = json!({"round": 1, "site": "a", "n_cases": 4, "weight": 1.0, "train_loss": 0.5, "bytes_up": 0,
                         "durations_ms": {"train": 9000, "upload": 5}, "payload_digest": ""});
        let MetricsLine::Site(line) = serde_json::from_value(old).unwrap() else { panic!("not a site line") };
        assert_eq!(line.durations_ms, PhaseTimings { download: 0, evaluate: 0, train: 9000 });
    }
}
