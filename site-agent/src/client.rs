//! `site-agent run`: joins the federation and trains on each round.
//!
//! The agent goes through two phases, each a type: joining (it holds its preprocessed cases and
//! says `Hello` until the coordinator welcomes it; the `Welcome` comes once every site
//! registered) and training ([`Training`]: the trainer and batch loader built from the plan,
//! kept across reconnections). Training, it long-polls with `Heartbeat` and gets `RoundStart`
//! when a round is open for it; it downloads the global model when its digest changed,
//! evaluates it when asked, trains locally, and uploads its backbone and its own heads. A lost
//! connection is retried with exponential back-off (saying `Hello` again, and the plan must
//! not have changed); a refusal by the coordinator (certificate, version, dataset) ends the
//! agent with the coordinator's reason.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fedtalent_data::{BatchLoader, PreprocessedCase};
use fedtalent_model::wire::{self, Parts};
use fedtalent_model::Topology;
use fedtalent_protocol::conn::{self, Connection, Dial, DialError, Dialed};
use fedtalent_protocol::{
    close, quic, read_frame, recv_tensors_resumable, write_frame, Ack, Finished, Held, Hello, Message, ModelRequest,
    PartialSet, PhaseTimings, Plan, RecvLimits, RoundStart, TensorDigests, TensorSet, UpdateHeader, Welcome,
    MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use fedtalent_vocab::{class_id, CtNormalization, Privacy};
use tch::Device;
use tracing::{info, warn};

use crate::config::SiteConfig;
use crate::curves::LocalCurves;
use crate::local::{self, LocalData, LocalTrainer, TrainerSpec};
use crate::{local_dp, secagg};

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
    /// No progress bar (for service managers).
    pub quiet: bool,
    /// Local curves as TensorBoard event files in this folder.
    pub tensorboard: Option<PathBuf>,
}

/// A refusal by the coordinator: retrying will not help.
#[derive(Debug, thiserror::Error)]
#[error("refused by the coordinator: {0}")]
struct Refused(String);

/// What the agent says in every `Hello`; fixed for the whole run.
struct Agent {
    config: SiteConfig,
    options: RunOptions,
    /// Training cases (counted before the batch loader takes them over).
    n_train: u32,
    n_val: u32,
    histogram: fedtalent_vocab::HuHistogram,
    /// The input channels its dataset declares.
    channels: fedtalent_vocab::InputChannels,
}

/// A connection to the coordinator over QUIC or TLS over TCP (a QUIC endpoint must live as long
/// as its connection).
struct Session {
    _endpoint: Option<quinn::Endpoint>,
    conn: Connection,
}

/// The training phase: what the plan fixed, and the local trainer.
struct Training {
    plan: Plan,
    normalization: CtNormalization,
    trainer: LocalTrainer,
    loader: BatchLoader,
    /// The validation cases the global model is evaluated on.
    val: Vec<PreprocessedCase>,
    /// Digest of the global model the local network currently holds.
    loaded_digest: Option<String>,
    /// A class of another site (what the foreign-heads fault claims to send).
    foreign_class: Option<String>,
    rounds_trained: u32,
    /// What arrived of a cut download, resumed by the next request for the same model.
    download: PartialSet,
    /// The update whose upload was cut in transit, sent again (resumed) when its round is offered again.
    pending: Option<PendingUpdate>,
}

/// An update whose upload was cut in transit. When its round is offered again after the
/// reconnection, this very update (same payload digest) is sent again instead of training
/// anew, so that the coordinator resumes it from what it kept and it counts once, in its
/// round. Dropped once acknowledged, or when another round is offered.
struct PendingUpdate {
    round: u32,
    header: UpdateHeader,
    set: Arc<TensorSet>,
    digests: TensorDigests,
}

enum SessionEnd {
    Finished,
    RoundLimit,
}

pub async fn run(config: SiteConfig, options: RunOptions) -> Result<()> {
    // Before the (long) preprocessing: a key that others can read stops the agent here.
    fedtalent_certs::read_private_key(&config.site.key)?;
    let spacing = config.data.target_spacing;
    let mut data = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || local::prepare_data(&config, spacing)).await??
    };
    let agent = Agent {
        n_train: data.train.len() as u32,
        n_val: data.val.len() as u32,
        histogram: data.histogram.clone(),
        channels: data.channels.clone(),
        config,
        options,
    };
    let mut backoff = Duration::from_secs(1);
    // Joining: until the coordinator welcomes this site and the trainer is built.
    let (mut session, mut training) = loop {
        match agent.join(&mut data, &mut backoff).await {
            Ok(joined) => break joined,
            Err(e) => agent.back_off(e, &mut backoff).await?,
        }
    };
    drop(data);
    // Training: rounds until the federation finishes; a lost connection joins again.
    loop {
        match agent.train_rounds(&session, &mut training).await {
            Ok(SessionEnd::Finished) => {
                info!("federation finished");
                return Ok(());
            }
            Ok(SessionEnd::RoundLimit) => {
                info!(rounds = training.rounds_trained, "round limit of this run reached");
                return Ok(());
            }
            Err(e) => agent.back_off(e, &mut backoff).await?,
        }
        session = loop {
            match agent.rejoin(&mut training, &mut backoff).await {
                Ok(session) => break session,
                Err(e) => agent.back_off(e, &mut backoff).await?,
            }
        };
    }
}

impl Agent {
    /// After a failed session: a refusal ends the agent, anything else waits `backoff` (doubled,
    /// up to 30 s) before the next try.
    async fn back_off(&self, e: anyhow::Error, backoff: &mut Duration) -> Result<()> {
        if e.downcast_ref::<Refused>().is_some() {
            return Err(e);
        }
        warn!("{e:#}; reconnecting in {backoff:?}");
        tokio::time::sleep(*backoff).await;
        *backoff = (*backoff * 2).min(Duration::from_secs(30));
        Ok(())
    }

    /// Connects over `[site].transport`: QUIC, then TLS over TCP when QUIC gets no answer within
    /// [`fedtalent_protocol::conn::QUIC_WAIT`] (`auto`). A TLS refusal ends the agent.
    async fn connect(&self) -> Result<Session> {
        let site = &self.config.site;
        let read = |p: &std::path::Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
        let key = fedtalent_certs::read_private_key(&site.key)?;
        let tls =
            fedtalent_certs::client_tls_config(&read(&site.ca)?, &read(&site.cert)?, &key, fedtalent_certs::ALPN)?;
        let dial = Dial {
            quic_addr: site.coordinator,
            tcp_addr: site.coordinator_tcp.unwrap_or(site.coordinator),
            server_name: &site.server_name,
            tls,
            choice: site.transport,
            quic_wait: fedtalent_protocol::conn::QUIC_WAIT,
        };
        match fedtalent_protocol::dial(&dial).await {
            Ok(Dialed { conn, endpoint }) => {
                info!(transport = %conn.kind(), coordinator = %conn.remote_address(), "connected");
                Ok(Session { _endpoint: endpoint, conn })
            }
            Err(DialError::Refused(reason)) => Err(Refused(reason).into()),
            Err(DialError::Failed(e)) => bail!("no connection to the coordinator: {e}"),
        }
    }

    /// Connects and says `Hello`; returns the connection and the coordinator's `Welcome`,
    /// after checking that it lists this site's classes as configured.
    async fn hello(&self, backoff: &mut Duration) -> Result<(Session, Welcome)> {
        let session = self.connect().await?;
        let conn = &session.conn;
        // A coordinator that refuses our certificate closes the connection right after the
        // handshake; the first request then fails with its reason.
        let reply =
            conn::request(conn, &Message::Hello(self.hello_message())).await.map_err(|e| classify_closed(conn, e))?;
        let Message::Welcome(welcome) = reply else {
            return Err(refusal_of(reply));
        };
        info!(federation = %welcome.federation, current_round = welcome.current_round, classes = welcome.classes.len(), "joined the federation");
        *backoff = Duration::from_secs(1);
        let site = &self.config.site.name;
        let ids = self.class_ids();
        let mine: Vec<String> = welcome.classes.iter().filter(|c| &c.site == site).map(|c| c.id.clone()).collect();
        if mine != ids {
            return Err(Refused(format!(
                "the federation lists classes {mine:?} for this site, the config has {ids:?}"
            ))
            .into());
        }
        Ok((session, welcome))
    }

    fn hello_message(&self) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            site: self.config.site.name.clone(),
            classes: self.config.data.classes.clone(),
            n_train: self.n_train,
            n_val: self.n_val,
            hu_histogram: self.histogram.clone(),
            device: format!("{:?}", self.options.device),
            channels: self.channels.clone(),
            exclusive_classes: self.config.site.exclusive_classes,
        }
    }

    /// Global ids of this site's classes, in the order of its local heads.
    fn class_ids(&self) -> Vec<String> {
        self.config.data.classes.iter().map(|c| class_id(&self.config.site.name, &c.name)).collect()
    }

    /// The first `Hello`: builds the local trainer and batch loader from the plan and the
    /// normalization (the cases leave `data` for the loader only once the trainer is built).
    async fn join(&self, data: &mut LocalData, backoff: &mut Duration) -> Result<(Session, Training)> {
        let (session, welcome) = self.hello(backoff).await?;
        let Welcome { plan, classes, normalization, .. } = welcome;
        let site = self.config.site.name.clone();
        let topology =
            Topology::preset(&plan.preset).with_context(|| format!("the federation's preset {:?}", plan.preset))?;
        let spacing = topology.spacing;
        if spacing.iter().zip(self.config.data.target_spacing).any(|(a, b)| (a - b).abs() > 1e-6) {
            info!(?spacing, "the federation trains at another spacing than [data].target_spacing; preprocessing again");
            let config = self.config.clone();
            *data = tokio::task::spawn_blocking(move || local::prepare_data(&config, spacing)).await??;
        }
        let spec = TrainerSpec {
            preset: &plan.preset,
            classes: &self.config.data.classes,
            datasets: None,
            class_ids: self.class_ids(),
            channels: &data.channels,
            device: self.options.device,
            optimizer: plan.optimizer,
            lr: plan.local_lr(),
            total_steps: plan.total_steps(),
            dice: plan.dice_mode,
            exclusive: vec![self.config.site.exclusive_classes],
            site_decoder: plan.per_site_decoders.then_some(site.as_str()),
            site_encoder_stages: plan.site_encoder_stages as usize,
        };
        let mut trainer = LocalTrainer::open(spec, &self.config.site.state_dir)?;
        trainer.curves = LocalCurves::new(self.options.quiet, self.options.tensorboard.as_deref())?;
        let stream = local::StreamSpec {
            patch: trainer.trainer.net.topology().patch,
            batch: plan.batch,
            norm: normalization,
            seed: local::stream_seed(self.config.site.seed, &site),
            threads: self.config.site.threads,
            device: self.options.device,
            start: trainer.state.batches_drawn,
        };
        let loader = local::batch_loader(vec![std::mem::take(&mut data.train)], stream)?;
        let training = Training {
            foreign_class: classes.iter().find(|c| c.site != site).map(|c| c.id.clone()),
            plan,
            normalization,
            trainer,
            loader,
            val: std::mem::take(&mut data.val),
            loaded_digest: None,
            rounds_trained: 0,
            download: PartialSet::default(),
            pending: None,
        };
        Ok((session, training))
    }

    /// A `Hello` after a lost connection: the federation must be the one the trainer was built for.
    async fn rejoin(&self, training: &mut Training, backoff: &mut Duration) -> Result<Session> {
        let (session, welcome) = self.hello(backoff).await?;
        if welcome.plan != training.plan || welcome.normalization != training.normalization {
            return Err(Refused("the federation plan changed while this agent was running; restart it".into()).into());
        }
        Ok(session)
    }

    /// Polls for work and trains each round offered, until the federation finishes, the round
    /// limit of this run is reached, or the connection fails.
    async fn train_rounds(&self, session: &Session, training: &mut Training) -> Result<SessionEnd> {
        let conn = &session.conn;
        loop {
            let reply = conn::request(conn, &Message::Heartbeat).await.map_err(|e| classify_closed(conn, e))?;
            match reply {
                Message::Heartbeat => continue,
                Message::RoundStart(start) => {
                    self.round(conn, training, start).await?;
                    if self.options.max_rounds.is_some_and(|m| training.rounds_trained >= m) {
                        conn.close(close::DONE, b"round limit");
                        return Ok(SessionEnd::RoundLimit);
                    }
                }
                Message::Finished(Finished { rounds, model_digest }) => {
                    info!(rounds, %model_digest, "the coordinator reports the federation complete");
                    conn.close(close::DONE, b"finished");
                    return Ok(SessionEnd::Finished);
                }
                other => return Err(refusal_of(other)),
            }
        }
    }

    /// One round: download the global model if needed, evaluate it if asked, train, upload; or,
    /// when this round's upload was cut, resume that upload.
    async fn round(&self, conn: &Connection, training: &mut Training, start: RoundStart) -> Result<()> {
        if let Some(pending) = training.pending.take() {
            if pending.round == start.round {
                let accepted = send_update(conn, &mut training.pending, pending).await?;
                info!(round = start.round, accepted, transport = %conn.kind(), "round done (its cut upload resumed)");
                training.trainer.save(start.round)?;
                training.rounds_trained += 1;
                return Ok(());
            }
            warn!(
                round = pending.round,
                open = start.round,
                "dropped the update whose upload was cut: its round is over"
            );
        }
        // What arrived of a cut download of an older model is of no use any more.
        if training.download.key().is_some_and(|k| k != start.model_digest) {
            training.download.clear();
        }
        let mut durations = PhaseTimings::default();
        let started = Instant::now();
        if training.loaded_digest.as_deref() != Some(start.model_digest.as_str()) {
            training.download(conn, &start.model_digest).await?;
        }
        durations.download = started.elapsed().as_millis() as u64;
        let mut secure = None;
        let request = |m: Message| async move { conn::request(conn, &m).await };
        if let Some(round) = start.secagg {
            let net = &training.trainer.trainer.net;
            match secagg::key_stages(&request, &training.plan, start.round, round, net).await? {
                Some(s) => secure = Some(s),
                // Dropped from the round's secure aggregation: it waits for the next round.
                None => return Ok(()),
            }
        }
        // Local DP: the change leaves the site clipped and noised, measured from this model.
        let local_dp = training.plan.privacy.filter(Privacy::noised_by_sites);
        let round_start = local_dp.map(|_| local_dp::RoundStartBackbone::of(&training.trainer.trainer.net));
        let work = local::RoundWork {
            round: start.round,
            steps: start.local_steps,
            step_offset: start.step_offset,
            total_steps: start.total_steps,
            last: start.round == training.plan.rounds_to_run(),
        };
        // Evaluation and training are blocking tensor work: `block_in_place` hands this
        // worker's other tasks (QUIC keep-alives) to the runtime's other threads meanwhile.
        let (dice, loss) = tokio::task::block_in_place(|| training.evaluate_and_train(&start, &work, &mut durations))?;
        training.loaded_digest = None; // the local network now holds the site's update
        if let (Some(p), Some(round_start)) = (local_dp, &round_start) {
            let norm = round_start.privatize(&mut training.trainer.trainer.net, &p)?;
            info!(
                round = start.round,
                norm,
                clip_norm = p.clip_norm,
                noise_std = p.site_noise_std(),
                "backbone change clipped and noised (local DP)"
            );
        }
        let t = Instant::now();
        let accepted = self.upload(conn, training, start.round, loss, dice, durations, &mut secure).await?;
        if let Some(secure) = secure.filter(|_| accepted) {
            secure.unmask(&request).await?;
        }
        let path = match conn {
            Connection::Quic(c) => Some(c.stats().path),
            Connection::Tcp(_) => None,
        };
        info!(
            round = start.round,
            loss,
            upload_ms = t.elapsed().as_millis() as u64,
            accepted,
            transport = %conn.kind(),
            datagram_bytes = path.map(|p| p.current_mtu),
            rtt_ms = path.map(|p| p.rtt.as_secs_f64() * 1e3),
            lost_packets = path.map(|p| p.lost_packets),
            "round done"
        );
        training.trainer.save(start.round)?;
        training.rounds_trained += 1;
        Ok(())
    }

    /// Uploads the round's update. Without secure aggregation a cut upload stays pending in
    /// `training`, to be resumed (with secure aggregation the key stages cannot be replayed:
    /// the site drops out of that round).
    #[allow(clippy::too_many_arguments)]
    async fn upload(
        &self,
        conn: &Connection,
        training: &mut Training,
        round: u32,
        loss: f32,
        dice: Vec<(String, f32)>,
        durations: PhaseTimings,
        secure: &mut Option<secagg::SiteSecAgg>,
    ) -> Result<bool> {
        // A class with neither prediction nor label in the validation cases has no Dice (NaN);
        // the coordinator refuses non-finite metrics, so such a class is left out of the report.
        let dice: Vec<(String, f32)> = dice.into_iter().filter(|(_, d)| d.is_finite()).collect();
        let (net, selection) = (&training.trainer.trainer.net, &training.trainer.selection);
        let mut set = match secure.as_mut() {
            Some(s) => s.masked_upload(&training.plan, net, selection, self.n_train)?,
            None => wire::parts_to_wire(net, selection),
        };
        let mut sent_round = round;
        if let Some(fault) = self.options.fault {
            warn!(?fault, "injecting a fault into this upload (test mode)");
            inject(fault, &mut set, &mut sent_round, training.foreign_class.as_deref().unwrap_or("unknown/class"));
        }
        // Hash once: the digest announced in the header is reused while streaming.
        let mut digests = TensorDigests::new(training.plan.transport);
        let header = UpdateHeader {
            round: sent_round,
            n_cases: self.n_train,
            train_loss: loss,
            dice,
            payload_digest: set.wire_digest_cached(&mut digests),
            durations_ms: durations,
            resume: false,
        };
        let update = PendingUpdate { round, header, set: Arc::new(set), digests };
        let mut pending = None;
        let sent = send_update(conn, &mut pending, update).await;
        if secure.is_none() {
            training.pending = pending;
        }
        sent
    }
}

/// Sends `update` (resuming it when an earlier upload of it was cut) and reads its `Ack`:
/// whether it was accepted. A failure in transit leaves it in `pending`, marked for resumption.
async fn send_update(conn: &Connection, pending: &mut Option<PendingUpdate>, update: PendingUpdate) -> Result<bool> {
    let round = update.round;
    let mut update = update;
    let result = try_send_update(conn, &mut update).await;
    if result.is_err() {
        update.header.resume = true;
        *pending = Some(update);
    }
    match result? {
        Ack { refusal: None, .. } => Ok(true),
        Ack { refusal: Some(refusal), .. } => {
            warn!(round, "update refused: {refusal}");
            Ok(false)
        }
    }
}

async fn try_send_update(conn: &Connection, update: &mut PendingUpdate) -> Result<Ack> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, &Message::UpdateHeader(update.header.clone())).await?;
    // Resuming, the coordinator says first what it kept of this update (or refuses it).
    let held = if update.header.resume {
        match read_frame(&mut recv, MAX_FRAME_BYTES).await? {
            Message::Resume(held) => held,
            Message::Ack(ack) => return Ok(ack),
            other => return Err(refusal_of(other)),
        }
    } else {
        Held::default()
    };
    // The coordinator may refuse (a stale round) before reading the payload.
    let sent = conn::send_tensors_shared(&mut send, update.set.clone(), &mut update.digests, &held).await;
    let _ = send.finish();
    if let Ok(sent) = &sent {
        if update.header.resume {
            info!(round = update.round, held_bytes = held.bytes(), sent_bytes = sent.bytes, "resumed the cut upload");
        }
    }
    match read_frame(&mut recv, MAX_FRAME_BYTES).await {
        Ok(Message::Ack(ack)) => Ok(ack),
        Ok(other) => Err(refusal_of(other)),
        Err(e) => Err(anyhow!("no acknowledgement of the update ({e}; sending: {:?})", sent.map(|s| s.bytes))),
    }
}

impl Training {
    /// Fetches the global backbone and this site's heads and loads them into the local network.
    async fn download(&mut self, conn: &Connection, digest: &str) -> Result<()> {
        let net = &mut self.trainer.trainer.net;
        let manifest = wire::parts_manifest(net, &self.trainer.selection);
        let (mut send, mut recv) = conn.open_bi().await?;
        // What arrived of a cut download of this model is not asked for again.
        let held = self.download.held(digest);
        let request = ModelRequest { digest: digest.to_string(), full: false, held: held.clone() };
        write_frame(&mut send, &Message::ModelRequest(request)).await?;
        send.finish()?;
        // Bound to the announcement: a stream of any other model is refused (the session
        // ends with this error and is retried after its back-off, resuming from what arrived).
        let limits = RecvLimits { expected_digest: Some(digest.to_string()), ..RecvLimits::for_manifest(manifest) };
        let received = recv_tensors_resumable(&mut recv, &limits, &mut self.download)
            .await
            .with_context(|| format!("downloading the global model {digest} announced in RoundStart"))?;
        info!(
            digest,
            model_bytes = received.wire_bytes,
            received_bytes = received.received_bytes,
            attempts = received.attempts,
            held_bytes = held.bytes(),
            "global model downloaded"
        );
        Parts::from_wire(&received.set)?.apply(net, &self.trainer.selection)?;
        self.loaded_digest = Some(digest.to_string());
        Ok(())
    }

    /// The round's blocking work: Dice of the downloaded global model on the validation cases
    /// (when `start` asks for it), then local training; returns the Dice and the mean loss.
    fn evaluate_and_train(
        &mut self,
        start: &RoundStart,
        work: &local::RoundWork,
        durations: &mut PhaseTimings,
    ) -> Result<(Vec<(String, f32)>, f32)> {
        let t = Instant::now();
        let dice = if start.evaluate && !self.val.is_empty() {
            self.trainer.evaluate(&self.val, &self.normalization)?
        } else {
            Vec::new()
        };
        durations.evaluate = t.elapsed().as_millis() as u64;
        let t = Instant::now();
        let loss = self.trainer.train_round(&mut self.loader, &self.plan.local, work)?;
        durations.train = t.elapsed().as_millis() as u64;
        self.trainer.curves.round(start.round, loss, &dice);
        Ok((dice, loss))
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

fn refusal_of(message: Message) -> anyhow::Error {
    match message {
        Message::Error(refusal) if refusal.is_final() => Refused(refusal.to_string()).into(),
        Message::Error(refusal) => anyhow!("coordinator error {refusal}"),
        other => anyhow!("unexpected {} from the coordinator", other.kind()),
    }
}

/// Turns "the connection was closed by the coordinator because of our certificate" (a TLS
/// refusal, or a close with `close::REFUSED`) into a refusal, on either transport.
fn classify_closed(conn: &Connection, e: quic::QuicError) -> anyhow::Error {
    match conn.refusal() {
        Some(reason) => Refused(reason).into(),
        None => anyhow!("{e}"),
    }
}
