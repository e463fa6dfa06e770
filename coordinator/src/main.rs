//! `coordinator`: the federation coordinator's command line.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use fedtalent_coordinator::config::{self, FederationConfig};
use fedtalent_coordinator::metrics::{DiceLine, MetricsLine};
use fedtalent_coordinator::pki::{self, ClientPki};
use fedtalent_coordinator::server::{self, Coordinator};
use fedtalent_coordinator::simulate::{self, SimulateOptions};
use fedtalent_coordinator::state::StateDir;
use fedtalent_protocol::{AdminReply, AdminRequest, Message, StatusReport};

#[derive(Parser)]
#[command(name = "coordinator", version, about = "fedtalent federation coordinator: PKI, rounds, aggregation, export")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the federation CA, the coordinator and admin certificates, and a commented federation.toml.
    Init {
        /// Directory for federation.toml, pki/ and state/.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        #[arg(long, default_value = "fedtalent")]
        name: String,
        /// UDP address to listen on.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// DNS names or IPs sites use to reach the coordinator (certificate SANs); the first one is
        /// the name the operator's CLI verifies.
        #[arg(long = "san", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        sans: Vec<String>,
        /// Site names allowed to join, in class order (edit federation.toml later as needed).
        #[arg(long, value_delimiter = ',', required = true)]
        sites: Vec<String>,
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
    /// Issue a site certificate from its certificate request (`site-agent keygen`).
    Sign {
        #[arg(long, default_value = "federation.toml")]
        config: PathBuf,
        /// The site's `.csr` file.
        #[arg(long)]
        csr: PathBuf,
        /// Where to write the certificate (default: next to the request, `.crt`).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Run the federation: wait for sites, run rounds, checkpoint, resume after a restart.
    Serve {
        #[arg(long, default_value = "federation.toml")]
        config: PathBuf,
        /// Also write each round's scalars (loss per site, Dice per class, round times, bytes)
        /// as TensorBoard event files into this folder (`tensorboard --logdir` it).
        #[arg(long)]
        tensorboard: Option<PathBuf>,
    },
    /// Show progress: rounds, sites, latest per-class Dice (live from a running coordinator, else from disk).
    Status {
        #[arg(long, default_value = "federation.toml")]
        config: PathBuf,
    },
    /// Where each round's time went: local training vs overhead (transfers, evaluation, aggregation, checkpoint).
    Report {
        #[arg(long, default_value = "federation.toml")]
        config: PathBuf,
        /// Also write one self-contained HTML page: progress figures, the last Dice per class,
        /// round times, bytes per round and site, refusals and the plan.
        #[arg(long)]
        html: Option<PathBuf>,
        /// Also draw the progress figure (as `serve` keeps in state/progress.png) into this PNG.
        #[arg(long)]
        png: Option<PathBuf>,
    },
    /// Start rounds on a coordinator configured with `launch = "manual"`.
    Launch {
        #[arg(long, default_value = "federation.toml")]
        config: PathBuf,
    },
    /// Run a whole federation on this machine: phantom sites, PKI, this coordinator and one
    /// site-agent process per site on loopback; exports the model to OUT/model. A flag given
    /// twice takes its last value (scripts append their overrides).
    #[command(args_override_self = true)]
    Simulate(SimulateArgs),
    /// Write the global model of the newest complete round (model.safetensors + model.json).
    Export {
        #[arg(long, default_value = "federation.toml")]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// With per-site decoders: write SITE's model alone (the encoder, SITE's decoder and
        /// heads), a plain network whose weights are an nnU-Net v1 state dict again.
        #[arg(long)]
        site: Option<String>,
    },
}

#[derive(clap::Args)]
struct SimulateArgs {
    #[arg(long)]
    out: PathBuf,
    /// Phantom sites: liver, pancreas, multiorgan, kidney, liver_novessels, liver_wide, mr_liver
    /// (two-channel MR; one federation's sites share their input channels).
    #[arg(long, value_delimiter = ',', default_value = "liver,pancreas,multiorgan")]
    sites: Vec<String>,
    /// Network preset; `small` is the CPU preset measured best on the phantom sites (README).
    #[arg(long, default_value = "small")]
    preset: String,
    /// Per-site decoders (FIRENet's multi-decoder mode, every preset): each site keeps its own
    /// decoder and only the encoder is averaged; measured better on every seed of the phantom
    /// benchmark, hence the default (`--per-site-decoders false`: one shared decoder, one
    /// nnU-Net v1 model).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    per_site_decoders: bool,
    /// [plan].site_encoder_stages: with per-site decoders, the deepest encoder stages each site
    /// also keeps as its own (0: the whole encoder is averaged).
    #[arg(long, default_value_t = 0)]
    site_encoder_stages: u32,
    /// [plan].init_model: start from this exported model (its backbone, the continuing heads).
    #[arg(long)]
    init_model: Option<PathBuf>,
    /// [plan.local].optimizer_state: keep | reset (default: the template's).
    #[arg(long)]
    optimizer_state: Option<fedtalent_protocol::OptimizerState>,
    /// [plan].optimizer: the sites' local optimizer, sgd (nnU-Net, MultiTalent) | adam (FIRENet).
    #[arg(long, default_value = "sgd")]
    optimizer: fedtalent_vocab::LocalOptimizer,
    /// [plan].lr (default: the optimizer's own, 0.01 for sgd, 3e-4 for adam).
    #[arg(long)]
    lr: Option<f64>,
    /// [plan.local].head_warmup_steps (default: the template's).
    #[arg(long)]
    head_warmup_steps: Option<u32>,
    /// [plan.local].final_heads_only: true | false (default: the template's).
    #[arg(long)]
    final_heads_only: Option<bool>,
    /// [plan.server].lr: the server's step along the sites' mean backbone change (1: FedAvg).
    #[arg(long)]
    server_lr: Option<f64>,
    /// [plan.server].momentum: FedAvgM's server momentum (0: none).
    #[arg(long)]
    server_momentum: Option<f64>,
    /// [plan.privacy].noise_multiplier: differential privacy of the backbone (with --dp-clip-norm).
    #[arg(long, requires = "dp_clip_norm")]
    dp_noise_multiplier: Option<f64>,
    /// [plan.privacy].clip_norm: the L2 bound on a site's backbone change per round.
    #[arg(long, requires = "dp_noise_multiplier")]
    dp_clip_norm: Option<f64>,
    /// [plan.privacy].delta.
    #[arg(long, requires = "dp_noise_multiplier", default_value_t = 1e-5)]
    dp_delta: f64,
    /// [plan.privacy].epsilon_budget.
    #[arg(long, requires = "dp_noise_multiplier")]
    dp_epsilon_budget: Option<f64>,
    /// [plan.privacy].noise: who adds the noise, the coordinator (server: central DP) or each
    /// site to its own clipped change (sites: local DP).
    #[arg(long, requires = "dp_noise_multiplier", default_value = "server", value_parser = ["server", "sites"])]
    dp_noise_at: String,
    /// [plan.privacy].secure_aggregation: the coordinator sees only the weighted sum of the
    /// sites' backbone changes (SecAgg masks; with the --dp-* flags the sites clip).
    #[arg(long)]
    secure_aggregation: bool,
    /// Rounds, and local steps per round: many short rounds keep the sites' encoders close to
    /// their average (measured: 40 x 10 beat 10 x 40 at the same steps, README).
    #[arg(long, default_value_t = 100)]
    rounds: u32,
    #[arg(long, default_value_t = 10)]
    local_steps: u32,
    /// Rounds between validations of the global model at the sites (default: 5 per run).
    #[arg(long)]
    eval_every: Option<u32>,
    #[arg(long, default_value_t = 2)]
    batch: u32,
    /// Cases per site.
    #[arg(long, default_value_t = 8)]
    cases: usize,
    /// Phantom volume shape z y x.
    #[arg(long, num_args = 3, default_values_t = [48, 128, 128])]
    shape: Vec<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device of the site agents: auto | cpu | cuda | cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// After the export, each site decides nnU-Net's post-processing of its classes on its
    /// validation cases (`site-agent postprocess`); `false` leaves the model raw.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    postprocess: bool,
}

impl SimulateArgs {
    fn options(self) -> Result<SimulateOptions> {
        Ok(SimulateOptions {
            sites: self.sites.iter().map(|s| s.parse().context("--sites")).collect::<Result<Vec<_>>>()?,
            out: self.out,
            preset: self.preset,
            per_site_decoders: self.per_site_decoders,
            site_encoder_stages: self.site_encoder_stages,
            init_model: self.init_model.map(|m| std::path::absolute(&m)).transpose().context("--init-model")?,
            local: {
                let default = fedtalent_protocol::LocalPolicy::default();
                fedtalent_protocol::LocalPolicy {
                    optimizer_state: self.optimizer_state.unwrap_or(default.optimizer_state),
                    head_warmup_steps: self.head_warmup_steps.unwrap_or(default.head_warmup_steps),
                    final_heads_only: self.final_heads_only.unwrap_or(default.final_heads_only),
                }
            },
            server: {
                let default = config::ServerOptimizer::default();
                config::ServerOptimizer {
                    lr: self.server_lr.unwrap_or(default.lr),
                    momentum: self.server_momentum.unwrap_or(default.momentum),
                }
            },
            optimizer: self.optimizer,
            lr: self.lr,
            privacy: fedtalent_vocab::Privacy::of_flags(
                self.dp_noise_multiplier.zip(self.dp_clip_norm).map(|(noise_multiplier, clip_norm)| {
                    fedtalent_vocab::Privacy {
                        delta: self.dp_delta,
                        epsilon_budget: self.dp_epsilon_budget,
                        noise: if self.dp_noise_at == "sites" {
                            fedtalent_vocab::NoiseAt::Sites
                        } else {
                            fedtalent_vocab::NoiseAt::Server
                        },
                        ..fedtalent_vocab::Privacy::dp(clip_norm, noise_multiplier)
                    }
                }),
                self.secure_aggregation,
            ),
            rounds: self.rounds,
            eval_every: self.eval_every.unwrap_or((self.rounds / 5).max(1)),
            local_steps: self.local_steps,
            batch: self.batch,
            cases: self.cases,
            shape: [self.shape[0], self.shape[1], self.shape[2]],
            seed: self.seed,
            device: self.device,
            postprocess: self.postprocess,
        })
    }
}

fn main() -> ExitCode {
    fedtalent_data::alloc::keep_freed_memory();
    init_tracing();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colours only on a terminal: a log redirected to a file stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init { dir, name, listen, sans, sites, days } => init(&dir, &name, listen, &sans, &sites, days),
        Command::Sign { config, csr, out, days } => {
            let config = FederationConfig::load(&config)?;
            let out = out.unwrap_or_else(|| csr.with_extension("crt"));
            let (site, path) = pki::sign(&config.federation.pki_dir, &csr, &out, days, &config.federation.sites)?;
            println!("signed certificate for site {site:?}: {}", path.display());
            println!(
                "give the site this certificate and {}",
                config.federation.pki_dir.join(fedtalent_certs::CA_CERT_FILE).display()
            );
            Ok(())
        }
        Command::Serve { config, tensorboard } => serve(&config, tensorboard.as_deref()),
        Command::Status { config } => status(&config),
        Command::Report { config, html, png } => report(&config, html.as_deref(), png.as_deref()),
        Command::Launch { config } => {
            let config = FederationConfig::load(&config)?;
            match admin_request(&config, AdminRequest::Launch { rounds: None })? {
                Message::AdminReply(AdminReply::Done { message }) => {
                    println!("{message}");
                    Ok(())
                }
                other => bail!("launch refused: {other:?}"),
            }
        }
        Command::Simulate(args) => {
            let opts = args.options()?;
            let exe = std::env::current_exe().context("locating this executable")?;
            let site_agent = exe.with_file_name("site-agent");
            simulate::run(&opts, &site_agent)?;
            Ok(())
        }
        Command::Export { config, out, site } => {
            let config = FederationConfig::load(&config)?;
            println!("{}", server::export_from_state(&config, &out, site.as_deref())?);
            Ok(())
        }
    }
}

fn init(dir: &Path, name: &str, listen: SocketAddr, sans: &[String], sites: &[String], days: u32) -> Result<()> {
    let toml_path = dir.join("federation.toml");
    if toml_path.exists() {
        bail!("{} exists: refusing to overwrite it", toml_path.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = config::template(name, listen, sites);
    let parsed: FederationConfig = toml::from_str(&text).context("internal: template does not parse")?;
    parsed.validate().context("--sites")?;
    pki::init(&dir.join("pki"), name, sans, days)?;
    fedtalent_certs::write_atomic(&toml_path, text.as_bytes(), 0o644)?;
    println!("federation {name:?} initialised in {}", dir.display());
    println!("  config:      {}", toml_path.display());
    println!("  CA:          {} (keep ca.key private)", dir.join("pki").join(fedtalent_certs::CA_CERT_FILE).display());
    println!("  next: each site runs `site-agent keygen --site NAME`, you run `coordinator sign --csr NAME.csr`");
    Ok(())
}

/// `coordinator report`: the round-time table, the HTML page with `--html`, the progress
/// figure with `--png`.
fn report(config_path: &Path, html: Option<&Path>, png: Option<&Path>) -> Result<()> {
    let config = FederationConfig::load(config_path)?;
    let state = StateDir::open(&config.federation.state_dir)?;
    let log = state.read_metrics_log()?;
    for skipped in &log.skipped {
        eprintln!("warning: {}: {skipped}", state.metrics_path().display());
    }
    if let Some(path) = html {
        let title = format!("fedtalent federation report: {}", config_path.display());
        // As federation.toml spells it: under [plan], [plan.local], ...
        #[derive(serde::Serialize)]
        struct AsInTheConfig<'a> {
            plan: &'a fedtalent_vocab::Plan,
        }
        let plan = toml::to_string_pretty(&AsInTheConfig { plan: &config.plan }).context("writing the plan as TOML")?;
        let page = fedtalent_coordinator::report::html(&title, &plan, &log)?;
        fedtalent_report::write_atomic(path, page.as_bytes())?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = png {
        fedtalent_coordinator::server::write_progress_png_to(&log.lines, path)?;
        println!("wrote {}", path.display());
    }
    let rows = fedtalent_coordinator::report::breakdowns(&log.lines);
    anyhow::ensure!(!rows.is_empty(), "no completed round in {}", config.federation.state_dir.display());
    print!("{}", fedtalent_coordinator::report::format_table(&rows));
    Ok(())
}

fn serve(config_path: &Path, tensorboard: Option<&Path>) -> Result<()> {
    let config = FederationConfig::load(config_path)?;
    let pki_dir = config.federation.pki_dir.clone();
    let read = |f: &str| {
        std::fs::read_to_string(pki_dir.join(f)).with_context(|| format!("reading {}", pki_dir.join(f).display()))
    };
    let key = fedtalent_certs::read_private_key(&pki_dir.join(pki::COORDINATOR_KEY))?;
    let (ca, cert) = (read(fedtalent_certs::CA_CERT_FILE)?, read(pki::COORDINATOR_CERT)?);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let coordinator = Coordinator::open(config)?;
        if let Some(dir) = tensorboard {
            coordinator.log_curves_to(dir)?;
        }
        let server_config = fedtalent_certs::server_config(&ca, &cert, &key, coordinator.allowlist.clone())?;
        let tcp_config = fedtalent_certs::server_tls_config(&ca, &cert, &key, coordinator.allowlist.clone())?;
        // Removing a site from federation.toml locks it out within 2 s, without a restart.
        tokio::spawn(coordinator.clone().watch_config(config_path.to_path_buf(), std::time::Duration::from_secs(2)));
        coordinator.serve_with_tcp(server_config, Some(tcp_config)).await
    })
}

fn status(config_path: &Path) -> Result<()> {
    let config = FederationConfig::load(config_path)?;
    match admin_request(&config, AdminRequest::Status) {
        Ok(Message::AdminReply(AdminReply::Status(report))) => {
            print_status(&report);
            print_privacy(&config, report.current_round);
            Ok(())
        }
        Ok(other) => bail!("unexpected reply {}", other.kind()),
        Err(e) => {
            eprintln!("coordinator not reachable ({e:#}); reading {}", config.federation.state_dir.display());
            offline_status(&config)
        }
    }
}

/// `[plan.privacy]`'s account after `rounds` released rounds (ε is a function of the plan and
/// the round count alone: every site takes part in every round).
fn print_privacy(config: &FederationConfig, rounds: u32) {
    if let Some(p) = config.plan.privacy.as_ref().filter(|p| p.differential()) {
        let budget = p.epsilon_budget.map_or(String::new(), |b| format!(" of a budget of {b}"));
        println!(
            "differential privacy: (ε, δ) = ({:.3}, {:e}) spent{budget} (clip {}, noise multiplier {}); \
             {} rounds at ε {:.3} in all",
            p.epsilon(rounds),
            p.delta,
            p.clip_norm,
            p.noise_multiplier,
            config.plan.rounds_to_run(),
            p.epsilon(config.plan.rounds_to_run())
        );
    }
}

fn print_status(r: &StatusReport) {
    println!(
        "federation {}: round {}/{} complete{}",
        r.federation,
        r.current_round,
        r.total_rounds,
        if r.running { ", a round is open" } else { "" }
    );
    println!("model digest {}", r.model_digest);
    // The transport after `allowed`: scripts and tests read the first columns by position.
    let header = ["site", "connected", "allowed", "transport", "cases", "last round", "loss"];
    println!(
        "{:<20} {:>9} {:>8} {:>9} {:>7} {:>10} {:>10}",
        header[0], header[1], header[2], header[3], header[4], header[5], header[6]
    );
    for s in &r.sites {
        let round = s.last_round.map_or("-".into(), |v| v.to_string());
        let loss = s.last_train_loss.map_or("-".into(), |v| format!("{v:.4}"));
        let transport = s.transport.map_or("-", |t| t.name());
        println!(
            "{:<20} {:>9} {:>8} {:>9} {:>7} {:>10} {:>10}",
            s.site, s.connected, s.allowed, transport, s.n_cases, round, loss
        );
    }
    if !r.dice.is_empty() {
        println!("{:<32} {:>7}", "class", "Dice");
        for (class, dice) in &r.dice {
            println!("{class:<32} {dice:>7.4}");
        }
    }
}

fn offline_status(config: &FederationConfig) -> Result<()> {
    let state = StateDir::open(&config.federation.state_dir)?;
    match state.latest()? {
        Some((record, _)) => {
            println!(
                "federation {}: round {}/{} complete (digest {})",
                config.federation.name,
                record.round,
                config.plan.rounds_to_run(),
                record.digest
            );
            for c in &record.contributions {
                println!("  {:<20} cases {:>5}  weight {:.4}  loss {:.4}", c.site, c.n_cases, c.weight, c.train_loss);
            }
            print_privacy(config, record.round);
        }
        None => println!("federation {}: no round completed yet", config.federation.name),
    }
    let metrics = state.read_metrics()?;
    let dice: Vec<&DiceLine> = metrics
        .iter()
        .filter_map(|m| match m {
            MetricsLine::Dice(d) => Some(d),
            _ => None,
        })
        .collect();
    if let Some(last) = dice.iter().map(|d| d.round).max() {
        println!("Dice reported in round {last} (of the model of round {}):", last - 1);
        for d in dice.iter().filter(|d| d.round == last) {
            println!("  {:<32} {:.4}", d.class, d.dice);
        }
    }
    Ok(())
}

/// One admin request to the running coordinator, authenticated with the admin certificate.
fn admin_request(config: &FederationConfig, request: AdminRequest) -> Result<Message> {
    let pki_dir = &config.federation.pki_dir;
    let files = ClientPki::read(
        &pki_dir.join(fedtalent_certs::CA_CERT_FILE),
        &pki_dir.join(pki::ADMIN_CERT),
        &pki_dir.join(pki::ADMIN_KEY),
    )?;
    let server_name = pki::coordinator_server_name(pki_dir)?;
    let local = |mut addr: std::net::SocketAddr| {
        if addr.ip().is_unspecified() {
            addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        addr
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let dial = fedtalent_protocol::Dial {
            quic_addr: local(config.federation.listen),
            tcp_addr: local(config.federation.tcp_listen_addr()),
            server_name: &server_name,
            tls: fedtalent_certs::client_tls_config(
                &files.ca_pem,
                &files.cert_pem,
                &files.key_pem,
                fedtalent_certs::ALPN,
            )?,
            choice: config.federation.transport,
            quic_wait: fedtalent_protocol::conn::QUIC_WAIT,
        };
        let dialed = fedtalent_protocol::dial(&dial).await?;
        let reply = fedtalent_protocol::conn::request(&dialed.conn, &Message::Admin(request)).await?;
        dialed.conn.close(0u32.into(), b"done");
        if let Some(endpoint) = dialed.endpoint {
            endpoint.wait_idle().await;
        }
        Ok(reply)
    })
}
