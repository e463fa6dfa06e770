//! A federation's curves from its metrics log: the figures of `progress.png` and the HTML
//! report (nnU-Net's progress plot, federated), and the scalars of its TensorBoard run.

use std::collections::{BTreeMap, BTreeSet};

use fedtalent_report::plot::colour;
use fedtalent_report::{Figure, LineChart, Marker, Series, StackedBars, StatusGrid};

use crate::metrics::{DiceLine, MetricsLine, RoundLine, SiteLine};

/// The phases a round's wall time is split into, in the order they are stacked.
pub const PHASES: [&str; 6] = ["download", "training", "evaluation", "upload", "aggregation", "waiting"];

/// The metrics log sorted by kind, with one colour per site.
pub struct Curves<'a> {
    sites: Vec<String>,
    site_lines: Vec<&'a SiteLine>,
    dice: Vec<&'a DiceLine>,
    rounds: Vec<&'a RoundLine>,
}

impl<'a> Curves<'a> {
    pub fn new(metrics: &'a [MetricsLine]) -> Self {
        let (mut site_lines, mut dice, mut rounds) = (Vec::new(), Vec::new(), Vec::new());
        let mut sites = BTreeSet::new();
        for line in metrics {
            match line {
                MetricsLine::Site(l) => {
                    sites.insert(l.site.clone());
                    site_lines.push(l);
                }
                MetricsLine::Dice(l) => {
                    sites.insert(l.site.clone());
                    dice.push(l);
                }
                MetricsLine::Round(l) => {
                    if let Some(p) = &l.participation {
                        sites.extend(p.expected.iter().cloned());
                        sites.extend(p.refusals.iter().map(|r| r.site.clone()));
                    }
                    rounds.push(l);
                }
            }
        }
        Curves { sites: sites.into_iter().collect(), site_lines, dice, rounds }
    }

    /// Every site the log names, in the order of their colours.
    pub fn sites(&self) -> &[String] {
        &self.sites
    }

    fn site_colour(&self, site: &str) -> usize {
        self.sites.iter().position(|s| s == site).unwrap_or(0)
    }

    /// The four figures: training loss, Dice per class, round time, participation.
    pub fn figures(&self) -> Vec<Figure> {
        vec![self.loss(), self.dice(), self.round_time(), self.participation()]
    }

    fn loss(&self) -> Figure {
        let series = self
            .sites
            .iter()
            .map(|site| Series {
                label: site.clone(),
                colour: self.site_colour(site),
                marker: Marker::Circle,
                points: self
                    .site_lines
                    .iter()
                    .filter(|l| &l.site == site)
                    .map(|l| (l.round as f64, l.train_loss as f64))
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        Figure::Lines(LineChart {
            title: "Training loss per site".into(),
            x_label: "round".into(),
            y_label: "mean local loss (BCE − soft Dice)".into(),
            series,
            y_range: None,
        })
    }

    /// One line per class, coloured by the site that owns (and evaluates) it, each of a site's
    /// classes with its own marker; x is the round of the model evaluated.
    fn dice(&self) -> Figure {
        let mut by_class: BTreeMap<(&str, &str), Vec<(f64, f64)>> = BTreeMap::new();
        for l in &self.dice {
            by_class.entry((&l.site, &l.class)).or_default().push((l.model_round as f64, l.dice as f64));
        }
        let mut nth_of_site: BTreeMap<&str, usize> = BTreeMap::new();
        let series = by_class
            .into_iter()
            .map(|((site, class), points)| {
                let nth = nth_of_site.entry(site).or_default();
                let marker = Marker::ALL[*nth % Marker::ALL.len()];
                *nth += 1;
                Series { label: class.to_string(), colour: self.site_colour(site), marker, points }
            })
            .collect();
        Figure::Lines(LineChart {
            title: "Validation Dice of the global model".into(),
            x_label: "round of the model".into(),
            y_label: "Dice".into(),
            series,
            y_range: Some((0.0, 1.0)),
        })
    }

    fn round_time(&self) -> Figure {
        let bars = self.rounds.iter().map(|r| (r.round as f64, self.phases_s(r).to_vec())).collect();
        Figure::Stacked(StackedBars {
            title: "Round wall time (slowest site)".into(),
            x_label: "round".into(),
            y_label: "seconds".into(),
            categories: PHASES.iter().map(|p| p.to_string()).collect(),
            bars,
        })
    }

    /// A round's wall time in [`PHASES`] (seconds): the phases of the site whose training was
    /// slowest (the round waited for it), the coordinator's aggregation, and the rest.
    pub fn phases_s(&self, round: &RoundLine) -> [f64; 6] {
        let slowest = self.site_lines.iter().filter(|s| s.round == round.round).max_by_key(|s| s.durations_ms.train);
        let (download, train, evaluate, upload) = slowest.map_or((0, 0, 0, 0), |s| {
            (s.durations_ms.download, s.durations_ms.train, s.durations_ms.evaluate, s.upload_ms)
        });
        let accounted =
            [download, train, evaluate, upload, round.close_ms].iter().fold(0u64, |a, &b| a.saturating_add(b));
        let waiting = round.wall_ms.saturating_sub(accounted);
        [download, train, evaluate, upload, round.close_ms, waiting].map(|ms| ms as f64 / 1e3)
    }

    fn participation(&self) -> Figure {
        let states = vec![
            ("reported".to_string(), colour(2)),
            ("refused".to_string(), colour(3)),
            ("absent".to_string(), plotters_grey()),
        ];
        let cells = self.sites.iter().map(|site| self.rounds.iter().map(|r| self.status(site, r)).collect()).collect();
        Figure::Grid(StatusGrid {
            title: "Participation".into(),
            x_label: "round".into(),
            rows: self.sites.clone(),
            columns: self.rounds.iter().map(|r| r.round as f64).collect(),
            states,
            cells,
        })
    }

    /// 0 reported, 1 refused (and not reported after), 2 expected but absent; none when the
    /// site was not part of the round (or the log predates participation records).
    pub fn status(&self, site: &str, round: &RoundLine) -> Option<usize> {
        if self.site_lines.iter().any(|l| l.round == round.round && l.site == site) {
            return Some(0);
        }
        let p = round.participation.as_ref()?;
        if p.refusals.iter().any(|r| r.site == site) {
            Some(1)
        } else if p.expected.iter().any(|s| s == site) {
            Some(2)
        } else {
            None
        }
    }

    /// The latest Dice of each class (site, class, model round, Dice), in class order.
    pub fn last_dice(&self) -> Vec<&'a DiceLine> {
        let mut last: BTreeMap<&str, &DiceLine> = BTreeMap::new();
        for l in &self.dice {
            match last.get(l.class.as_str()) {
                Some(prev) if prev.model_round > l.model_round => {}
                _ => {
                    last.insert(&l.class, l);
                }
            }
        }
        last.into_values().collect()
    }

    pub fn rounds(&self) -> &[&'a RoundLine] {
        &self.rounds
    }

    pub fn site_lines(&self) -> &[&'a SiteLine] {
        &self.site_lines
    }
}

fn plotters_grey() -> fedtalent_report::RGBColor {
    fedtalent_report::RGBColor(190, 190, 190)
}

/// A TensorBoard scalar: tag, step, value.
pub type Scalar = (String, i64, f64);

/// The TensorBoard scalars of metrics lines (a round's, as they are committed): per site its
/// loss and bytes at the round, per class its Dice at the round of the model evaluated, per
/// round its phases, participation and ε.
pub fn scalars(lines: &[MetricsLine]) -> Vec<Scalar> {
    let curves = Curves::new(lines);
    let mut out = Vec::new();
    for l in &curves.site_lines {
        let step = l.round as i64;
        out.push((format!("loss/{}", l.site), step, l.train_loss as f64));
        out.push((format!("bytes_up/{}", l.site), step, l.bytes_up as f64));
        out.push((format!("bytes_down/{}", l.site), step, l.bytes_down as f64));
    }
    for l in &curves.dice {
        out.push((format!("dice/{}", l.class), l.model_round as i64, l.dice as f64));
    }
    for r in &curves.rounds {
        let step = r.round as i64;
        for (phase, seconds) in PHASES.iter().zip(curves.phases_s(r)) {
            out.push((format!("round_time/{phase}_s"), step, seconds));
        }
        out.push(("round_time/wall_s".to_string(), step, r.wall_ms as f64 / 1e3));
        out.push(("participation/reported".to_string(), step, r.sites as f64));
        if let Some(p) = &r.participation {
            out.push(("participation/refused".to_string(), step, p.refusals.len() as f64));
        }
        if let Some(privacy) = &r.privacy {
            out.push(("privacy/epsilon".to_string(), step, privacy.epsilon));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Participation, RefusalNote};
    use fedtalent_protocol::PhaseTimings;

    fn site(round: u32, site: &str, loss: f32, train: u64) -> MetricsLine {
        MetricsLine::Site(SiteLine {
            round,
            site: site.into(),
            n_cases: 4,
            weight: 0.5,
            train_loss: loss,
            bytes_up: 100,
            durations_ms: PhaseTimings { download: 10, evaluate: 20, train },
            payload_digest: String::new(),
            upload_ms: 30,
            bytes_down: 200,
        })
    }

    fn dice(round: u32, site: &str, class: &str, dice: f32) -> MetricsLine {
        MetricsLine::Dice(DiceLine { round, model_round: round - 1, site: site.into(), class: class.into(), dice })
    }

    fn fixture() -> Vec<MetricsLine> {
        let participation = Participation {
            expected: vec!["a".into(), "b".into(), "c".into()],
            refusals: vec![RefusalNote { site: "b".into(), reason: "NaN in backbone".into() }],
        };
        vec![
            site(1, "a", 0.9, 1000),
            MetricsLine::Round(RoundLine::new(1, 2000, 50, 1).with_participation(participation)),
            site(2, "a", 0.7, 900),
            dice(2, "a", "a/liver", 0.5),
            site(2, "b", 0.8, 1200),
            dice(2, "b", "b/spleen", 0.25),
            MetricsLine::Round(RoundLine::new(2, 1500, 40, 2)),
        ]
    }

    #[test]
    fn the_phases_add_up_to_the_wall_time() {
        let log = fixture();
        let curves = Curves::new(&log);
        let phases = curves.phases_s(curves.rounds()[1]);
        // Site b trained longest: its download, training, evaluation and upload.
        assert_eq!(phases, [0.01, 1.2, 0.02, 0.03, 0.04, 0.2]);
        assert!((phases.iter().sum::<f64>() - 1.5).abs() < 1e-9);
    }

    #[test]
    fn participation_tells_reported_refused_and_absent() {
        let log = fixture();
        let curves = Curves::new(&log);
        assert_eq!(curves.sites(), ["a", "b", "c"]);
        let first = curves.rounds()[0];
        assert_eq!(curves.status("a", first), Some(0));
        assert_eq!(curves.status("b", first), Some(1));
        assert_eq!(curves.status("c", first), Some(2));
        // Round 2 predates (or lacks) a participation record: only who reported is known.
        assert_eq!(curves.status("c", curves.rounds()[1]), None);
    }

    #[test]
    fn scalars_hold_every_number_at_its_step() {
        let s = scalars(&fixture());
        let find = |tag: &str, step: i64| s.iter().find(|(t, st, _)| t == tag && *st == step).map(|x| x.2);
        assert_eq!(find("loss/a", 2), Some(0.7f32 as f64));
        assert_eq!(find("dice/b/spleen", 1), Some(0.25));
        assert_eq!(find("participation/refused", 1), Some(1.0));
        assert_eq!(find("round_time/wall_s", 2), Some(1.5));
        assert_eq!(find("bytes_down/b", 2), Some(200.0));
    }

    #[test]
    fn the_figures_draw() {
        let log = fixture();
        let png = fedtalent_report::plot::png(&Curves::new(&log).figures(), 2, (1200, 900)).unwrap();
        assert!(png.len() > 1000);
        assert_eq!(Curves::new(&[]).figures().len(), 4);
        fedtalent_report::plot::png(&Curves::new(&[]).figures(), 2, (600, 400)).unwrap();
    }
}
