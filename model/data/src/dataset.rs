//! Site dataset configuration and nnU-Net v2 / MSD (nnU-Net v1) folder readers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use fedtalent_vocab::{ClassRegion, InputChannels};
use serde::{Deserialize, Serialize};

use crate::case_image::{channel_file, read_case_image};
use crate::nifti_io::read_label_nifti;
use crate::resample::LabelInterp;

/// How many cases are held out for validation: a count, or a fraction of the cases.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ValCases {
    Count(usize),
    Fraction(f64),
}

impl Default for ValCases {
    fn default() -> Self {
        ValCases::Fraction(0.2)
    }
}

fn default_target_spacing() -> [f64; 3] {
    SiteDataConfig::DEFAULT_TARGET_SPACING
}

/// The `[data]` section of a site's TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteDataConfig {
    pub dataset_dir: PathBuf,
    pub classes: Vec<ClassRegion>,
    #[serde(default)]
    pub val_cases: ValCases,
    pub cache_dir: PathBuf,
    /// Target spacing [z, y, x] mm (DESIGN.md §1.4).
    #[serde(default = "default_target_spacing")]
    pub target_spacing: [f64; 3],
    #[serde(default)]
    pub label_interp: LabelInterp,
    /// The federation's input channels (its `[plan].input_channels`, as its operator announces
    /// them): a dataset whose dataset.json declares others is refused before joining, naming the
    /// channel. Absent: the coordinator's check at registration is the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_channels: Option<InputChannels>,
}

/// Which folder convention a dataset follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    NnUNetV2,
    /// Medical Segmentation Decathlon / nnU-Net v1 (`training: [{image, label}]`).
    Msd,
}

/// One training case: an image and its label map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Case {
    pub id: String,
    /// The image file, or channel 0's file (`<case>_0000`) of a case stored one file per channel
    /// ([`crate::case_image`]).
    pub image: PathBuf,
    pub label: PathBuf,
}

/// An opened dataset folder.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub config: SiteDataConfig,
    pub layout: Layout,
    /// Label values declared in dataset.json, by value.
    pub declared_labels: BTreeMap<u32, String>,
    /// Input channels declared in dataset.json (`channel_names` / `modality`), in order.
    pub channels: InputChannels,
    /// All cases, sorted by id.
    pub cases: Vec<Case>,
}

impl SiteDataConfig {
    /// `target_spacing` when a config names none (MultiTalent's, DESIGN.md §1.4).
    pub const DEFAULT_TARGET_SPACING: [f64; 3] = [1.5, 1.0, 1.0];

    /// Configuration problems that need no file access.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.classes.is_empty() {
            out.push("config [data].classes: no classes configured".to_string());
        }
        let mut names = BTreeSet::new();
        for c in &self.classes {
            if !names.insert(c.name.as_str()) {
                out.push(format!("config [data].classes: duplicate class name {:?}", c.name));
            }
            if c.labels.is_empty() {
                out.push(format!("config [data].classes: class {:?} has no label values", c.name));
            }
            if c.labels.contains(&0) {
                out.push(format!("config [data].classes: class {:?} contains label 0 (background)", c.name));
            }
            if let Some(l) = c.labels.iter().find(|&&l| l > u16::MAX as u32) {
                out.push(format!("config [data].classes: class {:?} label {l} exceeds 65535", c.name));
            }
        }
        match self.val_cases {
            ValCases::Fraction(f) if !(0.0..1.0).contains(&f) => {
                out.push(format!("config [data].val_cases: fraction {f} is not in [0, 1)"))
            }
            _ => {}
        }
        if self.target_spacing.iter().any(|&s| !(s > 0.0 && s.is_finite())) {
            out.push(format!("config [data].target_spacing: {:?} must be positive", self.target_spacing));
        }
        out
    }

    /// Label values that any class uses.
    pub fn class_label_set(&self) -> BTreeSet<u16> {
        self.classes.iter().flat_map(|c| c.labels.iter().map(|&l| l as u16)).collect()
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// Label values of dataset.json: v2 maps name -> value (or a list, for region-based datasets),
/// MSD maps "value" -> name.
fn parse_labels(json: &serde_json::Value, layout: Layout, path: &Path) -> Result<BTreeMap<u32, String>> {
    let obj = json
        .get("labels")
        .and_then(|l| l.as_object())
        .with_context(|| format!("{}: missing \"labels\" object", path.display()))?;
    let mut out = BTreeMap::new();
    for (k, v) in obj {
        match layout {
            Layout::NnUNetV2 => {
                let values: Vec<u64> = match v {
                    serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64()).collect(),
                    other => other.as_u64().into_iter().collect(),
                };
                if values.is_empty() {
                    bail!("{}: label {k:?} has no integer value", path.display());
                }
                for value in values {
                    out.insert(value as u32, k.clone());
                }
            }
            Layout::Msd => {
                let value: u32 =
                    k.parse().with_context(|| format!("{}: label key {k:?} is not an integer", path.display()))?;
                out.insert(value, v.as_str().unwrap_or_default().to_string());
            }
        }
    }
    Ok(out)
}

/// The input channels of dataset.json: `channel_names` (v2) or `modality` (MSD), an object from
/// "0", "1", ... to each channel's name; absent, one CT channel (what datasets meant before
/// channels were declared).
fn parse_channels(json: &serde_json::Value, layout: Layout, path: &Path) -> Result<InputChannels> {
    let key = match layout {
        Layout::NnUNetV2 => "channel_names",
        Layout::Msd => "modality",
    };
    let Some(value) = json.get(key) else {
        return Ok(InputChannels::ct());
    };
    let obj = value.as_object().with_context(|| format!("{}: {key:?} is not an object", path.display()))?;
    let mut names = Vec::with_capacity(obj.len());
    for k in 0..obj.len() {
        let name = obj
            .get(&k.to_string())
            .with_context(|| format!("{}: {key:?} has {} entries but no channel \"{k}\"", path.display(), obj.len()))?;
        let name =
            name.as_str().with_context(|| format!("{}: {key:?} channel \"{k}\" is not a string", path.display()))?;
        names.push(name.to_string());
    }
    let channels = InputChannels::named(names);
    if let Some(problem) = channels.problems().first() {
        bail!("{}: {key:?}: {problem}", path.display());
    }
    Ok(channels)
}

fn v2_cases(dir: &Path, json: &serde_json::Value) -> Result<Vec<Case>> {
    let ending = json.get("file_ending").and_then(|e| e.as_str()).unwrap_or(".nii.gz").to_string();
    let labels_dir = dir.join("labelsTr");
    let entries = std::fs::read_dir(&labels_dir).with_context(|| format!("{}: cannot list", labels_dir.display()))?;
    let mut cases = Vec::new();
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().to_string();
        let Some(id) = name.strip_suffix(&ending) else {
            continue;
        };
        cases.push(Case {
            id: id.to_string(),
            image: dir.join("imagesTr").join(format!("{id}_0000{ending}")),
            label: labels_dir.join(&name),
        });
    }
    Ok(cases)
}

fn msd_cases(dir: &Path, json: &serde_json::Value, json_path: &Path) -> Result<Vec<Case>> {
    let training = json
        .get("training")
        .and_then(|t| t.as_array())
        .with_context(|| format!("{}: missing \"training\" list", json_path.display()))?;
    let mut cases = Vec::new();
    for (i, entry) in training.iter().enumerate() {
        let field = |k: &str| {
            entry
                .get(k)
                .and_then(|v| v.as_str())
                .with_context(|| format!("{}: training[{i}] has no {k:?}", json_path.display()))
        };
        let image = dir.join(field("image")?.trim_start_matches("./"));
        let label = dir.join(field("label")?.trim_start_matches("./"));
        let id = label
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".gz").trim_end_matches(".nii").to_string())
            .unwrap_or_default();
        // nnU-Net v1 raw folders keep MSD's dataset.json but store images as <case>_0000.nii.gz.
        let image = existing_image(image);
        cases.push(Case { id, image, label });
    }
    Ok(cases)
}

/// The file an MSD entry's image is stored in: as named, else nnU-Net v1's `<case>_0000` of the
/// same name, else an Analyze-style `.hdr`/`.img` pair of that stem; the name as given (reported
/// missing by `check`) when none exists.
fn existing_image(image: PathBuf) -> PathBuf {
    if image.exists() {
        return image;
    }
    let v1 = v1_channel_path(&image);
    let pairs =
        [".hdr", ".hdr.gz", ".img", ".img.gz"].into_iter().flat_map(|e| [&image, &v1].map(|p| with_ending(p, e)));
    std::iter::once(v1.clone()).chain(pairs).find(|p| p.exists()).unwrap_or(image)
}

/// `path` with its `.nii`/`.nii.gz` ending replaced by `ending`.
fn with_ending(path: &Path, ending: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let stem = name.strip_suffix(".nii.gz").or_else(|| name.strip_suffix(".nii")).unwrap_or(&name);
    path.with_file_name(format!("{stem}{ending}"))
}

fn v1_channel_path(image: &Path) -> PathBuf {
    let name = image.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let (stem, ext) = match name.strip_suffix(".nii.gz") {
        Some(s) => (s.to_string(), ".nii.gz"),
        None => (name.trim_end_matches(".nii").to_string(), ".nii"),
    };
    image.with_file_name(format!("{stem}_0000{ext}"))
}

impl Dataset {
    /// Opens a dataset folder, detecting the layout from dataset.json. Fails on a broken layout
    /// or config; per-case content problems surface in [`check`] and preprocessing.
    pub fn open(config: &SiteDataConfig) -> Result<Dataset> {
        let problems = config.problems();
        if !problems.is_empty() {
            bail!("{}", problems.join("; "));
        }
        let dir = &config.dataset_dir;
        let json_path = dir.join("dataset.json");
        let json = read_json(&json_path)?;
        let layout = if json.get("channel_names").is_some() || json.get("file_ending").is_some() {
            Layout::NnUNetV2
        } else if json.get("training").is_some() || json.get("modality").is_some() {
            Layout::Msd
        } else {
            bail!("{}: neither nnU-Net v2 (channel_names) nor MSD/v1 (modality, training)", json_path.display());
        };
        let declared_labels = parse_labels(&json, layout, &json_path)?;
        let channels = parse_channels(&json, layout, &json_path)?;
        if let Some(declared) = &config.input_channels {
            channels
                .check_against(declared)
                .with_context(|| format!("{}: not the channels of [data].input_channels", json_path.display()))?;
        }
        let mut cases = match layout {
            Layout::NnUNetV2 => v2_cases(dir, &json)?,
            Layout::Msd => msd_cases(dir, &json, &json_path)?,
        };
        cases.sort_by(|a, b| a.id.cmp(&b.id));
        if cases.is_empty() {
            bail!("{}: no training cases found", dir.display());
        }
        Ok(Dataset { config: config.clone(), layout, declared_labels, channels, cases })
    }

    /// Number of validation cases for this dataset (at least one training case is always kept).
    pub fn val_count(&self) -> usize {
        let n = self.cases.len();
        let k = match self.config.val_cases {
            ValCases::Count(k) => k,
            ValCases::Fraction(f) => (f * n as f64).round() as usize,
        };
        k.min(n.saturating_sub(1))
    }

    /// Cases ordered by a hash of their id: the first `val_count` are validation. Hashing makes
    /// the split deterministic and independent of how many cases are added later.
    fn hashed_order(&self) -> Vec<&Case> {
        let mut v: Vec<&Case> = self.cases.iter().collect();
        v.sort_by_key(|c| ring::digest::digest(&ring::digest::SHA256, c.id.as_bytes()).as_ref().to_vec());
        v
    }

    pub fn val_cases(&self) -> Vec<Case> {
        let mut v: Vec<Case> = self.hashed_order().into_iter().take(self.val_count()).cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn train_cases(&self) -> Vec<Case> {
        let mut v: Vec<Case> = self.hashed_order().into_iter().skip(self.val_count()).cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

/// One problem found by [`check`], naming the file (or the config) it concerns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    pub file: Option<PathBuf>,
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(p) => write!(f, "{}: {}", p.display(), self.what),
            None => write!(f, "{}", self.what),
        }
    }
}

/// Per-class totals over the valid cases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassSummary {
    pub name: String,
    pub labels: Vec<u32>,
    pub voxels: u64,
    pub cases_present: usize,
}

/// Everything `site-agent check` reports about a site's data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CheckReport {
    pub dataset_dir: PathBuf,
    pub layout: Option<Layout>,
    /// The input channels dataset.json declares.
    pub channels: Option<InputChannels>,
    pub cases: usize,
    pub valid_cases: usize,
    pub train_cases: usize,
    pub val_cases: usize,
    /// Per axis [z, y, x]: (min, median, max) spacing in mm over valid cases.
    pub spacing_range: Option<[(f64, f64, f64); 3]>,
    pub classes: Vec<ClassSummary>,
    pub problems: Vec<Problem>,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "dataset: {} ({:?})", self.dataset_dir.display(), self.layout)?;
        if let Some(channels) = &self.channels {
            writeln!(f, "input channels: {channels}")?;
        }
        writeln!(
            f,
            "cases: {} ({} valid; {} train, {} validation)",
            self.cases, self.valid_cases, self.train_cases, self.val_cases
        )?;
        if let Some(r) = &self.spacing_range {
            for (axis, (lo, med, hi)) in ["z", "y", "x"].iter().zip(r) {
                writeln!(f, "spacing {axis}: min {lo:.3} median {med:.3} max {hi:.3} mm")?;
            }
        }
        for c in &self.classes {
            writeln!(
                f,
                "class {:<20} labels {:?}: {} voxels in {} cases",
                c.name, c.labels, c.voxels, c.cases_present
            )?;
        }
        if self.problems.is_empty() {
            writeln!(f, "no problems found")
        } else {
            writeln!(f, "{} problem(s):", self.problems.len())?;
            for p in &self.problems {
                writeln!(f, "  {p}")?;
            }
            Ok(())
        }
    }
}

/// Label-value counts of one valid case.
struct CaseFindings {
    spacing: [f64; 3],
    label_counts: BTreeMap<u16, u64>,
}

/// What a case is checked against: the dataset's declarations and the configured classes.
struct CaseRules<'a> {
    allowed: BTreeSet<u16>,
    declared: &'a BTreeMap<u32, String>,
    channels: usize,
}

fn check_case(case: &Case, rules: &CaseRules, problems: &mut Vec<Problem>) -> Option<CaseFindings> {
    let (allowed, declared) = (&rules.allowed, rules.declared);
    let mut report = |file: &Path, what: String| problems.push(Problem { file: Some(file.to_path_buf()), what });
    if !case.image.exists() {
        report(&case.image, "image file missing".into());
    }
    if !case.label.exists() {
        report(&case.label, "label file missing".into());
    }
    if !case.image.exists() || !case.label.exists() {
        return None;
    }
    let image = read_case_image(&case.image, rules.channels)
        .map_err(|e| problems.push(Problem { file: None, what: e.to_string() }));
    let label = read_label_nifti(&case.label).map_err(|e| problems.push(Problem { file: None, what: e.to_string() }));
    let (image, label) = (image.ok()?, label.ok()?);
    let mut ok = true;
    let mut report = |file: &Path, what: String| {
        ok = false;
        problems.push(Problem { file: Some(file.to_path_buf()), what })
    };
    if rules.channels > 1 {
        if let Some(extra) = channel_file(&case.image, rules.channels).filter(|f| f.exists()) {
            report(&extra, format!("a channel beyond the {} input channels dataset.json declares", rules.channels));
        }
    }
    for (k, channel) in image.channels.iter().enumerate() {
        let nan = channel.iter().filter(|v| !v.is_finite()).count();
        if nan > 0 {
            report(&case.image, format!("{nan} NaN or infinite voxels in channel {k}"));
        }
    }
    let [z, y, x] = image.shape();
    if (z, y, x) != label.data.dim() {
        report(&case.label, format!("shape {:?} differs from the image's {:?}", label.data.dim(), (z, y, x)));
    }
    let max_diff = (0..3)
        .flat_map(|r| (0..4).map(move |c| (r, c)))
        .map(|(r, c)| (image.affine[r][c] - label.affine[r][c]).abs())
        .fold(0.0, f64::max);
    if max_diff > 1e-3 * image.spacing.iter().cloned().fold(1.0, f64::max) {
        report(&case.label, format!("affine differs from the image's (max difference {max_diff:.4})"));
    }
    let mut label_counts = BTreeMap::new();
    for &v in label.data.iter() {
        *label_counts.entry(v).or_insert(0u64) += 1;
    }
    for (&v, &n) in &label_counts {
        if v == 0 {
            continue;
        }
        if !declared.contains_key(&(v as u32)) {
            report(&case.label, format!("label value {v} ({n} voxels) is not declared in dataset.json"));
        } else if !allowed.contains(&v) {
            report(&case.label, format!("label value {v} ({n} voxels) belongs to no configured class"));
        }
    }
    ok.then_some(CaseFindings { spacing: image.spacing, label_counts })
}

fn spacing_summary(spacings: &[[f64; 3]]) -> Option<[(f64, f64, f64); 3]> {
    if spacings.is_empty() {
        return None;
    }
    Some(std::array::from_fn(|a| {
        let mut v: Vec<f64> = spacings.iter().map(|s| s[a]).collect();
        v.sort_by(f64::total_cmp);
        (v[0], v[v.len() / 2], v[v.len() - 1])
    }))
}

/// Validates config, layout and every case, collecting every problem instead of stopping at the
/// first one.
pub fn check(config: &SiteDataConfig) -> CheckReport {
    let mut report = CheckReport { dataset_dir: config.dataset_dir.clone(), ..Default::default() };
    let config_problems = config.problems();
    let ds = match Dataset::open(config) {
        Ok(ds) => ds,
        Err(e) => {
            report.problems.extend(config_problems.into_iter().map(|what| Problem { file: None, what }));
            if report.problems.is_empty() {
                report.problems.push(Problem { file: None, what: format!("{e:#}") });
            }
            return report;
        }
    };
    report.layout = Some(ds.layout);
    report.channels = Some(ds.channels.clone());
    report.cases = ds.cases.len();
    report.train_cases = ds.train_cases().len();
    report.val_cases = ds.val_count();
    for c in &config.classes {
        for l in &c.labels {
            if !ds.declared_labels.contains_key(l) {
                report.problems.push(Problem {
                    file: Some(config.dataset_dir.join("dataset.json")),
                    what: format!("class {:?} uses label {l}, which dataset.json does not declare", c.name),
                });
            }
        }
    }
    let rules =
        CaseRules { allowed: config.class_label_set(), declared: &ds.declared_labels, channels: ds.channels.len() };
    let mut spacings = Vec::new();
    let mut classes: Vec<ClassSummary> = config
        .classes
        .iter()
        .map(|c| ClassSummary { name: c.name.clone(), labels: c.labels.clone(), voxels: 0, cases_present: 0 })
        .collect();
    for case in &ds.cases {
        let Some(found) = check_case(case, &rules, &mut report.problems) else {
            continue;
        };
        report.valid_cases += 1;
        spacings.push(found.spacing);
        for (summary, class) in classes.iter_mut().zip(&config.classes) {
            let n: u64 = found.label_counts.iter().filter(|(&l, _)| class.contains(l)).map(|(_, n)| n).sum();
            summary.voxels += n;
            summary.cases_present += (n > 0) as usize;
        }
    }
    report.spacing_range = spacing_summary(&spacings);
    report.classes = classes;
    report
}
