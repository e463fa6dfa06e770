//! `coordinator report`: where each round's wall time went (DESIGN.md §2.1), from the metrics log.
//!
//! A round's overhead is everything that is not local training: model download, the sites'
//! federated evaluation, upload, validation, aggregation and the checkpoint. The training part is
//! the slowest reporting site's local training, since the round waits for it.

use std::fmt::Write as _;

use crate::metrics::MetricsLine;

/// One round's breakdown.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundBreakdown {
    pub round: u64,
    pub wall_ms: u64,
    /// The slowest reporting site's local training.
    pub train_ms: u64,
    /// That site's federated evaluation of the global model (part of the overhead).
    pub evaluate_ms: u64,
    /// Aggregation and the atomic checkpoint at the coordinator.
    pub close_ms: u64,
    /// With `[plan.privacy]`: ε after this round.
    pub epsilon: Option<f64>,
}

impl RoundBreakdown {
    pub fn overhead_fraction(&self) -> f64 {
        (self.wall_ms.saturating_sub(self.train_ms)) as f64 / self.wall_ms.max(1) as f64
    }

    /// The overhead without the sites' evaluation (which a federation may run rarely).
    pub fn overhead_fraction_without_evaluation(&self) -> f64 {
        // Saturating: the durations come from the sites (capped since issue 21, but older
        // metrics logs may hold anything).
        (self.wall_ms.saturating_sub(self.train_ms.saturating_add(self.evaluate_ms))) as f64
            / self.wall_ms.max(1) as f64
    }
}

/// Breakdowns of every completed round found in the metrics lines.
pub fn breakdowns(metrics: &[MetricsLine]) -> Vec<RoundBreakdown> {
    let mut out = Vec::new();
    for summary in metrics.iter().filter_map(|m| match m {
        MetricsLine::Round(r) => Some(r),
        _ => None,
    }) {
        let slowest = metrics
            .iter()
            .filter_map(|m| match m {
                MetricsLine::Site(s) if s.round == summary.round => Some(s.durations_ms),
                _ => None,
            })
            .max_by_key(|d| d.train)
            .unwrap_or_default();
        out.push(RoundBreakdown {
            round: summary.round as u64,
            wall_ms: summary.wall_ms,
            train_ms: slowest.train,
            evaluate_ms: slowest.evaluate,
            close_ms: summary.close_ms,
            epsilon: summary.privacy.as_ref().map(|p| p.epsilon),
        });
    }
    out
}

pub fn format_table(rows: &[RoundBreakdown]) -> String {
    let mut s = String::new();
    let private = rows.iter().any(|r| r.epsilon.is_some());
    let _ = writeln!(
        s,
        "{:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>13}{}",
        "round",
        "wall s",
        "train s",
        "eval s",
        "close s",
        "overhead",
        "w/o eval",
        if private { format!(" {:>10}", "epsilon") } else { String::new() }
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:>5} {:>9.2} {:>9.2} {:>9.2} {:>9.3} {:>8.1}% {:>12.1}%{}",
            r.round,
            r.wall_ms as f64 / 1e3,
            r.train_ms as f64 / 1e3,
            r.evaluate_ms as f64 / 1e3,
            r.close_ms as f64 / 1e3,
            100.0 * r.overhead_fraction(),
            100.0 * r.overhead_fraction_without_evaluation(),
            r.epsilon.map_or(String::new(), |e| format!(" {e:>10.3}"))
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Metrics lines as `StateDir::read_metrics` reads them from the log.
    fn lines(values: Vec<serde_json::Value>) -> Vec<MetricsLine> {
        values.into_iter().map(|v| serde_json::from_value(v).expect("a metrics line")).collect()
    }

    /// A site line of `round` with these phase durations.
    fn site(round: u32, site: &str, durations: serde_json::Value) -> serde_json::Value {
        json!({"round": round, "site": site, "n_cases": 4, "weight": 0.5, "train_loss": 0.1, "bytes_up": 0,
               "durations_ms": durations, "payload_digest": ""})
    }

    #[test]
    fn overhead_is_wall_time_minus_the_slowest_sites_training() {
        let metrics = vec![
            site(1, "a", json!({"download": 100, "evaluate": 300, "train": 9000})),
            site(1, "b", json!({"download": 50, "evaluate": 200, "train": 9500})),
            json!({"round": 1, "kind": "round", "wall_ms": 10_000, "close_ms": 40, "sites": 2}),
            json!({"round": 2, "model_round": 1, "site": "a", "dice": 0.5, "class": "a/x"}),
        ];
        let rows = breakdowns(&lines(metrics));
        assert_eq!(
            rows,
            vec![RoundBreakdown {
                round: 1,
                wall_ms: 10_000,
                train_ms: 9500,
                evaluate_ms: 200,
                close_ms: 40,
                epsilon: None
            }]
        );
        assert!((rows[0].overhead_fraction() - 0.05).abs() < 1e-12);
        assert!((rows[0].overhead_fraction_without_evaluation() - 0.03).abs() < 1e-12);
        assert!(format_table(&rows).contains("5.0%"));
    }

    /// Issue 21 item 15: absurd durations in a metrics log do not overflow the report.
    #[test]
    fn absurd_durations_do_not_overflow_the_report() {
        let metrics = vec![
            site(1, "a", json!({"evaluate": u64::MAX, "train": u64::MAX})),
            json!({"round": 1, "kind": "round", "wall_ms": 10_000, "close_ms": u64::MAX, "sites": 1}),
        ];
        let rows = breakdowns(&lines(metrics));
        assert_eq!(rows[0].overhead_fraction_without_evaluation(), 0.0);
        assert!(format_table(&rows).contains("0.0%"));
    }
}
