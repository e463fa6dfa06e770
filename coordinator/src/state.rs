//! The coordinator's disk state: the federation setup, round checkpoints and the metrics log.
//!
//! A checkpoint is a directory `rounds/round-NNNNNN/` with `model.safetensors` and `round.json`,
//! built under a temporary name and renamed into place once complete and synced, so a reader
//! only ever sees complete rounds. A restart resumes from the highest complete round.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fedtalent_model::MultiTalentNet;
use fedtalent_vocab::{ClassRegion, CtNormalization, GlobalClass, InputChannels};

use crate::aggregate::ServerState;
use crate::metrics::MetricsLine;
use serde::{Deserialize, Serialize};
use tracing::warn;

const SETUP_FILE: &str = "federation.json";
const ROUNDS_DIR: &str = "rounds";
/// See [`StateDir::progress_path`].
const PROGRESS_FILE: &str = "progress.png";
const METRICS_FILE: &str = "metrics.jsonl";
pub const CHECKPOINT_MODEL: &str = "model.safetensors";
pub const CHECKPOINT_RECORD: &str = "round.json";
/// FedAvgM's velocity (only with `[plan.server].momentum` > 0).
pub const CHECKPOINT_SERVER: &str = "server_momentum.safetensors";

/// What registration fixed for the whole federation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    pub classes: Vec<GlobalClass>,
    pub normalization: CtNormalization,
    /// Training cases per site at registration.
    pub site_cases: Vec<(String, u32)>,
    /// The input channels every site registered with (`[plan].input_channels`). Absent in
    /// set-ups from before channels were declared: one CT channel.
    #[serde(default)]
    pub channels: InputChannels,
    /// Sites whose classes are mutually exclusive, trained as one softmax: the exported model
    /// predicts their classes by argmax ([`fedtalent_model::ModelManifest::exclusive_sites`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclusive_sites: Vec<String>,
}

impl Setup {
    /// A federation no site has joined yet (sites join by [`Setup::with_site`]).
    pub fn empty(normalization: CtNormalization, channels: InputChannels) -> Setup {
        Setup { classes: Vec::new(), normalization, site_cases: Vec::new(), channels, exclusive_sites: Vec::new() }
    }

    /// The training cases `site` registered with when it joined the federation.
    pub fn cases_of(&self, site: &str) -> Option<u32> {
        self.site_cases.iter().find(|(s, _)| s == site).map(|&(_, n)| n)
    }

    /// The sites of the federation in the order they joined: the order of the class list and
    /// of the per-site decoders. Not the config's order: a site listed later, or one removed
    /// from the config, must not move the others' decoders.
    pub fn sites(&self) -> Vec<String> {
        self.site_cases.iter().map(|(s, _)| s.clone()).collect()
    }

    /// The sites whose decoders the global model holds, at their positions: every site with
    /// `[plan].per_site_decoders`, else none.
    pub fn decoder_sites(&self, per_site_decoders: bool) -> Vec<String> {
        if per_site_decoders {
            self.sites()
        } else {
            Vec::new()
        }
    }

    /// The setup grown by a site that joins after it was fixed: its classes appended to the
    /// class list (the indices of every earlier class stay), its cases recorded. The CT
    /// normalization stays: every trained layer depends on it.
    pub fn with_site(&self, site: &str, classes: &[ClassRegion], n_train: u32, exclusive: bool) -> Setup {
        let mut grown = self.clone();
        if exclusive {
            grown.exclusive_sites.push(site.to_string());
        }
        for region in classes {
            grown.classes.push(GlobalClass::new(grown.classes.len() as u32, site, region));
        }
        grown.site_cases.push((site.to_string(), n_train));
        grown
    }

    /// The setup as it was when the federation had only `classes`, a prefix of this setup's
    /// class list (a checkpoint written before later sites joined); `None` if they are not a
    /// prefix made of whole sites.
    pub fn before(&self, classes: &[GlobalClass]) -> Option<Setup> {
        if !self.classes.starts_with(classes) {
            return None;
        }
        let sites: Vec<&str> = self.site_cases.iter().map(|(s, _)| s.as_str()).collect();
        let members = sites.iter().take_while(|s| classes.iter().any(|c| c.site == **s)).count();
        let member = |site: &String| sites[..members].contains(&site.as_str());
        let earlier = Setup {
            classes: classes.to_vec(),
            site_cases: self.site_cases[..members].to_vec(),
            exclusive_sites: self.exclusive_sites.iter().filter(|s| member(s)).cloned().collect(),
            ..self.clone()
        };
        let whole = earlier.classes.len()
            == self.classes.iter().filter(|c| sites[..members].contains(&c.site.as_str())).count();
        whole.then_some(earlier)
    }
}

/// One site's share of a completed round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    pub site: String,
    pub n_cases: u32,
    /// Its backbone weight sqrt(n_k) / Σ sqrt(n_j) over the reporting sites.
    pub weight: f64,
    pub train_loss: f32,
    pub payload_digest: String,
    /// Its backbone's L2 distance to the round's global backbone: how far the site moved (a site
    /// far from the others drifts or diverges). Absent in checkpoints written before it was kept.
    #[serde(default)]
    pub backbone_norm: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u32,
    /// Digest of the aggregated global model.
    pub digest: String,
    pub contributions: Vec<Contribution>,
    pub classes: Vec<GlobalClass>,
    pub unix_time: u64,
}

#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn open(root: &Path) -> Result<Self> {
        fs::create_dir_all(root.join(ROUNDS_DIR)).with_context(|| format!("creating state dir {}", root.display()))?;
        Ok(Self { root: root.to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn read_setup(&self) -> Result<Option<Setup>> {
        let path = self.root.join(SETUP_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?))
    }

    pub fn write_setup(&self, setup: &Setup) -> Result<()> {
        fedtalent_model::io::write_bytes_atomic(
            &self.root.join(SETUP_FILE),
            serde_json::to_string_pretty(setup)?.as_bytes(),
        )
    }

    fn round_dir(&self, round: u32) -> PathBuf {
        self.root.join(ROUNDS_DIR).join(format!("round-{round:06}"))
    }

    /// Writes round `record.round` atomically, then prunes all but the newest `keep` rounds.
    pub fn write_checkpoint(
        &self,
        net: &MultiTalentNet,
        server: &ServerState,
        record: &RoundRecord,
        keep: usize,
    ) -> Result<PathBuf> {
        let final_dir = self.round_dir(record.round);
        let tmp = self.root.join(ROUNDS_DIR).join(format!(".tmp-round-{:06}", record.round));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        net.save(&tmp.join(CHECKPOINT_MODEL))?;
        if !server.velocity.is_empty() {
            fedtalent_model::io::write_tensors_atomic(&tmp.join(CHECKPOINT_SERVER), &server.velocity)?;
        }
        fedtalent_model::io::write_bytes_atomic(
            &tmp.join(CHECKPOINT_RECORD),
            serde_json::to_string_pretty(record)?.as_bytes(),
        )?;
        if final_dir.exists() {
            fs::remove_dir_all(&final_dir).with_context(|| format!("replacing {}", final_dir.display()))?;
        }
        fs::rename(&tmp, &final_dir).with_context(|| format!("renaming {} into place", tmp.display()))?;
        fs::File::open(self.root.join(ROUNDS_DIR)).and_then(|d| d.sync_all()).context("syncing the rounds dir")?;
        self.prune(keep)?;
        Ok(final_dir)
    }

    /// Complete rounds on disk, oldest first (temporary directories are ignored).
    pub fn rounds(&self) -> Result<Vec<u32>> {
        let mut rounds = Vec::new();
        for entry in fs::read_dir(self.root.join(ROUNDS_DIR))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_prefix("round-").and_then(|n| n.parse::<u32>().ok()) {
                rounds.push(n);
            }
        }
        rounds.sort_unstable();
        Ok(rounds)
    }

    fn prune(&self, keep: usize) -> Result<()> {
        let rounds = self.rounds()?;
        for &old in rounds.iter().take(rounds.len().saturating_sub(keep)) {
            fs::remove_dir_all(self.round_dir(old)).with_context(|| format!("pruning round {old}"))?;
        }
        Ok(())
    }

    /// The newest complete round that can be read: its record and model file. A checkpoint
    /// whose record does not parse (a NaN loss that an older build wrote as `null`, a damaged
    /// file) or whose model file is missing is skipped with a warning, so that a restart
    /// resumes from the round before it instead of failing. Fails closed when rounds exist but
    /// none can be read: starting afresh would overwrite them.
    pub fn latest(&self) -> Result<Option<(RoundRecord, PathBuf)>> {
        let rounds = self.rounds()?;
        let mut unreadable = Vec::new();
        for &round in rounds.iter().rev() {
            match self.read_round(round) {
                Ok(found) => return Ok(Some(found)),
                Err(e) => {
                    tracing::warn!(round, "skipping an unreadable checkpoint: {e:#}");
                    unreadable.push(format!("{e:#}"));
                }
            }
        }
        anyhow::ensure!(
            rounds.is_empty(),
            "no checkpoint in {} can be read: {}",
            self.root.display(),
            unreadable.join("; ")
        );
        Ok(None)
    }

    fn read_round(&self, round: u32) -> Result<(RoundRecord, PathBuf)> {
        let dir = self.round_dir(round);
        let path = dir.join(CHECKPOINT_RECORD);
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let record: RoundRecord = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        anyhow::ensure!(record.round == round, "{}: records round {}", path.display(), record.round);
        let model = dir.join(CHECKPOINT_MODEL);
        anyhow::ensure!(model.is_file(), "{} is missing", model.display());
        Ok((record, model))
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.root.join(METRICS_FILE)
    }

    /// nnU-Net's progress plot of the federation, redrawn after every round.
    pub fn progress_path(&self) -> PathBuf {
        self.root.join(PROGRESS_FILE)
    }

    /// Appends JSON lines to the metrics log and syncs them.
    pub fn append_metrics(&self, lines: &[MetricsLine]) -> Result<()> {
        let path = self.metrics_path();
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut buf = String::new();
        for line in lines {
            buf.push_str(&serde_json::to_string(line)?);
            buf.push('\n');
        }
        f.write_all(buf.as_bytes())
            .and_then(|()| f.sync_data())
            .with_context(|| format!("appending to {}", path.display()))
    }

    /// The metrics log's lines; a line that does not read is skipped with a warning naming it.
    pub fn read_metrics(&self) -> Result<Vec<MetricsLine>> {
        let log = self.read_metrics_log()?;
        for skipped in &log.skipped {
            warn!("{}: {skipped}", self.metrics_path().display());
        }
        Ok(log.lines)
    }

    /// The metrics log's lines and those skipped: a line cut by a crash mid-append, edited by
    /// hand or of a kind this build does not know is no reason to lose the rest.
    pub fn read_metrics_log(&self) -> Result<MetricsLog> {
        let path = self.metrics_path();
        if !path.exists() {
            return Ok(MetricsLog::default());
        }
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(MetricsLog::parse(&String::from_utf8_lossy(&bytes)))
    }
}

/// The readable lines of a metrics log and what was skipped.
#[derive(Debug, Default)]
pub struct MetricsLog {
    pub lines: Vec<MetricsLine>,
    pub skipped: Vec<SkippedLine>,
}

/// A line of the metrics log that does not read: its number (from 1) and why.
#[derive(Clone, Debug, PartialEq)]
pub struct SkippedLine {
    pub number: usize,
    pub reason: String,
}

impl std::fmt::Display for SkippedLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {} skipped: {}", self.number, self.reason)
    }
}

impl MetricsLog {
    pub fn parse(text: &str) -> MetricsLog {
        let mut log = MetricsLog::default();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            match serde_json::from_str(line) {
                Ok(parsed) => log.lines.push(parsed),
                Err(e) => log.skipped.push(SkippedLine { number: i + 1, reason: e.to_string() }),
            }
        }
        log
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(round: u32) -> RoundRecord {
        let contribution = Contribution {
            site: "a".into(),
            n_cases: 4,
            weight: 1.0,
            train_loss: 0.5,
            payload_digest: "d".into(),
            backbone_norm: 0.25,
        };
        RoundRecord {
            round,
            digest: format!("g{round}"),
            contributions: vec![contribution],
            classes: Vec::new(),
            unix_time: 0,
        }
    }

    /// A checkpoint as `write_checkpoint` leaves it (the model file's content is not read here).
    fn write_round(state: &StateDir, record: &RoundRecord) -> PathBuf {
        let dir = state.round_dir(record.round);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(CHECKPOINT_MODEL), b"weights").unwrap();
        fs::write(dir.join(CHECKPOINT_RECORD), serde_json::to_string_pretty(record).unwrap()).unwrap();
        dir
    }

    /// Issue 21 item 9: a newest checkpoint that cannot be parsed (here, a NaN loss serde_json
    /// wrote as null) makes a restart fall back to the round before it; with none readable,
    /// opening fails instead of starting afresh.
    #[test]
    fn an_unreadable_newest_checkpoint_falls_back_to_the_previous_round() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert!(state.latest().unwrap().is_none());
        write_round(&state, &record(1));
        let mut nan = record(2);
        nan.contributions[0].train_loss = f32::NAN;
        let newest = write_round(&state, &nan);
        let text = fs::read_to_string(newest.join(CHECKPOINT_RECORD)).unwrap();
        assert!(text.contains("null"), "serde_json writes NaN as null: {text}");
        let (found, model) = state.latest().unwrap().expect("a readable round");
        assert_eq!(found, record(1));
        assert_eq!(model, state.round_dir(1).join(CHECKPOINT_MODEL));
        // A round whose model file is missing is skipped too.
        write_round(&state, &record(3));
        fs::remove_file(state.round_dir(3).join(CHECKPOINT_MODEL)).unwrap();
        assert_eq!(state.latest().unwrap().unwrap().0.round, 1);
        fs::write(state.round_dir(1).join(CHECKPOINT_RECORD), "{").unwrap();
        let err = format!("{:#}", state.latest().unwrap_err());
        assert!(err.contains("no checkpoint") && err.contains("round-000001"), "{err}");
    }
}
