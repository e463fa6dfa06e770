//! `coordinator simulate`: a whole federation on one machine for researchers, through the same
//! code a real one runs: phantom datasets per site, the federation PKI (each site's key made and
//! signed as in production), the coordinator serving in this process over QUIC + mTLS on
//! loopback, and one real `site-agent run` process per site.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, ensure, Context, Result};
use fedtalent_data::{GeneratedSite, SiteDataConfig, SiteKind, SynthOptions, ValCases};
use fedtalent_site_agent::config::{SiteConfig, SiteSection};
use fedtalent_vocab::{InputChannels, LocalOptimizer};
use tracing::info;

use crate::config::{self, FederationConfig};
use crate::pki;
use crate::server::{self, Coordinator};

/// What `simulate` builds and runs.
#[derive(Clone, Debug)]
pub struct SimulateOptions {
    pub out: PathBuf,
    pub sites: Vec<SiteKind>,
    pub preset: String,
    /// `[plan].per_site_decoders` (FIRENet's multi-decoder mode, any preset).
    pub per_site_decoders: bool,
    /// `[plan].site_encoder_stages`: the deepest encoder stages each site keeps as its own.
    pub site_encoder_stages: u32,
    /// `[plan].init_model` (an absolute path).
    pub init_model: Option<PathBuf>,
    /// `[plan.local]`: the sites' round-boundary policy.
    pub local: fedtalent_protocol::LocalPolicy,
    /// `[plan].optimizer`: the sites' local optimizer.
    pub optimizer: LocalOptimizer,
    /// `[plan].lr`; `None`: the optimizer's default.
    pub lr: Option<f64>,
    /// `[plan.server]`: the coordinator's optimizer.
    pub server: crate::config::ServerOptimizer,
    /// `[plan.privacy]`: differential privacy of the backbone (none: off).
    pub privacy: Option<fedtalent_vocab::Privacy>,
    pub rounds: u32,
    pub local_steps: u32,
    /// Rounds between the sites' validation of the global model (and always the last).
    pub eval_every: u32,
    pub batch: u32,
    pub cases: usize,
    pub shape: [usize; 3],
    pub seed: u64,
    /// Device of the site agents (auto | cpu | cuda | cuda:N).
    pub device: String,
    /// After the export, each site decides the post-processing of its classes on its
    /// validation cases (`site-agent postprocess`), as its operator would.
    pub postprocess: bool,
}

/// Runs the federation to its last round and exports the model to `<out>/model`.
pub fn run(opts: &SimulateOptions, site_agent: &Path) -> Result<PathBuf> {
    ensure!(!opts.sites.is_empty(), "--sites: at least one site");
    // Checked before anything is written, so a refused run leaves no half-made federation.
    let topology = fedtalent_model::Topology::preset(&opts.preset).context("--preset")?;
    ensure!(site_agent.exists(), "{} not found (build the workspace binaries)", site_agent.display());
    ensure!(!opts.out.join("coordinator").exists(), "{} already holds a federation", opts.out.display());
    let channels = common_channels(&opts.sites)?;
    let synth =
        SynthOptions { seed: opts.seed, cases_per_site: opts.cases, shape: opts.shape, sites: opts.sites.clone() };
    let generated = fedtalent_data::generate_sites(opts.out.join("data"), &synth)?;
    let names: Vec<String> = generated.iter().map(|s| s.name.clone()).collect();
    let port = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port();
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let coord_dir = opts.out.join("coordinator");
    pki::init(&coord_dir.join("pki"), "simulation", &["localhost".into(), "127.0.0.1".into()], 30)?;
    let config_path = coord_dir.join("federation.toml");
    std::fs::write(&config_path, federation_toml(opts, listen, &names, &channels))
        .with_context(|| format!("writing {}", config_path.display()))?;
    let config = FederationConfig::load(&config_path)?;
    for site in &generated {
        let agent = AgentSettings {
            device: &opts.device,
            spacing: topology.spacing,
            seed: opts.seed,
            torch_threads: torch_threads_per_site(generated.len()),
        };
        prepare_site(&opts.out, &coord_dir, site, listen, &agent)?;
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let mut agents = Agents(Vec::new());
    let result = runtime.block_on(async {
        let coordinator = Coordinator::open(config.clone())?;
        let pki_dir = &config.federation.pki_dir;
        let read = |f: &str| std::fs::read_to_string(pki_dir.join(f)).with_context(|| format!("reading {f}"));
        let server_config = fedtalent_certs::server_config(
            &read(fedtalent_certs::CA_CERT_FILE)?,
            &read(pki::COORDINATOR_CERT)?,
            &read(pki::COORDINATOR_KEY)?,
            coordinator.allowlist.clone(),
        )?;
        let serving = tokio::spawn(coordinator.serve(server_config));
        for site in &names {
            agents.0.push((site.clone(), spawn_agent(site_agent, &opts.out.join(site))?));
        }
        info!(
            sites = names.len(),
            rounds = opts.rounds,
            "simulated federation running (logs in {})",
            opts.out.display()
        );
        serving.await.context("coordinator task")?
    });
    result?;
    agents.wait()?;
    let model_dir = opts.out.join("model");
    println!("{}", server::export_from_state(&config, &model_dir, None)?);
    if opts.postprocess {
        for site in &names {
            decide_postprocessing(site_agent, &opts.out.join(site), &model_dir, &opts.device)?;
        }
    }
    Ok(model_dir)
}

/// `site-agent postprocess` of one site on the exported model (its log appended to the site's).
fn decide_postprocessing(site_agent: &Path, dir: &Path, model_dir: &Path, device: &str) -> Result<()> {
    let log = std::fs::OpenOptions::new().append(true).create(true).open(dir.join("site-agent.log"))?;
    let status = Command::new(site_agent)
        .args(["postprocess", "--model"])
        .arg(model_dir)
        .arg("--config")
        .arg(dir.join("site.toml"))
        .args(["--device", device])
        .stderr(log)
        .status()
        .with_context(|| format!("starting {}", site_agent.display()))?;
    ensure!(status.success(), "site-agent postprocess in {} failed ({status}); see its site-agent.log", dir.display());
    Ok(())
}

/// The input channels of the phantom sites, which one federation must share (an MR site and a
/// CT site cannot feed the same first convolution).
fn common_channels(sites: &[SiteKind]) -> Result<InputChannels> {
    let channels = |kind: SiteKind| InputChannels::named(kind.channel_names().iter().copied());
    let first = sites[0];
    if let Some(&other) = sites.iter().find(|s| channels(**s) != channels(first)) {
        bail!(
            "--sites: {} has input channels {}, {} has {}: the sites of one federation share their input channels",
            first.name(),
            channels(first),
            other.name(),
            channels(other)
        );
    }
    Ok(channels(first))
}

/// The simulation's federation.toml: the `init` template with the simulation's plan and the
/// sites' input channels.
fn federation_toml(opts: &SimulateOptions, listen: SocketAddr, sites: &[String], channels: &InputChannels) -> String {
    let mut text = String::new();
    let mut section = "";
    for line in config::template("simulation", listen, sites).lines() {
        if line.starts_with('[') {
            section = line.trim();
        }
        let key = line.split('=').next().unwrap_or("").trim();
        let replaced = match (section, key) {
            ("[plan.server]", "lr") => format!("lr = {:?}", opts.server.lr),
            ("[plan.server]", "momentum") => format!("momentum = {:?}", opts.server.momentum),
            (_, key) => match key {
                "preset" => format!("preset = {:?}", opts.preset),
                "per_site_decoders" => format!("per_site_decoders = {}", opts.per_site_decoders),
                "site_encoder_stages" => format!("site_encoder_stages = {}", opts.site_encoder_stages),
                // the template's commented-out example line
                "# input_channels" if *channels != InputChannels::ct() => input_channels_line(channels),
                // the template's commented-out example line
                "# init_model" => match &opts.init_model {
                    Some(model) => format!("init_model = {model:?}"),
                    None => line.to_string(),
                },
                "rounds" => format!("rounds = {}", opts.rounds),
                "optimizer" => format!("optimizer = {:?}", opts.optimizer.name()),
                "lr" => match opts.lr {
                    Some(lr) => format!("lr = {lr:?}"),
                    None => "# lr: the optimizer's default".into(),
                },
                "local_steps" => format!("local_steps = {}", opts.local_steps),
                "batch" => format!("batch = {}", opts.batch),
                "optimizer_state" => format!("optimizer_state = {:?}", opts.local.optimizer_state.name()),
                "head_warmup_steps" => format!("head_warmup_steps = {}", opts.local.head_warmup_steps),
                "final_heads_only" => format!("final_heads_only = {}", opts.local.final_heads_only),
                "eval_every" => format!("eval_every = {}", opts.eval_every),
                "round_deadline_s" => "round_deadline_s = 3600".into(),
                "exit_when_done" => "exit_when_done = true".into(),
                _ => line.to_string(),
            },
        };
        let _ = writeln!(text, "{replaced}");
    }
    if let Some(p) = &opts.privacy {
        let _ = writeln!(text, "[plan.privacy]");
        if p.differential() {
            let _ = writeln!(
                text,
                "clip_norm = {:?}\nnoise_multiplier = {:?}\ndelta = {:?}",
                p.clip_norm, p.noise_multiplier, p.delta
            );
        }
        if let Some(budget) = p.epsilon_budget {
            let _ = writeln!(text, "epsilon_budget = {budget:?}");
        }
        if p.noise == fedtalent_vocab::NoiseAt::Sites {
            let _ = writeln!(text, "noise = \"sites\"");
        }
        if p.secure_aggregation {
            let _ = writeln!(text, "secure_aggregation = true");
        }
    }
    text
}

/// `input_channels = [{ name = "T1", normalization = "zscore" }, ...]`.
fn input_channels_line(channels: &InputChannels) -> String {
    let tables: Vec<String> = channels
        .iter()
        .map(|c| format!("{{ name = {:?}, normalization = {:?} }}", c.name, c.normalization.channel_name()))
        .collect();
    format!("input_channels = [{}]", tables.join(", "))
}

/// How every simulated site agent runs.
struct AgentSettings<'a> {
    device: &'a str,
    spacing: [f64; 3],
    /// `[site].seed`: each agent mixes it with its site's name, so the streams differ per site.
    seed: u64,
    torch_threads: usize,
}

/// The machine's cores split among the agents (one libtorch thread pool each would oversubscribe).
fn torch_threads_per_site(sites: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / sites.max(1)).max(1)
}

/// Key, certificate (signed by the simulation's CA) and site.toml of one phantom site.
fn prepare_site(
    out: &Path,
    coord_dir: &Path,
    site: &GeneratedSite,
    listen: SocketAddr,
    agent: &AgentSettings,
) -> Result<()> {
    let (device, spacing) = (agent.device, agent.spacing);
    let (torch_threads, seed) = (agent.torch_threads, agent.seed);
    let dir = out.join(&site.name);
    let (_, csr) = fedtalent_certs::write_keygen(&dir, &site.name)?;
    let listed = [site.name.clone()];
    pki::sign(&coord_dir.join("pki"), &csr, &dir.join(format!("{}.crt", site.name)), 30, &listed)?;
    let config = SiteConfig {
        site: SiteSection {
            name: site.name.clone(),
            coordinator: listen,
            server_name: "localhost".into(),
            ca: coord_dir.join("pki").join(fedtalent_certs::CA_CERT_FILE),
            cert: format!("{}.crt", site.name).into(),
            key: format!("{}.key", site.name).into(),
            state_dir: "state".into(),
            device: device.to_string(),
            threads: 1,
            seed,
            torch_threads: Some(torch_threads),
            exclusive_classes: false,
            transport: Default::default(),
            coordinator_tcp: None,
        },
        data: SiteDataConfig {
            dataset_dir: site.dataset_dir.clone(),
            classes: site.classes.clone(),
            val_cases: ValCases::Count(2),
            cache_dir: "cache".into(),
            target_spacing: spacing,
            label_interp: Default::default(),
            input_channels: None,
        },
    };
    config.write(&dir.join("site.toml"))
}

fn spawn_agent(site_agent: &Path, dir: &Path) -> Result<Child> {
    let log = std::fs::File::create(dir.join("site-agent.log"))?;
    Command::new(site_agent)
        .args(["run", "--config"])
        .arg(dir.join("site.toml"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", site_agent.display()))
}

/// The site-agent processes; killed if the simulation fails, so none outlives it.
struct Agents(Vec<(String, Child)>);

impl Agents {
    fn wait(&mut self) -> Result<()> {
        for (site, child) in &mut self.0 {
            let status = child.wait()?;
            if !status.success() {
                bail!("site agent {site} failed ({status}); see its site-agent.log");
            }
        }
        self.0.clear();
        Ok(())
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(out: &Path, preset: &str, per_site_decoders: bool) -> SimulateOptions {
        SimulateOptions {
            out: out.to_path_buf(),
            sites: vec![SiteKind::Liver],
            preset: preset.into(),
            per_site_decoders,
            site_encoder_stages: 0,
            init_model: None,
            local: fedtalent_protocol::LocalPolicy::default(),
            optimizer: LocalOptimizer::Sgd,
            lr: None,
            server: crate::config::ServerOptimizer::default(),
            privacy: None,
            rounds: 1,
            local_steps: 1,
            eval_every: 1,
            batch: 1,
            cases: 2,
            shape: [8, 16, 16],
            seed: 0,
            device: "cpu".into(),
            postprocess: false,
        }
    }

    /// The --dp-* flags become the federation's `[plan.privacy]`.
    #[test]
    fn privacy_options_reach_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let privacy = fedtalent_vocab::Privacy {
            delta: 1e-6,
            epsilon_budget: Some(50.0),
            secure_aggregation: true,
            noise: fedtalent_vocab::NoiseAt::Sites,
            ..fedtalent_vocab::Privacy::dp(0.25, 0.5)
        };
        let opts = SimulateOptions { privacy: Some(privacy), ..options(dir.path(), "tiny", false) };
        let path = dir.path().join("federation.toml");
        let ct = InputChannels::ct();
        let toml =
            |opts: &SimulateOptions| federation_toml(opts, "127.0.0.1:4433".parse().unwrap(), &["liver".into()], &ct);
        std::fs::write(&path, toml(&opts)).unwrap();
        let config = FederationConfig::load(&path).unwrap();
        assert_eq!(config.plan.privacy, Some(privacy));
        let plain = options(dir.path(), "tiny", false);
        std::fs::write(&path, toml(&plain)).unwrap();
        assert_eq!(FederationConfig::load(&path).unwrap().plan.privacy, None);
    }

    /// MR phantom sites federate on their two channels; MR and CT sites cannot share a network.
    #[test]
    fn the_sites_input_channels_reach_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let mr = common_channels(&[SiteKind::MrLiver, SiteKind::MrLiver]).unwrap();
        assert_eq!(mr, InputChannels::named(["T1", "T2"]));
        let path = dir.path().join("federation.toml");
        let opts = options(dir.path(), "tiny", false);
        std::fs::write(&path, federation_toml(&opts, "127.0.0.1:4433".parse().unwrap(), &["mr_liver".into()], &mr))
            .unwrap();
        assert_eq!(FederationConfig::load(&path).unwrap().plan.input_channels, mr);
        // --optimizer adam without --lr: Adam's own default lr, not the template's SGD one.
        let adam = SimulateOptions { optimizer: LocalOptimizer::Adam, ..options(dir.path(), "tiny", false) };
        std::fs::write(&path, federation_toml(&adam, "127.0.0.1:4433".parse().unwrap(), &["liver".into()], &mr))
            .unwrap();
        let plan = FederationConfig::load(&path).unwrap().plan;
        assert_eq!((plan.optimizer, plan.local_lr()), (LocalOptimizer::Adam, 3e-4));
        let e = common_channels(&[SiteKind::Liver, SiteKind::MrLiver]).unwrap_err().to_string();
        assert!(e.contains("liver has input channels CT, mr_liver has T1 (zscore), T2 (zscore)"), "{e}");
    }

    #[test]
    fn bad_options_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("sim");
        let missing_agent = dir.path().join("no-site-agent");
        let e = run(&options(&out, "no-such-preset", false), &missing_agent).unwrap_err();
        assert!(format!("{e:#}").contains("--preset"), "{e:#}");
        let e = run(&options(&out, "tiny", true), &missing_agent).unwrap_err();
        assert!(format!("{e:#}").contains("not found"), "{e:#}");
        assert!(!out.exists(), "a refused simulation wrote {}", out.display());
    }
}
