//! The HTML report and the progress figure of a recorded metrics log (a 40-round, three-site
//! simulated federation with `[plan.privacy]`, written by an earlier build: no participation,
//! upload time or download bytes), with a line cut as a crash mid-append leaves it (the
//! restarted coordinator wrote the line again after it).

use std::collections::BTreeMap;
use std::path::PathBuf;

use fedtalent_coordinator::curves::{scalars, Curves};
use fedtalent_coordinator::report::{format_dice, html, SVG_DATA_URI};
use fedtalent_coordinator::state::MetricsLog;

fn fixture() -> (String, MetricsLog) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics-3-sites-40-rounds.jsonl");
    let text = std::fs::read_to_string(path).unwrap();
    let log = MetricsLog::parse(&text);
    (text, log)
}

#[test]
fn a_recorded_log_reports_its_own_numbers() {
    let (text, log) = fixture();
    assert_eq!(log.skipped.len(), 1, "the cut line is skipped");
    assert_eq!(log.skipped[0].number, 102);
    let page = html("fixture", "rounds = 40", &log).unwrap();
    assert_eq!(page.matches(&format!("src=\"{SVG_DATA_URI}")).count(), 4, "one figure per plot");
    assert!(page.contains("line 102 skipped"));

    // The Dice table: each class's Dice of the newest model evaluated, read from the raw lines.
    let mut last: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    for line in text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
        if let (Some(class), Some(dice)) = (line["class"].as_str(), line["dice"].as_f64()) {
            let model = line["model_round"].as_u64().unwrap();
            if last.get(class).is_none_or(|(m, _)| model >= *m) {
                last.insert(class.to_string(), (model, dice));
            }
        }
    }
    assert_eq!(last.len(), 8);
    for (class, (model, dice)) in &last {
        let row = page.split("<tr>").find(|r| r.starts_with(&format!("<td class=\"name\">{class}</td>"))).unwrap();
        assert!(row.contains(&format!("<td>{model}</td>")), "{class}: model {model} not in {row}");
        assert!(row.contains(&format!("<td>{}</td>", format_dice(*dice as f32))), "{class}: {dice} not in {row}");
    }
    // The bytes table has a row per completed round, the round-time table a line per round.
    let bytes = page.split("<table id=\"bytes\">").nth(1).unwrap().split("</table>").next().unwrap();
    assert_eq!(bytes.matches("<tr>").count(), 41, "a header and 40 rounds");
    assert!(page.contains("1.11 MB"), "liver's upload size");
    // ε of the last round, as the accountant logged it.
    assert!(page.contains("2311.778"));
}

#[test]
fn a_recorded_log_draws_and_its_scalars_cover_every_line() {
    let (_, log) = fixture();
    let curves = Curves::new(&log.lines);
    assert_eq!(curves.sites(), ["liver", "multiorgan", "pancreas"]);
    let png = fedtalent_report::plot::png(&curves.figures(), 2, (1600, 1100)).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let s = scalars(&log.lines);
    let count = |prefix: &str| s.iter().filter(|(t, _, _)| t.starts_with(prefix)).count();
    // 40 rounds × 3 sites (the cut line is the start of a line written again after it).
    assert_eq!(count("loss/"), 120);
    assert_eq!(count("round_time/wall_s"), 40);
    assert_eq!(count("privacy/epsilon"), 40);
}
