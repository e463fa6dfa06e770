//! `site.toml`: a site agent's configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use fedtalent_data::SiteDataConfig;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub site: SiteSection,
    /// The dataset and the label values forming each class.
    pub data: SiteDataConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSection {
    /// The site's name: must match its certificate.
    pub name: String,
    /// The coordinator's UDP address.
    pub coordinator: SocketAddr,
    /// The name on the coordinator's certificate (one of its SANs).
    pub server_name: String,
    /// Federation CA certificate, this site's certificate and private key.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Heads, optimizer state, last round, local metrics.
    pub state_dir: PathBuf,
    /// auto | cpu | cuda | cuda:N
    #[serde(default = "default_device")]
    pub device: String,
    /// CPU threads for preprocessing and batch loading.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Seed of the local data sampling (mixed with the site's name, see `local::stream_seed`).
    #[serde(default)]
    pub seed: u64,
    /// This site's classes are mutually exclusive (no voxel belongs to two of them; their label
    /// sets are disjoint): train them as one softmax over background and them, with
    /// cross-entropy and soft Dice, and predict them by argmax (FIRENet), instead of one sigmoid
    /// head each (MultiTalent). A property of the site's annotation protocol, so the site declares it;
    /// here rather than in `[data]`, which describes how the dataset is read and preprocessed
    /// (and keys its cache), not how the network learns from it.
    #[serde(default)]
    pub exclusive_classes: bool,
    /// libtorch's intra-op threads (default: libtorch's own choice, one per core). Several agents
    /// sharing a machine should split its cores.
    #[serde(default)]
    pub torch_threads: Option<usize>,
    /// `auto` (default): QUIC, then TLS over TCP when QUIC gets no answer within 5 s (a network
    /// that blocks UDP); `quic` or `tcp`: only that one.
    #[serde(default)]
    pub transport: fedtalent_protocol::TransportChoice,
    /// The coordinator's TCP address for TLS over TCP; default: `coordinator` (same port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator_tcp: Option<SocketAddr>,
}

fn default_device() -> String {
    "auto".into()
}
fn default_threads() -> usize {
    2
}

impl SiteConfig {
    /// Reads a config; relative paths are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut c: Self = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut c.site.ca,
            &mut c.site.cert,
            &mut c.site.key,
            &mut c.site.state_dir,
            &mut c.data.dataset_dir,
            &mut c.data.cache_dir,
        ] {
            *p = base.join(&*p);
        }
        fedtalent_certs::validate_site_name(&c.site.name)
            .with_context(|| format!("{}: [site].name", path.display()))?;
        ensure!(c.site.threads >= 1, "{}: [site].threads must be at least 1", path.display());
        let problems = c.data.problems();
        ensure!(problems.is_empty(), "{}: {}", path.display(), problems.join("; "));
        if c.site.exclusive_classes {
            disjoint_classes(&c.data.classes)
                .with_context(|| format!("{}: [site].exclusive_classes", path.display()))?;
        }
        Ok(c)
    }
}

/// Mutually exclusive classes share no label value (else a voxel would belong to two).
fn disjoint_classes(classes: &[fedtalent_vocab::ClassRegion]) -> Result<()> {
    for (i, a) in classes.iter().enumerate() {
        for b in &classes[i + 1..] {
            if let Some(l) = a.labels.iter().find(|l| b.labels.contains(l)) {
                anyhow::bail!(
                    "classes {:?} and {:?} both contain label value {l}, so they are not mutually exclusive",
                    a.name,
                    b.name
                );
            }
        }
    }
    Ok(())
}

impl SiteConfig {
    /// Writes the config as TOML to `path` (its relative paths stay relative to the file).
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = toml::to_string(self).with_context(|| format!("serializing {}", path.display()))?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

/// A commented example (`site-agent keygen` prints where to put it).
pub fn template(site: &str) -> String {
    format!(
        r#"# fedtalent site agent configuration.
[site]
name = "{site}"
# The coordinator's UDP address and the name on its certificate.
coordinator = "127.0.0.1:7443"
server_name = "localhost"
# auto: QUIC, and TLS 1.3 over TCP (same port, or coordinator_tcp) when QUIC gets no answer
# within 5 s, as behind a firewall that blocks UDP; "quic" or "tcp": only that one.
transport = "auto"
# coordinator_tcp = "127.0.0.1:7443"
# Federation CA certificate (from the coordinator's operator), this site's certificate and key.
ca = "ca.crt"
cert = "{site}.crt"
key = "{site}.key"
# Heads, optimizer state and local metrics survive restarts here.
state_dir = "state"
# auto | cpu | cuda | cuda:N
device = "auto"
threads = 4
# true when no voxel belongs to two of the classes below (disjoint label sets): they are then
# trained as one softmax with cross-entropy + Dice and predicted by argmax (FIRENet) instead of
# one sigmoid each (MultiTalent). Overlapping classes, like these two, need false.
exclusive_classes = false

[data]
# nnU-Net v2 or Medical Segmentation Decathlon folder.
dataset_dir = "Dataset001_Liver"
# Preprocessed cases are cached here (invalidated when the config or a source file changes).
cache_dir = "cache"
# Cases held out for federated validation: a count or a fraction.
val_cases = 0.2
# Each class is a region: the label values of this site's label maps that belong to it.
classes = [
  {{ name = "liver", labels = [1, 2] }},
  {{ name = "liver_tumour", labels = [2] }},
]
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<SiteConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site.toml");
        std::fs::write(&path, text).unwrap();
        SiteConfig::load(&path)
    }

    #[test]
    fn the_template_loads_with_paths_next_to_the_file() {
        let config = load(&template("hospital_a")).unwrap();
        assert_eq!(config.site.name, "hospital_a");
        assert!(config.site.key.ends_with("hospital_a.key") && config.site.key.is_absolute());
        assert_eq!(config.data.classes.len(), 2);
    }

    /// What `write` serializes is what `load` reads (the simulation and the tests write their
    /// sites' configs this way).
    #[test]
    fn a_written_config_loads_back_equal() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = load(&template("hospital_a")).unwrap();
        config.site.torch_threads = Some(3);
        config.data.val_cases = fedtalent_data::ValCases::Count(2);
        let path = dir.path().join("written.toml");
        config.write(&path).unwrap();
        let back = SiteConfig::load(&path).unwrap();
        assert_eq!(format!("{back:?}"), format!("{config:?}"));
    }

    /// Each broken site config is refused with an error naming the field.
    #[test]
    fn broken_site_configs_are_refused_naming_the_field() {
        let t = template("hospital_a");
        let cases = [
            (t.replace("name = \"hospital_a\"", "name = \"a b\""), "[site].name"),
            (t.replace("threads = 4", "threads = 0"), "[site].threads"),
            (t.replace("coordinator = \"127.0.0.1:7443\"", "coordinator = \"nowhere\""), "coordinator"),
            (t.replace("labels = [2] }", "labels = [] }"), "no label values"),
            (t.replace("labels = [1, 2] }", "labels = [0, 1] }"), "background"),
            (t.replace("val_cases = 0.2", "val_cases = 1.5"), "val_cases"),
            // The template's liver {1, 2} and liver_tumour {2} overlap.
            (t.replace("exclusive_classes = false", "exclusive_classes = true"), "[site].exclusive_classes"),
            (format!("{t}\n[extra]\nx = 1\n"), "unknown field"),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", load(&text).unwrap_err());
            assert!(err.contains(expected), "expected {expected:?} in: {err}");
        }
    }
}
