//! `coordinator report`: where each round's wall time went (DESIGN.md §2.1), from the metrics
//! log, as a text table, or with `--html` as one self-contained page of figures and tables.
//!
//! A round's overhead is everything that is not local training: model download, the sites'
//! federated evaluation, upload, validation, aggregation and the checkpoint. The training part is
//! the slowest reporting site's local training, since the round waits for it.

use std::fmt::Write as _;

use anyhow::Result;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use crate::curves::Curves;
use crate::metrics::MetricsLine;
use crate::state::MetricsLog;

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

/// How the report's figures are embedded.
pub const SVG_DATA_URI: &str = "data:image/svg+xml;base64,";

/// Pixels of each figure of the HTML report.
const FIGURE_SIZE: (u32, u32) = (760, 420);

/// The HTML report: one page with no external resource (figures as SVG data URIs): the plan, the
/// four progress figures, the last Dice per class, round times, bytes moved per round and
/// site, the refusals with their reasons, and the metrics lines that were skipped.
pub fn html(title: &str, plan_toml: &str, log: &MetricsLog) -> Result<String> {
    let curves = Curves::new(&log.lines);
    let mut page = String::new();
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        escape(title),
        escape(title)
    );
    if !log.skipped.is_empty() {
        page.push_str("<section class=\"warning\"><h2>Skipped metrics lines</h2><ul>");
        for s in &log.skipped {
            let _ = write!(page, "<li>{}</li>", escape(&s.to_string()));
        }
        page.push_str("</ul></section>\n");
    }
    page.push_str("<section><h2>Progress</h2><div class=\"figures\">\n");
    for figure in curves.figures() {
        // An SVG image as a data URI: as crisp as inline SVG, and shown alike by browsers, mail
        // clients and HTML-to-PDF converters (some of which ignore inline <svg>).
        let svg = fedtalent_report::plot::svg(&figure, FIGURE_SIZE)?;
        let _ = writeln!(
            page,
            "<figure><img alt=\"{title}\" width=\"{}\" height=\"{}\" src=\"{SVG_DATA_URI}{}\"></figure>",
            FIGURE_SIZE.0,
            FIGURE_SIZE.1,
            BASE64.encode(svg),
            title = escape(figure.title())
        );
    }
    page.push_str("</div></section>\n");
    dice_table(&mut page, &curves);
    time_table(&mut page, &log.lines);
    bytes_table(&mut page, &curves);
    refusals_table(&mut page, &curves);
    let _ = write!(page, "<section><h2>Plan</h2><pre>{}</pre></section>\n</body></html>\n", escape(plan_toml));
    Ok(page)
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}h1{font-size:1.5em}\
h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}\
.figures{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;break-inside:avoid}figure img{max-width:100%;height:auto}table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}\
th{background:#f3f3f3;text-align:left}td.name{text-align:left}pre{background:#f7f7f7;padding:.8em;overflow:auto}\
.warning{background:#fff4e5;padding:.2em 1em;border-left:4px solid #f0a020}";

fn dice_table(page: &mut String, curves: &Curves) {
    let last = curves.last_dice();
    page.push_str("<section><h2>Dice per class, last evaluation</h2>");
    if last.is_empty() {
        page.push_str("<p>No site has evaluated the global model yet.</p></section>\n");
        return;
    }
    page.push_str("<table id=\"dice\"><tr><th>class</th><th>site</th><th>model of round</th><th>Dice</th></tr>");
    for l in last {
        let _ = write!(
            page,
            "<tr><td class=\"name\">{}</td><td class=\"name\">{}</td><td>{}</td><td>{}</td></tr>",
            escape(&l.class),
            escape(&l.site),
            l.model_round,
            format_dice(l.dice)
        );
    }
    page.push_str("</table></section>\n");
}

/// A Dice as the tables show it (NaN: the class is absent from the site's validation cases).
pub fn format_dice(dice: f32) -> String {
    if dice.is_finite() {
        format!("{dice:.4}")
    } else {
        "n/a".to_string()
    }
}

fn time_table(page: &mut String, metrics: &[MetricsLine]) {
    page.push_str("<section><h2>Round time</h2><pre>");
    page.push_str(&escape(&format_table(&breakdowns(metrics))));
    page.push_str("</pre></section>\n");
}

fn bytes_table(page: &mut String, curves: &Curves) {
    page.push_str("<section><h2>Bytes moved per round and site (model down / update up)</h2>");
    page.push_str("<table id=\"bytes\"><tr><th>round</th>");
    for site in curves.sites() {
        let _ = write!(page, "<th>{}</th>", escape(site));
    }
    page.push_str("</tr>");
    for round in curves.rounds() {
        let _ = write!(page, "<tr><td>{}</td>", round.round);
        for site in curves.sites() {
            match curves.site_lines().iter().find(|l| l.round == round.round && &l.site == site) {
                Some(l) => {
                    let _ = write!(page, "<td>{} / {}</td>", format_bytes(l.bytes_down), format_bytes(l.bytes_up));
                }
                None => page.push_str("<td>–</td>"),
            }
        }
        page.push_str("</tr>");
    }
    page.push_str("</table></section>\n");
}

fn refusals_table(page: &mut String, curves: &Curves) {
    let refusals: Vec<_> = curves
        .rounds()
        .iter()
        .flat_map(|r| r.participation.iter().flat_map(move |p| p.refusals.iter().map(move |f| (r.round, f))))
        .collect();
    page.push_str("<section><h2>Refusals</h2>");
    if refusals.is_empty() {
        page.push_str("<p>No update was refused.</p></section>\n");
        return;
    }
    page.push_str("<table id=\"refusals\"><tr><th>round</th><th>site</th><th>reason</th></tr>");
    for (round, f) in refusals {
        let _ = write!(
            page,
            "<tr><td>{round}</td><td class=\"name\">{}</td><td class=\"name\">{}</td></tr>",
            escape(&f.site),
            escape(&f.reason)
        );
    }
    page.push_str("</table></section>\n");
}

fn format_bytes(b: u64) -> String {
    match b {
        0..1_000 => format!("{b} B"),
        1_000..1_000_000 => format!("{:.1} kB", b as f64 / 1e3),
        _ => format!("{:.2} MB", b as f64 / 1e6),
    }
}

/// Text as HTML (names and reasons come from sites: nothing of theirs becomes markup).
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
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

    /// The page of a fixed log: one figure per plot, the Dice table's numbers the log's, a
    /// site's markup escaped, a skipped line named.
    #[test]
    fn the_html_report_holds_the_figures_and_the_logs_numbers() {
        let text = [
            site(1, "a", json!({"download": 1, "evaluate": 2, "train": 3})).to_string(),
            json!({"round": 1, "kind": "round", "wall_ms": 100, "close_ms": 4, "sites": 1,
                   "participation": {"expected": ["a", "b"], "refusals": [{"site": "b", "reason": "NaN <script>"}]}})
            .to_string(),
            "{\"round\": 2, \"site\": \"a\", \"n_ca".to_string(),
            json!({"round": 2, "model_round": 1, "site": "a", "dice": 0.61234, "class": "a/x"}).to_string(),
        ]
        .join("\n");
        let log = MetricsLog::parse(&text);
        assert_eq!(log.skipped.len(), 1);
        assert_eq!(log.skipped[0].number, 3);
        let page = html("fed", "rounds = 2", &log).unwrap();
        assert_eq!(page.matches(SVG_DATA_URI).count(), 4);
        let first = page.split(SVG_DATA_URI).nth(1).unwrap().split('"').next().unwrap();
        let svg = String::from_utf8(BASE64.decode(first).unwrap()).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("Training loss per site"), "{svg}");
        assert!(page.contains("<td>0.6123</td>"), "the Dice of the log, as formatted");
        assert!(page.contains("NaN &lt;script&gt;") && !page.contains("<script>"));
        assert!(page.contains("line 3 skipped"));
        assert!(page.contains("rounds = 2"));
        // Self-contained: nothing is loaded from elsewhere.
        assert_eq!(page.matches("src=").count(), page.matches(&format!("src=\"{SVG_DATA_URI}")).count());
        assert!(!page.contains("<link") && !page.contains("@import"));
    }
}
