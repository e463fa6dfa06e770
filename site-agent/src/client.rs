//! `site-agent run`: joins the federation and trains on each round.
//!
//! The site drives the conversation: it says `Hello`, then long-polls with `Heartbeat` and gets
//! `RoundStart` when a round is open for it; it downloads the global model when its digest
//! changed, evaluates it every `eval_every` rounds, trains locally, and uploads its backbone and
//! its own heads. A lost connection is retried with exponential back-off; a refusal by the
//! coordinator (certificate, version, dataset) ends the agent with the coordinator's reason.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fedtalent_data::{BatchLoader, ClassRegion};
use fedtalent_model::wire::{self, Parts};
use fedtalent_protocol::{
    quic, read_frame, recv_tensors_digest, write_frame, ClassSpec, ErrorKind, Message, Plan, RecvLimits, TensorDigests,
    TensorSet, Transport, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use tch::Device;
use tracing::{info, warn};

use crate::config::SiteConfig;
use crate::local::{self, LocalData, LocalTrainer, TrainerSpec};

/// Deliberately broken uploads, for the end-to-end tests of the coordinator's validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// A NaN in a backbone tensor.
    Nan,
    /// A backbone tensor with a wrong shape.
    Shape,
    /// Heads named for another site's class.
    ForeignHeads,
    /// An update for a round that is not open.
    StaleRound,
}

pub struct RunOptions {
    pub device: Device,
    pub fault: Option<Fault>,
    /// Exit after this many rounds trained in this process (tests kill sites mid-federation).
    pub max_rounds: Option<u32>,
}

/// A refusal by the coordinator: retrying will not help.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused by the coordinator: {}", self.0)
    }
}

impl std::error::Error for Refused {}

/// State that survives reconnections.
struct Agent {
    config: SiteConfig,
    options: RunOptions,
    data: LocalData,
    classes: Vec<ClassRegion>,
    trainer: Option<LocalTrainer>,
    loader: Option<BatchLoader>,
    normalization: Option<fedtalent_data::Normalization>,
    plan: Option<Plan>,
    /// Digest of the global model the local network currently holds.
    loaded_digest: Option<String>,
    rounds_trained: u32,
    /// Training cases (counted before the batch loader takes them over).
    n_train: u32,
    /// A class of another site (what the foreign-heads fault claims to send).
    foreign_class: Option<String>,
}

enum SessionEnd {
    Finished,
    RoundLimit,
}

pub async fn run(config: SiteConfig, options: RunOptions) -> Result<()> {
    // Before the (long) preprocessing: a key that others can read stops the agent here.
    fedtalent_certs::read_private_key(&config.site.key)?;
    let spacing = config.data.target_spacing;
    let classes = config.data.classes.clone();
    let data = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || local::prepare_data(&config, spacing)).await??
    };
    let n_train = data.train.len() as u32;
    let mut agent = Agent {
        n_train,
        foreign_class: None,
        config,
        options,
        data,
        classes,
        trainer: None,
        loader: None,
        normalization: None,
        plan: None,
        loaded_digest: None,
        rounds_trained: 0,
    };
    let mut backoff = Duration::from_secs(1);
    loop {
        match agent.session(&mut backoff).await {
            Ok(SessionEnd::Finished) => {
                info!("federation finished");
                return Ok(());
            }
            Ok(SessionEnd::RoundLimit) => {
                info!(rounds = agent.rounds_trained, "round limit of this run reached");
                return Ok(());
            }
            Err(e) if e.downcast_ref::<Refused>().is_some() => return Err(e),
            Err(e) => {
                warn!("{e:#}; reconnecting in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

impl Agent {
    async fn connect(&self) -> Result<(quinn::Endpoint, quinn::Connection)> {
        let site = &self.config.site;
        let read = |p: &std::path::Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
        let key = fedtalent_certs::read_private_key(&site.key)?;
        let client = fedtalent_certs::client_config(&read(&site.ca)?, &read(&site.cert)?, &key)?;
        let bind: SocketAddr = if site.coordinator.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint = fedtalent_certs::client_endpoint(bind)?;
        endpoint.set_default_client_config(client);
        let connecting = endpoint.connect(site.coordinator, &site.server_name)?;
        let conn = match tokio::time::timeout(Duration::from_secs(10), connecting).await {
            Err(_) => bail!("no answer from the coordinator at {}", site.coordinator),
            // A TLS alert means the coordinator looked at our certificate and said no.
            Ok(Err(quinn::ConnectionError::ConnectionClosed(close))) if is_tls_refusal(close.error_code) => {
                return Err(Refused(format!("handshake: {close}")).into());
            }
            Ok(Err(quinn::ConnectionError::TransportError(e))) if is_tls_refusal(e.code) => {
                return Err(Refused(format!("handshake: {e}")).into());
            }
            Ok(r) => r.with_context(|| format!("connecting to {}", site.coordinator))?,
        };
        Ok((endpoint, conn))
    }

    async fn session(&mut self, backoff: &mut Duration) -> Result<SessionEnd> {
        let (_endpoint, conn) = self.connect().await?;
        // A coordinator that refuses our certificate closes the connection right after the
        // handshake; the first request then fails with its reason.
        let welcome = quic::request(&conn, &self.hello()).await.map_err(|e| classify_closed(&conn, e))?;
        let Message::Welcome { plan, classes, normalization, current_round, federation } = welcome else {
            return Err(refusal_of(welcome));
        };
        info!(%federation, current_round, classes = classes.len(), "joined the federation");
        *backoff = Duration::from_secs(1);
        self.setup(plan, &classes, normalization).await?;
        loop {
            let reply = quic::request(&conn, &Message::Heartbeat).await.map_err(|e| classify_closed(&conn, e))?;
            match reply {
                Message::Heartbeat => continue,
                Message::RoundStart { round, model_digest, local_steps, step_offset, total_steps, evaluate } => {
                    let work = RoundWork { round, model_digest, local_steps, step_offset, total_steps, evaluate };
                    self.round(&conn, work).await?;
                    if self.options.max_rounds.is_some_and(|m| self.rounds_trained >= m) {
                        conn.close(0u32.into(), b"round limit");
                        return Ok(SessionEnd::RoundLimit);
                    }
                }
                Message::Finished { rounds, model_digest } => {
                    info!(rounds, %model_digest, "the coordinator reports the federation complete");
                    conn.close(0u32.into(), b"finished");
                    return Ok(SessionEnd::Finished);
                }
                other => return Err(refusal_of(other)),
            }
        }
    }

    fn hello(&self) -> Message {
        Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            site: self.config.site.name.clone(),
            classes: self
                .classes
                .iter()
                .map(|c| ClassSpec { name: c.name.clone(), labels: c.labels.clone() })
                .collect(),
            n_train: self.n_train,
            n_val: self.data.val.len() as u32,
            hu_histogram: fedtalent_protocol::HuHistogram {
                min_hu: self.data.histogram.min_hu,
                counts: self.data.histogram.counts.clone(),
            },
            device: format!("{:?}", self.options.device),
        }
    }

    /// Builds the local trainer and batch loader once the plan and normalization are known.
    async fn setup(
        &mut self,
        plan: Plan,
        classes: &[fedtalent_protocol::GlobalClass],
        norm: fedtalent_protocol::Normalization,
    ) -> Result<()> {
        let site = self.config.site.name.clone();
        let ids: Vec<String> = self.classes.iter().map(|c| format!("{site}/{}", c.name)).collect();
        let mine: Vec<String> = classes.iter().filter(|c| c.site == site).map(|c| c.id.clone()).collect();
        if mine != ids {
            return Err(Refused(format!(
                "the federation lists classes {mine:?} for this site, the config has {ids:?}"
            ))
            .into());
        }
        self.foreign_class = classes.iter().find(|c| c.site != site).map(|c| c.id.clone());
        if self.trainer.is_some() {
            if self.plan.as_ref() != Some(&plan) {
                return Err(
                    Refused("the federation plan changed while this agent was running; restart it".into()).into()
                );
            }
            return Ok(());
        }
        let spacing = plan.spacing.map(|v| v as f64);
        if spacing.iter().zip(self.config.data.target_spacing).any(|(a, b)| (a - b).abs() > 1e-6) {
            info!(?spacing, "the federation trains at another spacing than [data].target_spacing; preprocessing again");
            let config = self.config.clone();
            self.data = tokio::task::spawn_blocking(move || local::prepare_data(&config, spacing)).await??;
        }
        let norm = fedtalent_data::Normalization {
            clip_low: norm.clip_low as f64,
            clip_high: norm.clip_high as f64,
            mean: norm.mean as f64,
            std: norm.std as f64,
        };
        let spec = TrainerSpec {
            preset: &plan.preset,
            classes: &self.classes,
            datasets: None,
            class_ids: ids,
            device: self.options.device,
            lr: plan.lr,
            total_steps: plan.rounds as u64 * plan.local_steps as u64,
            dice: plan.dice_mode.parse()?,
            site_decoders: plan.site_decoders,
        };
        let trainer = LocalTrainer::open(spec, &self.config.site.state_dir)?;
        let stream = local::StreamSpec {
            patch: trainer.trainer.net.topology().patch,
            batch: plan.batch,
            norm,
            seed: local::stream_seed(self.config.site.seed, &site),
            threads: self.config.site.threads,
            device: self.options.device,
            start: trainer.state.batches_drawn,
        };
        self.loader = Some(local::batch_loader(vec![std::mem::take(&mut self.data.train)], stream)?);
        self.trainer = Some(trainer);
        self.normalization = Some(norm);
        self.plan = Some(plan);
        Ok(())
    }

    fn transport(&self) -> Transport {
        if self.plan.as_ref().is_some_and(|p| p.bf16_transport) {
            Transport::Bf16
        } else {
            Transport::Native
        }
    }

    async fn round(&mut self, conn: &quinn::Connection, work: RoundWork) -> Result<()> {
        let mut durations = Vec::new();
        let started = Instant::now();
        if self.loaded_digest.as_deref() != Some(work.model_digest.as_str()) {
            self.download(conn, &work.model_digest).await?;
        }
        durations.push(("download".to_string(), started.elapsed().as_millis() as u64));
        // Training and evaluation are blocking tensor work: run them off the async threads so
        // that QUIC keeps answering (keep-alives) meanwhile.
        let mut trainer = self.trainer.take().expect("set up");
        let mut loader = self.loader.take().expect("set up");
        let val = std::mem::take(&mut self.data.val);
        let norm = self.normalization.expect("set up");
        let plan = self.plan.as_ref().expect("set up");
        let policy = plan.local;
        let evaluate = work.evaluate;
        let local_work = local::RoundWork {
            round: work.round,
            steps: work.local_steps,
            step_offset: work.step_offset,
            total_steps: work.total_steps,
            last: work.round == plan.rounds,
        };
        let result = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let dice = if evaluate && !val.is_empty() { trainer.evaluate(&val, &norm) } else { Ok(Vec::new()) };
            let eval_ms = t.elapsed().as_millis() as u64;
            let t = Instant::now();
            let loss = dice.and_then(|dice| Ok((dice, trainer.train_round(&mut loader, &policy, &local_work)?)));
            (trainer, loader, val, loss, eval_ms, t.elapsed().as_millis() as u64)
        })
        .await?;
        let (trainer, loader, val, outcome, eval_ms, train_ms) = result;
        self.trainer = Some(trainer);
        self.loader = Some(loader);
        self.data.val = val;
        let (dice, loss) = outcome?;
        durations.push(("evaluate".into(), eval_ms));
        durations.push(("train".into(), train_ms));
        self.loaded_digest = None; // the local network now holds the site's update
        let t = Instant::now();
        let accepted = self.upload(conn, &work, loss, dice, durations).await?;
        let path = conn.stats().path;
        info!(
            round = work.round,
            loss,
            upload_ms = t.elapsed().as_millis() as u64,
            accepted,
            datagram_bytes = path.current_mtu,
            rtt_ms = path.rtt.as_secs_f64() * 1e3,
            lost_packets = path.lost_packets,
            "round done"
        );
        self.trainer.as_mut().expect("set up").save(work.round)?;
        self.rounds_trained += 1;
        Ok(())
    }

    /// Fetches the global backbone and this site's heads and loads them into the local network.
    async fn download(&mut self, conn: &quinn::Connection, digest: &str) -> Result<()> {
        let site = self.config.site.name.clone();
        let trainer = self.trainer.as_mut().expect("set up");
        let manifest =
            wire::parts_manifest(&trainer.trainer.net, &trainer.class_ids, &trainer.selection(&site).decoders);
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(&mut send, &Message::ModelRequest { digest: digest.to_string(), full: false }).await?;
        send.finish()?;
        // Bound to the announcement: a stream of any other model is refused (the session
        // ends with this error and is retried after its back-off).
        let limits = RecvLimits { expected_digest: Some(digest.to_string()), ..RecvLimits::for_manifest(manifest) };
        let (set, _) = recv_tensors_digest(&mut recv, &limits)
            .await
            .with_context(|| format!("downloading the global model {digest} announced in RoundStart"))?;
        let parts = Parts::from_wire(&set)?;
        let rows = trainer.rows();
        parts.apply(&mut trainer.trainer.net, &|id| rows.iter().find(|(c, _)| c == id).map(|(_, r)| *r), &|s| {
            (s == site).then_some(0)
        })?;
        self.loaded_digest = Some(digest.to_string());
        Ok(())
    }

    async fn upload(
        &mut self,
        conn: &quinn::Connection,
        work: &RoundWork,
        loss: f32,
        dice: Vec<(String, f32)>,
        durations: Vec<(String, u64)>,
    ) -> Result<bool> {
        // A class with neither prediction nor label in the validation cases has no Dice (NaN);
        // the coordinator refuses non-finite metrics, so such a class is left out of the report.
        let dice: Vec<(String, f32)> = dice.into_iter().filter(|(_, d)| d.is_finite()).collect();
        let trainer = self.trainer.as_ref().expect("set up");
        let mut set = wire::parts_to_wire(&trainer.trainer.net, &trainer.selection(&self.config.site.name));
        let mut round = work.round;
        if let Some(fault) = self.options.fault {
            warn!(?fault, "injecting a fault into this upload (test mode)");
            inject(fault, &mut set, &mut round, self.foreign_class.as_deref().unwrap_or("unknown/class"));
        }
        // Hash once: the digest announced in the header is reused while streaming.
        let mut digests = TensorDigests::new(self.transport());
        let header = Message::UpdateHeader {
            round,
            n_cases: self.n_train,
            train_loss: loss,
            dice,
            payload_digest: set.wire_digest_cached(&mut digests),
            durations_ms: durations,
        };
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(&mut send, &header).await?;
        // The coordinator may refuse (a stale round) before reading the payload.
        let sent = quic::send_tensors_shared(&mut send, Arc::new(set), &mut digests).await;
        let _ = send.finish();
        let reply = read_frame(&mut recv, MAX_FRAME_BYTES).await;
        match reply {
            Ok(Message::Ack { accepted: true, .. }) => Ok(true),
            Ok(Message::Ack { accepted: false, reason, .. }) => {
                warn!(round = work.round, "update refused: {}", reason.unwrap_or_default());
                Ok(false)
            }
            Ok(other) => Err(refusal_of(other)),
            Err(e) => Err(anyhow!("no acknowledgement of the update ({e}; sending: {sent:?})")),
        }
    }
}

/// Breaks an upload on purpose (see [`Fault`]).
fn inject(fault: Fault, set: &mut TensorSet, round: &mut u32, foreign_class: &str) {
    match fault {
        Fault::Nan => {
            let t = &mut set.tensors[0];
            t.data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        }
        Fault::Shape => {
            let t = &mut set.tensors[0];
            t.shape = vec![t.data.len() as u64 / 4];
        }
        Fault::ForeignHeads => {
            for t in &mut set.tensors {
                if let Some((_, tensor)) = wire::parse_head_name(&t.name) {
                    t.name = wire::head_tensor_name(foreign_class, tensor);
                }
            }
            // Keep one copy per name (a site with several classes would otherwise repeat names).
            let mut seen = std::collections::BTreeSet::new();
            set.tensors.retain(|t| seen.insert(t.name.clone()));
        }
        Fault::StaleRound => *round = round.saturating_sub(1),
    }
}

struct RoundWork {
    round: u32,
    model_digest: String,
    local_steps: u32,
    step_offset: u64,
    total_steps: u64,
    evaluate: bool,
}

fn refusal_of(message: Message) -> anyhow::Error {
    match message {
        Message::Error { kind, reason }
            if matches!(kind, ErrorKind::NotAllowed | ErrorKind::VersionMismatch | ErrorKind::BadDataset) =>
        {
            Refused(format!("{kind:?}: {reason}")).into()
        }
        Message::Error { kind, reason } => anyhow!("coordinator error {kind:?}: {reason}"),
        other => anyhow!("unexpected {} from the coordinator", other.kind()),
    }
}

/// QUIC carries TLS alerts as transport error codes 0x100..0x200 (RFC 9001 §4.8): the peer's
/// TLS stack rejected us (an unknown CA, a certificate not on the allowlist, an expired one).
fn is_tls_refusal(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// Turns "the connection was closed by the coordinator because of our certificate" into a refusal.
fn classify_closed(conn: &quinn::Connection, e: quic::QuicError) -> anyhow::Error {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ConnectionClosed(c)) if is_tls_refusal(c.error_code) => {
            Refused(format!("handshake: {c}")).into()
        }
        Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == 1u32.into() => {
            Refused(format!("closed by the coordinator: {}", String::from_utf8_lossy(&c.reason))).into()
        }
        _ => anyhow!("{e}"),
    }
}
