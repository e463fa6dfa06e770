//! `federation.toml`: the coordinator's configuration (written, commented, by `coordinator init`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
pub use fedtalent_vocab::{Plan, ServerOptimizer};
use serde::{Deserialize, Serialize};

/// The identity the operator's CLI (`status`, `launch`) presents; never a site.
pub const ADMIN_IDENTITY: &str = "coordinator-admin";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    pub federation: FederationSection,
    /// `[plan]`: sent to every site in `Welcome` as read.
    pub plan: Plan,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSection {
    pub name: String,
    /// UDP address the coordinator listens on.
    pub listen: SocketAddr,
    /// Round checkpoints, metrics log, federation setup. Relative paths are relative to the
    /// config file.
    pub state_dir: PathBuf,
    /// CA, coordinator and admin certificates.
    pub pki_dir: PathBuf,
    /// Allowed sites, in the order that fixes the global class order. Removing a site while
    /// serving closes its connections and drops it from the rounds ([`listed_sites`]).
    pub sites: Vec<String>,
    /// `auto`: rounds start once every listed site has registered; `manual`: on `coordinator launch`.
    #[serde(default)]
    pub launch: Launch,
    /// Round checkpoints kept on disk.
    #[serde(default = "default_keep")]
    pub keep_rounds: usize,
    /// Stop `serve` once the last round is checkpointed.
    #[serde(default)]
    pub exit_when_done: bool,
    /// `auto` (default): QUIC on `listen` and TLS over TCP on `tcp_listen` (for sites whose
    /// network blocks UDP); `quic` or `tcp`: only that one.
    #[serde(default)]
    pub transport: fedtalent_protocol::TransportChoice,
    /// TCP address of the TLS-over-TCP fallback; default: `listen` (same address, same port
    /// number, TCP instead of UDP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_listen: Option<SocketAddr>,
}

impl FederationSection {
    /// Where TLS over TCP listens: `tcp_listen`, or `listen`'s address and port.
    pub fn tcp_listen_addr(&self) -> SocketAddr {
        self.tcp_listen.unwrap_or(self.listen)
    }
}

/// `[federation].launch`: when the rounds start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Launch {
    /// Once every listed site has registered.
    #[default]
    Auto,
    /// On `coordinator launch`.
    Manual,
}

fn default_keep() -> usize {
    3
}

impl FederationConfig {
    /// Reads and validates a config; relative paths are resolved against its directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut config: Self = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.federation.state_dir = base.join(&config.federation.state_dir);
        config.federation.pki_dir = base.join(&config.federation.pki_dir);
        config.plan.init_model = config.plan.init_model.map(|m| base.join(m));
        config.validate().with_context(|| format!("invalid {}", path.display()))?;
        Ok(config)
    }

    /// Writes the config as TOML that [`FederationConfig::load`] reads back as it is: paths as
    /// they are (relative ones are then relative to the file), every key written out, no
    /// comments (the commented form an operator edits is [`template`]'s).
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = toml::to_string(self).with_context(|| format!("serializing {}", path.display()))?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    pub fn validate(&self) -> Result<()> {
        let f = &self.federation;
        let p = &self.plan;
        ensure!(!f.sites.is_empty(), "[federation].sites: no site listed");
        for s in &f.sites {
            fedtalent_certs::validate_site_name(s).with_context(|| format!("[federation].sites: {s:?}"))?;
            ensure!(s != ADMIN_IDENTITY, "[federation].sites: {s:?} is reserved for the operator's CLI");
        }
        let mut sorted = f.sites.clone();
        sorted.sort();
        sorted.dedup();
        ensure!(sorted.len() == f.sites.len(), "[federation].sites: a site is listed twice");
        ensure!(f.keep_rounds >= 1, "[federation].keep_rounds must be at least 1");
        let preset = fedtalent_model::Topology::preset(&p.preset).context("[plan].preset")?;
        if p.site_encoder_stages > 0 {
            ensure!(
                p.per_site_decoders,
                "[plan].site_encoder_stages = {} needs per_site_decoders = true (the stages lie in front of each \
                 site's decoder)",
                p.site_encoder_stages
            );
            let own = preset.with_site_decoders(vec![vec![0]]).with_site_encoder_stages(p.site_encoder_stages as usize);
            own.validate().context("[plan].site_encoder_stages")?;
        }
        let channel_problems = p.input_channels.problems();
        ensure!(channel_problems.is_empty(), "[plan].input_channels: {}", channel_problems.join("; "));
        ensure!(p.rounds >= 1, "[plan].rounds must be at least 1");
        // local_steps = 0: no local training, each site uploads the global model as it received it
        // (the whole-round transport benchmark, scripts/bench_round.py).
        ensure!(p.batch >= 1, "[plan].batch must be at least 1");
        if let Some(lr) = p.lr {
            ensure!(lr > 0.0 && lr.is_finite(), "[plan].lr must be positive");
        }
        ensure!(p.eval_every >= 1, "[plan].eval_every must be at least 1");
        ensure!(
            p.min_sites >= 1 && p.min_sites as usize <= f.sites.len(),
            "[plan].min_sites = {} must be between 1 and the number of sites ({})",
            p.min_sites,
            f.sites.len()
        );
        ensure!(p.round_deadline_s >= 1, "[plan].round_deadline_s must be at least 1");
        ensure!(p.max_update_norm > 0.0, "[plan].max_update_norm must be positive");
        ensure!(p.server.lr > 0.0 && p.server.lr <= 10.0, "[plan.server].lr = {} must be in (0, 10]", p.server.lr);
        ensure!(
            (0.0..1.0).contains(&p.server.momentum),
            "[plan.server].momentum = {} must be in [0, 1)",
            p.server.momentum
        );
        if let Some(privacy) = &p.privacy {
            privacy.validate().map_err(anyhow::Error::msg)?;
            if let Some(t) = privacy.secagg_threshold.filter(|_| privacy.secure_aggregation) {
                ensure!(
                    t as usize <= f.sites.len(),
                    "[plan.privacy].secagg_threshold = {t} is more than the {} sites",
                    f.sites.len()
                );
            }
            let rounds = p.rounds_to_run();
            ensure!(
                rounds >= 1,
                "[plan.privacy].epsilon_budget = {}: one round already spends ε = {:.3} (raise noise_multiplier)",
                privacy.epsilon_budget.unwrap_or(f64::INFINITY),
                privacy.epsilon(1)
            );
            if rounds < p.rounds {
                tracing::warn!(
                    planned = p.rounds,
                    rounds,
                    epsilon = privacy.epsilon(rounds),
                    "[plan.privacy]: the ε budget ends the federation after round {rounds} of {} (the lr \
                     schedule, set for all of them, is not annealed then)",
                    p.rounds
                );
            }
        }
        if let Some(dir) = &p.init_model {
            let model = fedtalent_model::ModelManifest::read(dir).context("[plan].init_model")?;
            ensure!(
                model.preset == p.preset,
                "[plan].init_model: {} is a {:?} model, [plan].preset is {:?}",
                dir.display(),
                model.preset,
                p.preset
            );
            // Its first layer's filters read the model's channels, in its order.
            ensure!(
                model.channels == p.input_channels,
                "[plan].init_model: {} takes input channels {}, [plan].input_channels are {}",
                dir.display(),
                model.channels,
                p.input_channels
            );
        }
        Ok(())
    }

    pub fn total_steps(&self) -> u64 {
        self.plan.total_steps()
    }
}

/// `[federation].sites` of a config file, read on its own: a running coordinator applies a
/// removal even when the rest of the file is invalid (e.g. `[plan].min_sites` now exceeds the
/// number of sites), since keeping a removed site in would fail open. A listed name that is not
/// a valid site name is left out (and so locked out), with a warning.
pub fn listed_sites(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let sites = table
        .get("federation")
        .and_then(|f| f.get("sites"))
        .and_then(|s| s.as_array())
        .with_context(|| format!("{}: no [federation].sites list", path.display()))?;
    let mut names = Vec::new();
    for value in sites {
        match value.as_str().map(|s| (s, fedtalent_certs::validate_site_name(s))) {
            Some((name, Ok(()))) => names.push(name.to_string()),
            Some((_, Err(e))) => tracing::warn!("{}: [federation].sites: {e}; left out", path.display()),
            None => tracing::warn!("{}: [federation].sites: {value} is not a string; left out", path.display()),
        }
    }
    Ok(names)
}

/// The commented template `coordinator init` writes.
pub fn template(name: &str, listen: SocketAddr, sites: &[String]) -> String {
    let min_sites = sites.len().clamp(1, 2);
    let local = fedtalent_protocol::LocalPolicy::default();
    let server = ServerOptimizer::default();
    let sites = sites.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
    format!(
        r#"# fedtalent federation configuration (written by `coordinator init`).

[federation]
name = "{name}"
# UDP address the coordinator listens on (open this UDP port in the firewall).
listen = "{listen}"
# Round checkpoints, metrics log (metrics.jsonl) and the federation setup.
state_dir = "state"
# Federation CA, coordinator and admin certificates. Keep ca.key offline if you can.
pki_dir = "pki"
# Sites allowed to join, in the order that fixes the global class order. Removing a site here
# takes effect within 2 s (its connections are closed, rounds stop waiting for it); adding one
# needs a restart of `serve`.
sites = [{sites}]
# auto: rounds start once every listed site has registered; manual: on `coordinator launch`.
launch = "auto"
# Round checkpoints kept on disk.
keep_rounds = 3
# Stop serving once the last round is checkpointed.
exit_when_done = false
# auto: QUIC on `listen` (UDP) and TLS 1.3 over TCP on the same port number for sites whose
# network blocks UDP (open both in the firewall); "quic" or "tcp": only that one.
transport = "auto"
# The TCP address, where it is not `listen`'s:
# tcp_listen = "0.0.0.0:7443"

[plan]
# Network preset: unet (paper), resenc (paper), small (the demo and the CPU quality benchmark),
# tiny (CPU tests), firenet, firenet-tiny.
preset = "unet"
rounds = 100
# Local iterations per round and site, and the batch size. Shorter rounds (more, cheaper
# communications) keep the sites' backbones closer to the average: on the phantom benchmark
# (scripts/quality_bench.sh) 40 x 10 beat 10 x 40 by 0.07 mean Dice at the same 400 steps.
local_steps = 250
batch = 2
# The sites' local optimizer: sgd (momentum 0.99, Nesterov: MultiTalent, nnU-Net) or adam
# (FIRENet). A site restarting with the other one refuses its saved optimizer state.
optimizer = "sgd"
# Base learning rate, poly decay over rounds x local_steps; left out: the optimizer's default
# (0.01 for sgd, 3e-4 for adam).
lr = 0.01
# Every eval_every rounds each site reports per-class Dice of the global model on its held-out cases.
eval_every = 5
# A round closes when every site reported or after round_deadline_s; it counts if at least
# min_sites reported (weights renormalised over those).
min_sites = {min_sites}
round_deadline_s = 3600
# batch: Dice pooled over the batch (the paper); per_sample: per sample, summed.
dice_mode = "batch"
# Send model tensors as bf16 (halves traffic).
bf16_transport = false
# Updates whose backbone moved farther than this (L2) from the global one are refused.
max_update_norm = 10000.0
# One decoder per site, kept by its owner like its heads; only the encoder is averaged
# (FIRENet's multi-decoder mode, any preset). The exported model then has every site's decoder
# and is no nnU-Net v1 state dict.
per_site_decoders = false
# With per_site_decoders: how many of the deepest encoder stages each site also keeps as its own,
# in front of its decoder (0: the whole encoder is averaged; the first stage always is).
site_encoder_stages = 0
# The network's input channels in order, named as every site's dataset.json names them
# (channel_names / modality), each with its normalization: "CT" (the federation's statistics
# from the sites' histograms), "zscore" (per image), "noNorm", "rescale_0_1", "rgb_to_0_1".
# A site whose dataset declares other channels is refused. Default: one CT channel.
# input_channels = [{{ name = "T1", normalization = "zscore" }}, {{ name = "T2", normalization = "zscore" }}]
# Start from an exported model instead of a fresh network: its backbone (and decoders), and the
# heads of the classes that continue, by class id; new classes get fresh heads.
# init_model = "model/"
# With init_model: "model" keeps the model's CT normalization, "sites" recomputes it.
init_normalization = "model"

# What each site does at a round boundary (defaults measured by scripts/quality_bench.sh).
[plan.local]
# reset: every round starts with empty SGD momentum (FedAvg); keep: carry it over.
optimizer_state = "{optimizer_state}"
# Heads-only steps on the new global backbone before each round's local steps.
head_warmup_steps = {head_warmup_steps}
# The last round trains only the heads, on the final global backbone (the exported pairing).
final_heads_only = {final_heads_only}

# How the coordinator applies the sites' weighted mean backbone change (FedAvgM): lr = 1 and
# momentum = 0 is FedAvg; lr > 1 gives each site's change more of its own weight.
[plan.server]
lr = {server_lr:?}
momentum = {server_momentum:?}

# Client-level differential privacy of the backbone (DP-FedAvg, off without this section): each
# site's change clipped to L2 norm clip_norm, Gaussian noise of noise_multiplier x clip_norm x
# the largest sqrt(n) weight on their weighted sum; (epsilon, delta) in the metrics and
# `coordinator status`; the federation stops before a round would exceed epsilon_budget. With
# few sites the noise needed for a small epsilon outweighs the signal (see the README).
# noise = "sites" (local DP; default "server"): each site clips its own change and adds noise of
# noise_multiplier x clip_norm to it before uploading, so not even the coordinator sees an
# un-noised change; the coordinator then neither clips nor adds noise (same epsilon per site,
# more noise on the mean).
# [plan.privacy]
# clip_norm = 1.0
# noise_multiplier = 1.0
# delta = 1e-5
# epsilon_budget = 10.0
# noise = "server"
#
# Secure aggregation of the backbone (SecAgg; off by default, with or without the DP keys above):
# each site masks its sqrt(n)-weighted backbone change, encoded in 32-bit fixed point, with masks
# agreed with the other sites (X25519) and secret-shared among them (Shamir, secagg_threshold of
# the round's sites, default a majority) so that a site that drops out is unmasked by the
# others; the coordinator relays the keys and shares it cannot read and learns only the sum.
# Heads and per-site decoders are not summed: they travel unmasked to the coordinator, as before.
# What the coordinator can no longer check per update: that the backbone values are finite and
# that the update's norm is under max_update_norm (the poisoning filter). What replaces it: each
# site refuses to mask a non-finite value, clamps every coordinate of its change to
# [-secagg_clip_range, secagg_clip_range] (with DP, also clips the change to clip_norm itself),
# so one site moves each coordinate of the sum by at most sqrt(n_k) x secagg_clip_range; the
# unit is 2^-secagg_frac_bits, and the coordinator refuses a round whose
# sum of sqrt(n_k) x secagg_clip_range x 2^secagg_frac_bits could overflow 2^31.
# secure_aggregation = true
# secagg_clip_range = 1.0
# secagg_frac_bits = 20
# secagg_stage_timeout_s = 120
"#,
        server_lr = server.lr,
        server_momentum = server.momentum,
        final_heads_only = local.final_heads_only,
        optimizer_state = local.optimizer_state.name(),
        head_warmup_steps = local.head_warmup_steps,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("federation.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn valid() -> String {
        template("t", "127.0.0.1:7443".parse().unwrap(), &["a".to_string(), "b".to_string()])
    }

    #[test]
    fn the_template_loads_and_paths_resolve_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = FederationConfig::load(&write(dir.path(), &valid())).unwrap();
        assert_eq!(config.federation.sites, vec!["a", "b"]);
        assert_eq!(config.federation.state_dir, dir.path().join("state"));
        assert_eq!(config.total_steps(), 100 * 250);
    }

    /// What `write` writes, `load` reads back as the same config: the template's, and one
    /// with the optional sections and enums away from their defaults.
    #[test]
    fn a_written_config_loads_as_itself() {
        let dir = tempfile::tempdir().unwrap();
        let template = FederationConfig::load(&write(dir.path(), &valid())).unwrap();
        let mut changed = template.clone();
        changed.federation.launch = Launch::Manual;
        changed.federation.exit_when_done = true;
        changed.plan.transport = fedtalent_vocab::Transport::Bf16;
        changed.plan.dice_mode = fedtalent_vocab::DiceMode::PerSample;
        changed.plan.local.optimizer_state = fedtalent_vocab::OptimizerState::Reset;
        changed.plan.server = ServerOptimizer { lr: 1.5, momentum: 0.9 };
        changed.plan.privacy = Some(fedtalent_vocab::Privacy {
            epsilon_budget: Some(100.0 / 3.0),
            secure_aggregation: true,
            secagg_threshold: Some(2),
            ..fedtalent_vocab::Privacy::dp(0.05, 1.0)
        });
        for config in [template, changed] {
            let path = dir.path().join("written.toml");
            config.write(&path).unwrap();
            assert_eq!(FederationConfig::load(&path).unwrap(), config);
        }
    }

    /// `[plan].init_model` must name a model folder of the plan's preset; `init_normalization`
    /// is one of its two values.
    #[test]
    fn a_missing_or_foreign_init_model_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let with = |line: &str| valid().replace("# init_model = \"model/\"", line);
        let err =
            format!("{:#}", FederationConfig::load(&write(dir.path(), &with("init_model = \"nowhere\""))).unwrap_err());
        assert!(err.contains("[plan].init_model") && err.contains("nowhere"), "{err}");
        let net = fedtalent_model::MultiTalentNet::new(
            &fedtalent_model::Topology::preset("tiny").unwrap(),
            1,
            tch::Device::Cpu,
        )
        .unwrap();
        let class = fedtalent_vocab::GlobalClass::new(
            0,
            "a",
            &fedtalent_vocab::ClassRegion { name: "x".into(), labels: vec![1] },
        );
        fedtalent_model::ModelManifest::of(&net, "tiny", fedtalent_vocab::CtNormalization::PAPER, vec![class])
            .save(&net, &dir.path().join("tiny-model"))
            .unwrap();
        let err = format!(
            "{:#}",
            FederationConfig::load(&write(dir.path(), &with("init_model = \"tiny-model\""))).unwrap_err()
        );
        assert!(err.contains("is a \"tiny\" model, [plan].preset is \"unet\""), "{err}");
        let ok = with("init_model = \"tiny-model\"").replace("preset = \"unet\"", "preset = \"tiny\"");
        let config = FederationConfig::load(&write(dir.path(), &ok)).unwrap();
        assert_eq!(config.plan.init_model, Some(dir.path().join("tiny-model")));
        let mr = ok.replace(
            "preset = \"tiny\"",
            "preset = \"tiny\"\ninput_channels = [{ name = \"T1\", normalization = \"zscore\" }]",
        );
        let err = format!("{:#}", FederationConfig::load(&write(dir.path(), &mr)).unwrap_err());
        assert!(err.contains("takes input channels CT, [plan].input_channels are T1 (zscore)"), "{err}");
        let bad = ok.replace("init_normalization = \"model\"", "init_normalization = \"hospital\"");
        let err = format!("{:#}", FederationConfig::load(&write(dir.path(), &bad)).unwrap_err());
        assert!(err.contains("hospital"), "{err}");
    }

    /// `[plan.privacy]`: read as written, bad values refused naming the field, and a budget
    /// that allows fewer rounds than planned shortens the federation (none at all: refused).
    #[test]
    fn the_privacy_section_is_read_checked_and_its_budget_ends_the_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let with = |section: &str| format!("{}\n[plan.privacy]\n{section}\n", valid());
        let config =
            FederationConfig::load(&write(dir.path(), &with("clip_norm = 0.5\nnoise_multiplier = 2.0"))).unwrap();
        let privacy = config.plan.privacy.expect("the section was read");
        assert_eq!((privacy.clip_norm, privacy.noise_multiplier, privacy.delta), (0.5, 2.0, 1e-5));
        assert_eq!(config.plan.rounds_to_run(), config.plan.rounds);
        let err = format!(
            "{:#}",
            FederationConfig::load(&write(dir.path(), &with("clip_norm = -1.0\nnoise_multiplier = 2.0"))).unwrap_err()
        );
        assert!(err.contains("[plan.privacy].clip_norm"), "{err}");
        let budget = with("clip_norm = 1.0\nnoise_multiplier = 2.0\nepsilon_budget = 4.0");
        let config = FederationConfig::load(&write(dir.path(), &budget)).unwrap();
        let rounds = config.plan.rounds_to_run();
        let privacy = config.plan.privacy.unwrap();
        assert!(rounds < config.plan.rounds, "{rounds} of {} rounds", config.plan.rounds);
        assert!(privacy.epsilon(rounds) <= 4.0 && privacy.epsilon(rounds + 1) > 4.0);
        let none = with("clip_norm = 1.0\nnoise_multiplier = 0.1\nepsilon_budget = 0.5");
        let err = format!("{:#}", FederationConfig::load(&write(dir.path(), &none)).unwrap_err());
        assert!(err.contains("one round already spends"), "{err}");
        let unknown = with("clip_norm = 1.0\nnoise_multiplier = 1.0\nepsilon = 3.0");
        let err = format!("{:#}", FederationConfig::load(&write(dir.path(), &unknown)).unwrap_err());
        assert!(err.contains("epsilon"), "an unknown [plan.privacy] key was accepted: {err}");
    }

    /// Each broken config is refused with an error naming the file and the field.
    #[test]
    fn broken_configs_are_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (valid().replace("preset = \"unet\"", "preset = \"vnet\""), "[plan].preset"),
            (valid().replace("min_sites = 2", "min_sites = 3"), "[plan].min_sites"),
            (valid().replace("sites = [\"a\", \"b\"]", "sites = [\"a\", \"a\"]"), "listed twice"),
            (valid().replace("sites = [\"a\", \"b\"]", "sites = [\"a\", \"bad name\"]"), "[federation].sites"),
            (valid().replace("sites = [\"a\", \"b\"]", "sites = [\"a\", \"coordinator-admin\"]"), "reserved"),
            (valid().replace("launch = \"auto\"", "launch = \"later\""), "launch = \"later\""),
            (valid().replace("dice_mode = \"batch\"", "dice_mode = \"global\""), "dice_mode = \"global\""),
            (valid().replace("bf16_transport = false", "bf16_transport = \"no\""), "bf16_transport"),
            (valid().replace("batch = 2", "batch = 2\nbatches = 3"), "unknown field `batches`"),
            (valid().replace("lr = 0.01", "lr = -1.0"), "[plan].lr"),
            (valid().replace("optimizer = \"sgd\"", "optimizer = \"rmsprop\""), "optimizer = \"rmsprop\""),
            (valid().replace("rounds = 100", "rounds = 0"), "[plan].rounds"),
            (valid().replace("site_encoder_stages = 0", "site_encoder_stages = 1"), "needs per_site_decoders = true"),
            (
                valid()
                    .replace("per_site_decoders = false", "per_site_decoders = true")
                    .replace("site_encoder_stages = 0", "site_encoder_stages = 6"),
                "its first stays shared",
            ),
            (format!("{}\nsurprise = 1\n", valid()), "unknown field"),
            ("[federation]\nname = \"x\"\n".to_string(), "missing field"),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", FederationConfig::load(&write(dir.path(), &text)).unwrap_err());
            assert!(err.contains(expected), "expected {expected:?} in: {err}");
            assert!(err.contains("federation.toml"), "the file is not named: {err}");
        }
        let missing = FederationConfig::load(&dir.path().join("nope.toml")).unwrap_err();
        assert!(format!("{missing:#}").contains("nope.toml"));
    }

    /// Issue 21 item 5: a removal must not be blocked by an unrelated error: the sites list is
    /// read although the file no longer validates (min_sites now exceeds the sites), and a
    /// broken name is left out rather than keeping the old list.
    #[test]
    fn the_sites_list_is_read_from_an_otherwise_invalid_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &valid().replace("sites = [\"a\", \"b\"]", "sites = [\"a\"]"));
        let err = format!("{:#}", FederationConfig::load(&path).unwrap_err());
        assert!(err.contains("[plan].min_sites"), "{err}");
        assert_eq!(listed_sites(&path).unwrap(), ["a"]);
        let path = write(dir.path(), &valid().replace("sites = [\"a\", \"b\"]", "sites = [\"a\", \"b c\", 3]"));
        assert_eq!(listed_sites(&path).unwrap(), ["a"]);
        let path = write(dir.path(), "[federation\n");
        assert!(format!("{:#}", listed_sites(&path).unwrap_err()).contains("federation.toml"));
    }

    /// `[plan.local]`: a broken value or key is refused naming it; the template's defaults load.
    #[test]
    fn broken_local_policies_are_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let config = FederationConfig::load(&write(dir.path(), &valid())).unwrap();
        assert_eq!(config.plan.local, fedtalent_protocol::LocalPolicy::default());
        let cases = [
            (valid().replace("optimizer_state = \"keep\"", "optimizer_state = \"fedavgm\""), "optimizer_state"),
            (valid().replace("head_warmup_steps = 0", "head_warmup_steps = -3"), "head_warmup_steps"),
            (valid().replace("final_heads_only = false", "final_heads_only = \"yes\""), "final_heads_only"),
            (valid().replace("head_warmup_steps = 0", "head_warmup = 0"), "head_warmup"),
        ];
        for (text, expected) in cases {
            assert_ne!(text, valid(), "the case did not change the template");
            let err = format!("{:#}", FederationConfig::load(&write(dir.path(), &text)).unwrap_err());
            assert!(err.contains(expected), "expected {expected:?} in: {err}");
            assert!(err.contains("federation.toml"), "the file is not named: {err}");
        }
    }

    /// `[plan.server]`: the template's FedAvg defaults load; a learning rate or momentum out of
    /// range, or an unknown key, is refused naming it.
    #[test]
    fn broken_server_optimizers_are_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let config = FederationConfig::load(&write(dir.path(), &valid())).unwrap();
        assert_eq!(config.plan.server, ServerOptimizer::default());
        let server = |body: &str| {
            let start = valid().find("[plan.server]").expect("the template has [plan.server]");
            format!("{}[plan.server]\n{body}\n", &valid()[..start])
        };
        let loaded = FederationConfig::load(&write(dir.path(), &server("lr = 1.5\nmomentum = 0.9"))).unwrap();
        assert_eq!(loaded.plan.server, ServerOptimizer { lr: 1.5, momentum: 0.9 });
        let cases = [
            (server("lr = 0.0"), "[plan.server].lr"),
            (server("lr = -1.0"), "[plan.server].lr"),
            (server("momentum = 1.0"), "[plan.server].momentum"),
            (server("momentum = -0.1"), "[plan.server].momentum"),
            (server("learning_rate = 1.0"), "learning_rate"),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", FederationConfig::load(&write(dir.path(), &text)).unwrap_err());
            assert!(err.contains(expected), "expected {expected:?} in: {err}");
            assert!(err.contains("federation.toml"), "the file is not named: {err}");
        }
    }
}
