//! `coordinator serve`: accepts sites over QUIC + mutual TLS, registers them, runs rounds,
//! validates and aggregates updates, checkpoints, and answers the operator's CLI.
//!
//! Every request is one bidirectional stream opened by the peer: `Hello` → `Welcome`;
//! `Heartbeat` (a site's long poll for work) → `RoundStart` | `Heartbeat` | `Finished`;
//! `ModelRequest` → tensor stream; `UpdateHeader` + tensor stream → `Ack`; `Admin` → `AdminReply`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use fedtalent_certs::Allowlist;
use fedtalent_model::wire::{self, Parts};
use fedtalent_model::{ClassInfo, CtNormalization, ModelManifest, MultiTalentNet, Topology};
use fedtalent_protocol::{
    read_frame, recv_tensors_digest, write_frame, AdminReply, AdminRequest, ClassSpec, ErrorKind, FrameError,
    GlobalClass, Message, Normalization, Plan, RecvLimits, SiteStatus, StatusReport, TensorDigests, Transport,
    MAX_FRAME_BYTES,
};
use tch::Device;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::aggregate::{self, ServerState, Update};
use crate::config::{FederationConfig, ADMIN_IDENTITY};
use crate::state::{Contribution, RoundRecord, Setup, StateDir, CHECKPOINT_SERVER};

/// "No timeout" for waits that end only on an event (ten years, far from Instant overflow).
const FOREVER: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Handshakes one remote IP may start in a burst, and per second after it. A handshake costs
/// the coordinator a signature and a certificate-chain verification; a site connects a few
/// times a day (plus reconnects with back-off), the operator's CLI once per command. The
/// address is not validated yet at this point (UDP): a spoofer could spend a site's budget,
/// which delays that site's next connection by seconds, never its membership.
const HANDSHAKE_BURST: f64 = 20.0;
const HANDSHAKE_PER_SECOND: f64 = 1.0;

/// Requests of one site (over all its connections) the coordinator serves at once: a site
/// needs two or three (its poll, a download or an upload); more only pin memory and tasks.
const MAX_STREAMS_PER_SITE: usize = 8;

/// How long a request frame may take to arrive once its stream is open.
const REQUEST_WAIT: Duration = Duration::from_secs(30);

/// How long a site's poll waits for work before the coordinator answers `Heartbeat`.
const POLL_WAIT: Duration = Duration::from_secs(10);

struct Registration {
    classes: Vec<ClassSpec>,
    n_train: u32,
    /// Unchecked as received; [`Coordinator::register`] checks it before storing.
    histogram: fedtalent_data::HuHistogram,
    device: String,
}

struct OpenRound {
    round: u32,
    opened: Instant,
    updates: BTreeMap<String, Update>,
    /// Sites whose update of this round is arriving: the slot is taken before the payload is
    /// read, so that two concurrent uploads of one site cannot both be acknowledged.
    arriving: BTreeSet<String>,
}

#[derive(Default)]
struct SiteState {
    /// Its open connections by [`quinn::Connection::stable_id`], so that a removal can close them.
    connections: BTreeMap<usize, quinn::Connection>,
    /// Its requests being served now (see [`MAX_STREAMS_PER_SITE`]).
    streams: usize,
    /// Its Hello was accepted by this run of the coordinator: only then may it poll, download
    /// or upload (membership is checked per request, not only at Hello).
    joined: bool,
    last_round: Option<u32>,
    last_loss: Option<f32>,
}

/// Everything that changes while serving, behind one lock (sections are short, no awaits).
struct Inner {
    registrations: BTreeMap<String, Registration>,
    setup: Option<Setup>,
    global: Option<MultiTalentNet>,
    /// The server optimizer's state over `global`'s backbone.
    server: ServerState,
    digest: String,
    /// Per site, the digest of its part of `global` as its download carries it (what its
    /// `RoundStart` announces, so that the site can bind the download to the announcement);
    /// filled on demand, emptied whenever `global` changes.
    site_digests: BTreeMap<String, String>,
    /// Per-tensor wire digests of `global` (filled as it is hashed or sent), so that streaming
    /// it to N sites hashes each tensor once, not N times.
    wire_digests: TensorDigests,
    completed: u32,
    open: Option<OpenRound>,
    launched: bool,
    sites: BTreeMap<String, SiteState>,
    /// Sites of `[federation].sites` (as at start) that the operator removed since: they are
    /// no longer members, and rounds neither wait for nor count them.
    removed: BTreeSet<String>,
    last_dice: BTreeMap<String, f32>,
}

pub struct Coordinator {
    config: FederationConfig,
    state: StateDir,
    inner: Mutex<Inner>,
    /// Bumped on every state change that a waiting request may care about.
    changes: watch::Sender<u64>,
    pub allowlist: Allowlist,
}

impl Coordinator {
    /// Opens the state dir and resumes from the last complete round, if any.
    pub fn open(config: FederationConfig) -> Result<Arc<Self>> {
        let state = StateDir::open(&config.federation.state_dir)?;
        let mut inner = Inner {
            registrations: BTreeMap::new(),
            setup: None,
            global: None,
            server: ServerState::default(),
            digest: String::new(),
            site_digests: BTreeMap::new(),
            wire_digests: TensorDigests::new(transport_of(&config)),
            completed: 0,
            open: None,
            launched: config.federation.launch == "auto",
            sites: BTreeMap::new(),
            removed: BTreeSet::new(),
            last_dice: BTreeMap::new(),
        };
        if let Some(setup) = state.read_setup()? {
            let (net, completed, server) = load_global(&config, &state, &setup)?;
            (inner.digest, inner.wire_digests) = digest_global(&config, &setup, &net);
            inner.global = Some(net);
            inner.server = server;
            inner.completed = completed;
            inner.setup = Some(setup);
            info!(completed, digest = %inner.digest, "resumed federation from {}", state.root().display());
        }
        let mut allowed: Vec<String> = config.federation.sites.clone();
        allowed.push(ADMIN_IDENTITY.to_string());
        let (changes, _) = watch::channel(0);
        Ok(Arc::new(Self { config, state, inner: Mutex::new(inner), changes, allowlist: Allowlist::new(allowed) }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    /// Waits until `ready` returns Some or `timeout` passes.
    async fn wait_for<T>(&self, timeout: Duration, mut ready: impl FnMut(&Inner) -> Option<T>) -> Option<T> {
        let mut rx = self.changes.subscribe();
        let until = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(v) = ready(&self.lock()) {
                return Some(v);
            }
            match tokio::time::timeout_at(until, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return ready(&self.lock()),
            }
        }
    }

    /// Serves until the federation is finished (with `exit_when_done`) or forever.
    pub async fn serve(self: Arc<Self>, mut server_config: quinn::ServerConfig) -> Result<()> {
        // Every request is a bidirectional stream: a peer may not open unidirectional ones
        // (they would never be accepted, only buffered), and a site needs few bidi streams.
        let mut transport = fedtalent_certs::transport_config();
        transport.max_concurrent_uni_streams(0u32.into());
        transport.max_concurrent_bidi_streams((MAX_STREAMS_PER_SITE as u32).into());
        server_config.transport_config(Arc::new(transport));
        let endpoint = fedtalent_certs::server_endpoint(server_config, self.config.federation.listen)
            .with_context(|| format!("listening on UDP {}", self.config.federation.listen))?;
        info!(addr = %endpoint.local_addr()?, federation = %self.config.federation.name, "coordinator listening");
        let rounds = tokio::spawn(self.clone().run_rounds());
        let mut limiter = HandshakeLimiter::new(HANDSHAKE_BURST, HANDSHAKE_PER_SECOND);
        loop {
            tokio::select! {
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let ip = incoming.remote_address().ip();
                    if !limiter.allow(ip, Instant::now()) {
                        // Refused before any TLS work; logged at debug so that a flood does not
                        // flood the log too.
                        tracing::debug!(%ip, "handshake refused: rate limit of this address");
                        incoming.refuse();
                        continue;
                    }
                    tokio::spawn(self.clone().handle_connection(incoming));
                }
                _ = wait_finished(&rounds) => break,
            }
        }
        let result = rounds.await.context("round task")?;
        endpoint.close(0u32.into(), b"federation finished");
        endpoint.wait_idle().await;
        result
    }

    // ----------------------------------------------------------------------------------------
    // rounds

    async fn run_rounds(self: Arc<Self>) -> Result<()> {
        loop {
            self.wait_for(FOREVER, |i| (i.setup.is_some() && i.launched).then_some(())).await;
            let round = self.lock().completed + 1;
            if round > self.config.plan.rounds {
                info!(rounds = self.config.plan.rounds, "federation finished");
                self.changed();
                if self.config.federation.exit_when_done {
                    // Give polling sites a moment to hear `Finished`.
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    return Ok(());
                }
                std::future::pending::<()>().await;
            }
            self.run_round(round).await;
        }
    }

    async fn run_round(&self, round: u32) {
        let deadline = Instant::now() + Duration::from_secs(self.config.plan.round_deadline_s);
        self.lock().open =
            Some(OpenRound { round, opened: Instant::now(), updates: BTreeMap::new(), arriving: BTreeSet::new() });
        self.changed();
        info!(round, "round opened");
        // A round closes early once every site still in the federation reported, and only if
        // that is enough to count; removed sites are not waited for (their updates were dropped).
        let min_sites = self.config.plan.min_sites as usize;
        let wait = deadline.saturating_duration_since(Instant::now());
        self.wait_for(wait, |i| {
            let target = self.active_sites(i).max(min_sites);
            i.open.as_ref().filter(|o| o.updates.len() >= target).map(|_| ())
        })
        .await;
        let open = self.lock().open.take().expect("the round task owns the open round");
        self.changed();
        let reported = open.updates.len();
        if reported < self.config.plan.min_sites as usize {
            warn!(
                round,
                reported,
                min_sites = self.config.plan.min_sites,
                "round closed without enough updates; it will be repeated"
            );
            return;
        }
        self.close_round(open).await;
    }

    /// Aggregates the round into a copy of the global model and commits it. An aggregation
    /// error drops the round (it is repeated). A checkpoint error (disk full, state dir not
    /// writable) must not stop `serve` nor leave the in-memory model ahead of the disk: the
    /// global model stays the previous round's until the checkpoint is written, and the commit
    /// is retried with back-off, keeping the sites' updates (they poll `Heartbeat` meanwhile).
    async fn close_round(&self, open: OpenRound) {
        let round = open.round;
        let closing = Instant::now();
        let next = match self.aggregate_round(&open) {
            Ok(next) => next,
            Err(e) => {
                warn!(round, "round dropped, it will be repeated: aggregation failed: {e:#}");
                return;
            }
        };
        let mut backoff = Duration::from_secs(1);
        while let Err(e) =
            self.state.write_checkpoint(&next.net, &next.server, &next.record, self.config.federation.keep_rounds)
        {
            tracing::error!(
                round,
                "checkpoint not written, the global model stays at round {}; retrying in {backoff:?}: {e:#}",
                round - 1
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
            // Fail closed: an aggregate that holds a site removed meanwhile is not committed.
            let removed = open.updates.keys().find(|s| self.lock().removed.contains(*s)).cloned();
            if let Some(site) = removed {
                warn!(round, site = %site, "round dropped, it will be repeated: site {site} was removed before its checkpoint was written");
                return;
            }
        }
        self.commit_round(&open, next, closing);
    }

    /// The aggregate of `open`'s updates, computed on copies of the global model and the server
    /// optimizer's state (the originals are untouched until [`Coordinator::commit_round`]).
    fn aggregate_round(&self, open: &OpenRound) -> Result<NextGlobal> {
        let inner = self.lock();
        let setup = inner.setup.clone().expect("rounds run after setup");
        let mut net = copy_net(inner.global.as_ref().expect("global model exists after setup"))?;
        let mut server =
            ServerState { velocity: inner.server.velocity.iter().map(|(n, t)| (n.clone(), t.copy())).collect() };
        drop(inner);
        let updates: Vec<&Update> = open.updates.values().collect();
        let rows = row_lookup(&setup);
        let decoders: BTreeMap<String, usize> = full_selection(&self.config, &setup).decoders.into_iter().collect();
        let weights = aggregate::aggregate(
            &mut net,
            &updates,
            (&self.config.plan.server, &mut server),
            &|id| rows.get(id).copied(),
            &|site| decoders.get(site).copied(),
        )?;
        let (digest, wire_digests) = digest_global(&self.config, &setup, &net);
        let contributions: Vec<Contribution> = updates
            .iter()
            .zip(&weights)
            .map(|(u, &weight)| Contribution {
                site: u.site.clone(),
                n_cases: u.n_cases,
                weight,
                train_loss: u.train_loss,
                payload_digest: u.payload_digest.clone(),
            })
            .collect();
        let record = RoundRecord {
            round: open.round,
            digest,
            contributions,
            classes: setup.classes.clone(),
            unix_time: unix_now(),
        };
        Ok(NextGlobal { net, server, record, wire_digests, weights })
    }

    /// Makes the checkpointed aggregate the global model and logs the round's metrics. A
    /// metrics write error is a warning: the checkpoint, already written, is what counts.
    fn commit_round(&self, open: &OpenRound, next: NextGlobal, closing: Instant) {
        let updates: Vec<&Update> = open.updates.values().collect();
        let mut lines = metric_lines(open.round, &updates, &next.weights);
        lines.push(serde_json::json!({
            "round": open.round,
            "kind": "round",
            "wall_ms": open.opened.elapsed().as_millis() as u64,
            // Aggregation, metrics and the atomic checkpoint (the checkpoint is already written).
            "close_ms": closing.elapsed().as_millis() as u64,
            "sites": updates.len(),
        }));
        if let Err(e) = self.state.append_metrics(&lines) {
            warn!(round = open.round, "metrics of the round not written (its checkpoint is): {e:#}");
        }
        info!(
            round = open.round,
            reported = updates.len(),
            close_ms = closing.elapsed().as_millis() as u64,
            "round aggregated and checkpointed"
        );
        let mut inner = self.lock();
        for u in &updates {
            for (class, dice) in &u.dice {
                inner.last_dice.insert(class.clone(), *dice);
            }
            let site = inner.sites.entry(u.site.clone()).or_default();
            site.last_round = Some(open.round);
            site.last_loss = Some(u.train_loss);
        }
        inner.global = Some(next.net);
        inner.server = next.server;
        inner.digest = next.record.digest;
        inner.site_digests.clear();
        inner.wire_digests = next.wire_digests;
        inner.completed = open.round;
        drop(inner);
        self.changed();
    }

    // ----------------------------------------------------------------------------------------
    // connections and requests

    async fn handle_connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let conn = match incoming.await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(%remote, "handshake refused: {e}");
                return;
            }
        };
        let peer = match fedtalent_certs::peer_site_name(&conn) {
            Ok(name) => name,
            Err(e) => {
                warn!(%remote, "connection without a usable site certificate: {e}");
                conn.close(1u32.into(), b"no site identity");
                return;
            }
        };
        if !self.add_connection(&peer, &conn) {
            warn!(site = %peer, %remote, "refused: the site was removed while it connected");
            conn.close(1u32.into(), removed_reason(&peer).as_bytes());
            return;
        }
        info!(site = %peer, %remote, "connected");
        loop {
            match conn.accept_bi().await {
                Ok((send, recv)) => {
                    tokio::spawn(self.clone().handle_stream(peer.clone(), send, recv));
                }
                Err(e) => {
                    info!(site = %peer, "disconnected: {e}");
                    break;
                }
            }
        }
        let mut inner = self.lock();
        if let Some(site) = inner.sites.get_mut(&peer) {
            site.connections.remove(&conn.stable_id());
        }
    }

    /// Records an open connection of `peer`, unless `peer` is no longer allowed. The allowlist is
    /// read under the lock that [`Coordinator::set_sites`] closes connections under, so that a
    /// handshake racing a removal is either closed there or refused here.
    fn add_connection(&self, peer: &str, conn: &quinn::Connection) -> bool {
        let mut inner = self.lock();
        if !self.allowlist.contains(peer) {
            return false;
        }
        inner.sites.entry(peer.to_string()).or_default().connections.insert(conn.stable_id(), conn.clone());
        true
    }

    /// Re-reads `[federation].sites` from `path` every `every`, so that removing a site there
    /// locks it out without restarting `serve` ([`Coordinator::set_sites`]). Errors elsewhere in
    /// the file are warned about (once per change) and do not hold a removal back; a file whose
    /// sites list cannot be read at all keeps the current list, since it names no removal.
    pub async fn watch_config(self: Arc<Self>, path: PathBuf, every: Duration) {
        let (mut applied, mut last_error): (Option<Vec<String>>, Option<String>) = (None, None);
        loop {
            tokio::time::sleep(every).await;
            let error = match crate::config::listed_sites(&path) {
                Ok(sites) => {
                    if applied.as_ref() != Some(&sites) {
                        self.set_sites(&sites);
                        applied = Some(sites);
                    }
                    FederationConfig::load(&path).err().map(|e| format!("{e:#}; its [federation].sites is applied"))
                }
                Err(e) => Some(format!("{e:#}; keeping the current allowlist")),
            };
            if error.is_some() && error != last_error {
                warn!("{}", error.as_deref().unwrap_or_default());
            }
            last_error = error;
        }
    }

    /// Sites of this federation that were not removed since it started.
    fn active_sites(&self, inner: &Inner) -> usize {
        self.config.federation.sites.iter().filter(|s| !inner.removed.contains(*s)).count()
    }

    /// Applies a new list of allowed sites (federation.toml's `[federation].sites` or the
    /// operator's `SetAllowlist`). Revocation fails closed: a site stays a member only while it
    /// is listed both when `serve` started (that list fixed the class layout) and now. The
    /// allowlist is replaced first, so that no new handshake of a removed site succeeds; then
    /// each removed site's open connections are closed, it must say Hello again if re-added,
    /// and its update leaves the open round. Nothing else in the list can block a removal:
    /// problems with the rest are warnings.
    pub fn set_sites(&self, sites: &[String]) {
        let configured = &self.config.federation.sites;
        for extra in sites.iter().filter(|s| !configured.contains(s)) {
            warn!(site = %extra, "not added: the sites of a running federation are those listed when serve started (restart serve to add one)");
        }
        let kept: Vec<String> = configured.iter().filter(|s| sites.contains(s)).cloned().collect();
        let mut names = kept.clone();
        names.push(ADMIN_IDENTITY.into());
        self.allowlist.replace(names);
        let mut inner = self.lock();
        for site in configured {
            if kept.contains(site) {
                if inner.removed.remove(site) {
                    info!(site = %site, "site allowed again (it must connect and say Hello again)");
                }
            } else if inner.removed.insert(site.clone()) {
                revoke(&mut inner, site);
            }
        }
        let active = self.active_sites(&inner);
        let setup = inner.setup.is_some();
        drop(inner);
        self.changed();
        info!(sites = ?kept, "allowlist applied");
        if active < self.config.plan.min_sites as usize {
            warn!(
                active,
                min_sites = self.config.plan.min_sites,
                "fewer sites than [plan].min_sites remain: no round can complete until a site is allowed again"
            );
        }
        if !setup && active < configured.len() {
            warn!("the federation is not set up yet: it waits for every site listed when serve started; restart serve with the new list to set up without the removed ones");
        }
    }

    async fn handle_stream(self: Arc<Self>, peer: String, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let Some(_stream) = StreamSlot::take(&self, &peer) else {
            warn!(site = %peer, "refused a request: {MAX_STREAMS_PER_SITE} of its requests are already open");
            let reason = format!("site {peer}: more than {MAX_STREAMS_PER_SITE} concurrent requests");
            let _ = write_frame(&mut send, &refusal(ErrorKind::BadMessage, reason)).await;
            let _ = send.finish();
            return;
        };
        let request = match tokio::time::timeout(REQUEST_WAIT, read_frame(&mut recv, MAX_FRAME_BYTES)).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                let _ = write_frame(&mut send, &refusal_of_frame_error(&peer, &e)).await;
                let _ = send.finish();
                return;
            }
            Err(_) => {
                warn!(site = %peer, "refused a request that did not arrive within {REQUEST_WAIT:?}");
                let _ = recv.stop(1u32.into());
                return;
            }
        };
        let is_admin = peer == ADMIN_IDENTITY;
        let member = is_admin || self.joined(&peer);
        let reply = match request {
            Message::Admin(req) if is_admin => Some(self.admin(req)),
            // The whole model (every site's heads and decoders) is the operator's only.
            Message::ModelRequest { digest, full: true } if is_admin => {
                self.model_reply(&peer, &digest, true, &mut send).await
            }
            _ if is_admin => {
                Some(refusal(ErrorKind::BadMessage, "the admin identity only sends admin requests".into()))
            }
            // The protocol version was checked by `read_frame` (see `refusal_of_frame_error`).
            Message::Hello { protocol_version: _, site, classes, n_train, n_val: _, hu_histogram, device } => {
                let histogram =
                    fedtalent_data::HuHistogram { min_hu: hu_histogram.min_hu, counts: hu_histogram.counts };
                let reg = Registration { classes, n_train, histogram, device };
                Some(self.hello(&peer, &site, reg).await)
            }
            Message::Heartbeat | Message::ModelRequest { .. } | Message::UpdateHeader { .. } if !member => {
                warn!(site = %peer, "refused a {} request: the site has not joined", request.kind());
                let _ = recv.stop(1u32.into());
                Some(refusal(
                    ErrorKind::NotAllowed,
                    format!("site {peer} has not joined this federation (no accepted Hello on this coordinator)"),
                ))
            }
            Message::Heartbeat => Some(self.poll(&peer).await),
            Message::ModelRequest { full: true, .. } => {
                warn!(site = %peer, "refused a request for the full model");
                Some(refusal(
                    ErrorKind::NotAllowed,
                    format!("site {peer}: only the operator may download every site's heads (full = true)"),
                ))
            }
            Message::ModelRequest { digest, full: false } => self.model_reply(&peer, &digest, false, &mut send).await,
            Message::UpdateHeader { round, n_cases, train_loss, dice, payload_digest, durations_ms } => {
                let header = UpdateMeta { round, n_cases, train_loss, dice, payload_digest, durations_ms };
                Some(self.receive_update(&peer, header, &mut recv).await)
            }
            other => Some(refusal(ErrorKind::BadMessage, format!("unexpected {} request", other.kind()))),
        };
        if let Some(reply) = reply {
            if let Err(e) = write_frame(&mut send, &reply).await {
                warn!(site = %peer, "could not reply: {e}");
            }
        }
        let _ = send.finish();
    }

    fn joined(&self, site: &str) -> bool {
        self.lock().sites.get(site).is_some_and(|s| s.joined)
    }

    /// Streams the model, or the refusal to answer instead.
    async fn model_reply(&self, peer: &str, digest: &str, full: bool, send: &mut quinn::SendStream) -> Option<Message> {
        match self.send_model(peer, digest, full, send).await {
            Ok(()) => None,
            Err(reason) => {
                warn!(site = %peer, "model request refused: {reason:#}");
                Some(refusal(ErrorKind::BadMessage, format!("{reason:#}")))
            }
        }
    }

    async fn hello(&self, peer: &str, site: &str, reg: Registration) -> Message {
        if site != peer {
            warn!(site = %peer, claimed = %site, "refused: Hello names another site than the certificate");
            return refusal(ErrorKind::NotAllowed, format!("certificate is for site {peer}, Hello says {site}"));
        }
        if !self.config.federation.sites.iter().any(|s| s == peer) || !self.allowlist.contains(peer) {
            warn!(site = %peer, "refused: not a site of this federation");
            return refusal(ErrorKind::NotAllowed, format!("site {peer} is not in this federation"));
        }
        if let Err(reason) = self.register(peer, reg) {
            warn!(site = %peer, "registration refused: {reason:#}");
            return refusal(ErrorKind::BadDataset, format!("{reason:#}"));
        }
        self.lock().sites.entry(peer.to_string()).or_default().joined = true;
        self.changed();
        let setup = self.wait_for(FOREVER, |i| i.setup.clone()).await.expect("waits forever");
        let completed = self.lock().completed;
        info!(site = %peer, completed, "welcomed");
        Message::Welcome {
            federation: self.config.federation.name.clone(),
            plan: self.plan(),
            classes: setup.classes.iter().map(global_class).collect(),
            normalization: Normalization {
                clip_low: setup.normalization.clip_low,
                clip_high: setup.normalization.clip_high,
                mean: setup.normalization.mean,
                std: setup.normalization.std,
            },
            current_round: completed,
        }
    }

    /// Records a site's registration; once every listed site registered, fixes the setup.
    fn register(&self, site: &str, reg: Registration) -> Result<()> {
        anyhow::ensure!(!reg.classes.is_empty(), "site {site}: no classes");
        // Class ids are `<site>/<name>`: a name listed twice would give two classes one id.
        let mut names = BTreeSet::new();
        if let Some(twice) = reg.classes.iter().find(|c| !names.insert(c.name.as_str())) {
            bail!("site {site}: class {:?} is listed twice", twice.name);
        }
        // n_train is the site's aggregation weight (sqrt); with none, the weights are undefined.
        anyhow::ensure!(reg.n_train >= 1, "site {site}: n_train is 0");
        // Checked before it is stored: the setup merges every site's histogram under the lock,
        // and one absurd histogram there would stop every later registration too.
        reg.histogram.check().map_err(|e| anyhow!("site {site}: hu_histogram.{e}"))?;
        let mut inner = self.lock();
        if let Some(setup) = &inner.setup {
            let fixed: Vec<(String, Vec<u32>)> =
                setup.classes.iter().filter(|c| c.site == site).map(|c| (c.name.clone(), c.labels.clone())).collect();
            let sent: Vec<(String, Vec<u32>)> =
                reg.classes.iter().map(|c| (c.name.clone(), c.labels.clone())).collect();
            anyhow::ensure!(
                fixed == sent,
                "site {site}: classes {sent:?} differ from those registered earlier {fixed:?}"
            );
            // The case count is fixed with the setup: it is what every update's n_cases must
            // match (its aggregation weight), so a changed dataset is refused here, visibly,
            // rather than each of its updates later.
            let registered = registered_cases(setup, site);
            anyhow::ensure!(
                registered == Some(reg.n_train),
                "site {site}: n_train {} differs from the {} training cases registered when the federation was set up",
                reg.n_train,
                registered.map_or("(none)".to_string(), |n| n.to_string())
            );
            return Ok(());
        }
        info!(site, classes = reg.classes.len(), n_train = reg.n_train, device = %reg.device, "registered");
        inner.registrations.insert(site.to_string(), reg);
        if self.config.federation.sites.iter().all(|s| inner.registrations.contains_key(s)) {
            let setup = build_setup(&self.config, &inner.registrations);
            self.state.write_setup(&setup)?;
            let (net, completed, server) = load_global(&self.config, &self.state, &setup)?;
            (inner.digest, inner.wire_digests) = digest_global(&self.config, &setup, &net);
            inner.site_digests.clear();
            inner.global = Some(net);
            inner.server = server;
            inner.completed = completed;
            info!(classes = setup.classes.len(), norm = ?setup.normalization, "federation set up");
            inner.setup = Some(setup);
        }
        Ok(())
    }

    fn plan(&self) -> Plan {
        let p = &self.config.plan;
        let topo = Topology::preset(&p.preset).expect("validated");
        Plan {
            preset: p.preset.clone(),
            patch: topo.patch.map(|v| v as u32),
            spacing: topo.spacing.map(|v| v as f32),
            rounds: p.rounds,
            local_steps: p.local_steps,
            batch: p.batch,
            lr: p.lr,
            eval_every: p.eval_every,
            min_sites: p.min_sites,
            round_deadline_s: p.round_deadline_s,
            dice_mode: p.dice_mode.clone(),
            bf16_transport: p.bf16_transport,
            site_decoders: p.per_site_decoders,
            local: p.local,
        }
    }

    /// A site's long poll for work.
    async fn poll(&self, peer: &str) -> Message {
        let total = self.config.plan.rounds;
        let local_steps = self.config.plan.local_steps;
        let eval_every = self.config.plan.eval_every;
        let total_steps = self.config.total_steps();
        let work = self
            .wait_for(POLL_WAIT, |i| {
                if i.completed >= total && i.setup.is_some() {
                    return Some(Message::Finished { rounds: total, model_digest: i.digest.clone() });
                }
                let open = i.open.as_ref()?;
                if open.updates.contains_key(peer) {
                    return None;
                }
                Some(Message::RoundStart {
                    round: open.round,
                    model_digest: i.digest.clone(),
                    local_steps,
                    step_offset: (open.round as u64 - 1) * local_steps as u64,
                    total_steps,
                    evaluate: (open.round - 1) % eval_every == 0 || open.round == total,
                })
            })
            .await;
        match work {
            Some(Message::RoundStart { round, model_digest, local_steps, step_offset, total_steps, evaluate }) => {
                let mut inner = self.lock();
                // Announce the site's part of the model the round was opened with; if a round
                // closed meanwhile, the site simply polls again.
                if inner.digest != model_digest || inner.open.as_ref().map(|o| o.round) != Some(round) {
                    return Message::Heartbeat;
                }
                let model_digest = self.site_digest(&mut inner, peer);
                Message::RoundStart { round, model_digest, local_steps, step_offset, total_steps, evaluate }
            }
            other => other.unwrap_or(Message::Heartbeat),
        }
    }

    /// The digest of `peer`'s part of the current global model (see `Inner::site_digests`).
    fn site_digest(&self, inner: &mut Inner, peer: &str) -> String {
        if let Some(digest) = inner.site_digests.get(peer) {
            return digest.clone();
        }
        let Inner { setup, global, wire_digests, site_digests, .. } = inner;
        let selection = site_selection(&self.config, setup.as_ref().expect("set up"), peer, false);
        let digest = wire::parts_to_wire(global.as_ref().expect("set up"), &selection).wire_digest_cached(wire_digests);
        site_digests.insert(peer.to_string(), digest.clone());
        digest
    }

    /// Streams the current global model's backbone plus the site's heads (all heads if `full`).
    async fn send_model(&self, peer: &str, digest: &str, full: bool, send: &mut quinn::SendStream) -> Result<()> {
        let (set, mut digests, version) = {
            let mut inner = self.lock();
            let setup = inner.setup.as_ref().context("the federation is not set up yet")?;
            let selection = site_selection(&self.config, setup, peer, full);
            // The operator names the whole model by its global digest, a site its part by the
            // digest its RoundStart announced.
            let current = if full { inner.digest.clone() } else { self.site_digest(&mut inner, peer) };
            anyhow::ensure!(digest == current, "model {digest} is not the current global model {current}");
            let set = wire::parts_to_wire(inner.global.as_ref().expect("set up"), &selection);
            (set, inner.wire_digests.clone(), inner.digest.clone())
        };
        fedtalent_protocol::quic::send_tensors_shared(send, Arc::new(set), &mut digests)
            .await
            .map_err(|e| anyhow!("streaming the model to {peer}: {e}"))?;
        let mut inner = self.lock();
        if inner.digest == version {
            inner.wire_digests.merge(digests);
        }
        Ok(())
    }

    async fn receive_update(&self, peer: &str, meta: UpdateMeta, recv: &mut quinn::RecvStream) -> Message {
        let round = meta.round;
        let refused = |kind: ErrorKind, reason: String| {
            warn!(site = %peer, round, "update refused: {reason}");
            Message::Ack { round, accepted: false, reason: Some(format!("{kind:?}: {reason}")) }
        };
        // Header fields, round and duplicate checks first: such an update is refused without
        // reading its payload.
        if let Err(reason) = check_header(peer, &meta) {
            let _ = recv.stop(1u32.into());
            return refused(ErrorKind::BadUpdate, reason);
        }
        let _slot;
        let until;
        let limits = {
            let mut inner = self.lock();
            match inner.open.as_mut() {
                Some(open) if open.round == round && !open.updates.contains_key(peer) => {
                    if !open.arriving.insert(peer.to_string()) {
                        let _ = recv.stop(1u32.into());
                        return refused(
                            ErrorKind::BadUpdate,
                            format!("site {peer}: another update of round {round} is already arriving"),
                        );
                    }
                    _slot = Slot { coordinator: self, site: peer.to_string(), round };
                    until = open.opened + Duration::from_secs(self.config.plan.round_deadline_s);
                }
                Some(open) if open.round == round => {
                    return refused(ErrorKind::BadUpdate, format!("site {peer} already sent round {round}"))
                }
                Some(open) => {
                    return refused(
                        ErrorKind::LateUpdate,
                        format!("round {round} is not the open round {}", open.round),
                    )
                }
                None => return refused(ErrorKind::LateUpdate, format!("round {round} is closed")),
            }
            let registered = inner.setup.as_ref().and_then(|s| registered_cases(s, peer));
            if registered != Some(meta.n_cases) {
                let _ = recv.stop(1u32.into());
                // The slot is released as `_slot` drops, after this lock.
                return refused(
                    ErrorKind::BadUpdate,
                    format!(
                        "site {peer}: n_cases {} is not its {} registered training cases",
                        meta.n_cases,
                        registered.map_or("(none)".to_string(), |n| n.to_string())
                    ),
                );
            }
            let setup = inner.setup.as_ref().expect("a round is open");
            if let Err(reason) = check_metrics(peer, &meta, setup) {
                let _ = recv.stop(1u32.into());
                return refused(ErrorKind::BadUpdate, reason);
            }
            let ids: Vec<String> = setup.classes.iter().map(|c| c.id.clone()).collect();
            let mut limits = RecvLimits::for_manifest(wire::parts_manifest(
                inner.global.as_ref().expect("set up"),
                &ids,
                &full_selection(&self.config, setup).decoders,
            ));
            // The manifest names every class's heads (so that another site's heads reach
            // `validate` and are refused by name); which of them must be there, each with every
            // tensor, is `validate`'s check.
            limits.require_all = false;
            limits.expected_digest = Some(meta.payload_digest.clone());
            limits
        };
        // A stalled payload would hold its slot (and this task) forever: it must arrive before
        // the round closes, when it could not count any more.
        let (set, digest) = match tokio::time::timeout_at(until.into(), recv_tensors_digest(recv, &limits)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                let _ = recv.stop(1u32.into());
                return refused(ErrorKind::BadUpdate, format!("payload: {e}"));
            }
            Err(_) => {
                let _ = recv.stop(1u32.into());
                return refused(
                    ErrorKind::LateUpdate,
                    format!("payload of round {round} still arriving at its deadline"),
                );
            }
        };
        let parts = match Parts::from_wire(&set) {
            Ok(p) => p,
            Err(e) => return refused(ErrorKind::BadUpdate, format!("{e:#}")),
        };
        let mut inner = self.lock();
        let setup = inner.setup.clone().expect("a round is open");
        let owners: BTreeMap<String, String> = setup.classes.iter().map(|c| (c.id.clone(), c.site.clone())).collect();
        let owned: BTreeSet<String> = setup.classes.iter().filter(|c| c.site == peer).map(|c| c.id.clone()).collect();
        let global = inner.global.as_ref().expect("set up");
        let decoder = full_selection(&self.config, &setup).decoders.iter().find(|(s, _)| s == peer).map(|(_, i)| *i);
        if let Err(e) =
            aggregate::validate(global, &owned, &owners, peer, &parts, self.config.plan.max_update_norm, decoder)
        {
            return refused(ErrorKind::BadUpdate, format!("{e:#}"));
        }
        // The site may have been removed, or the round closed, while the payload was streaming.
        if !inner.sites.get(peer).is_some_and(|s| s.joined) {
            return refused(ErrorKind::NotAllowed, format!("site {peer} was removed from the federation"));
        }
        let Some(open) = inner.open.as_mut().filter(|o| o.round == round) else {
            return refused(ErrorKind::LateUpdate, format!("round {round} closed while the update was arriving"));
        };
        open.updates.insert(
            peer.to_string(),
            Update {
                site: peer.to_string(),
                n_cases: meta.n_cases,
                train_loss: meta.train_loss,
                dice: meta.dice,
                payload_digest: digest,
                bytes: set.total_bytes(),
                durations_ms: meta.durations_ms,
                parts,
            },
        );
        drop(inner);
        self.changed();
        info!(site = %peer, round, n_cases = meta.n_cases, loss = meta.train_loss, "update accepted");
        Message::Ack { round, accepted: true, reason: None }
    }

    fn admin(&self, request: AdminRequest) -> Message {
        let reply = match request {
            AdminRequest::Status => AdminReply::Status(self.status()),
            AdminRequest::Launch { rounds } => {
                if rounds.is_some_and(|r| r != self.config.plan.rounds) {
                    AdminReply::Refused {
                        reason: "the number of rounds is fixed by federation.toml (the lr schedule depends on it)"
                            .into(),
                    }
                } else {
                    self.lock().launched = true;
                    self.changed();
                    AdminReply::Done { message: "rounds launched".into() }
                }
            }
            AdminRequest::Export { dir } => match self.export(Path::new(&dir)) {
                Ok(msg) => AdminReply::Done { message: msg },
                Err(e) => AdminReply::Refused { reason: format!("{e:#}") },
            },
            AdminRequest::SetAllowlist { sites } => {
                self.set_sites(&sites);
                AdminReply::Done { message: format!("allowlist is now {:?}", self.allowlist.names()) }
            }
        };
        Message::AdminReply(reply)
    }

    pub fn status(&self) -> StatusReport {
        let inner = self.lock();
        let sites = self
            .config
            .federation
            .sites
            .iter()
            .map(|name| {
                let s = inner.sites.get(name);
                SiteStatus {
                    site: name.clone(),
                    connected: s.is_some_and(|s| !s.connections.is_empty()),
                    allowed: self.allowlist.contains(name),
                    last_round: s.and_then(|s| s.last_round),
                    n_cases: inner.registrations.get(name).map_or(0, |r| r.n_train),
                    last_train_loss: s.and_then(|s| s.last_loss),
                }
            })
            .collect();
        StatusReport {
            federation: self.config.federation.name.clone(),
            current_round: inner.completed,
            total_rounds: self.config.plan.rounds,
            running: inner.open.is_some(),
            model_digest: inner.digest.clone(),
            sites,
            dice: inner.last_dice.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }

    fn export(&self, dir: &Path) -> Result<String> {
        let inner = self.lock();
        let setup = inner.setup.as_ref().context("the federation is not set up yet")?;
        let net = inner.global.as_ref().expect("set up");
        export_model(net, setup, &self.config.plan.preset, inner.completed, &inner.digest, dir)?;
        Ok(format!("round {} exported to {} (digest {})", inner.completed, dir.display(), inner.digest))
    }
}

/// A round's aggregate, not yet the global model (see [`Coordinator::close_round`]).
struct NextGlobal {
    net: MultiTalentNet,
    server: ServerState,
    record: RoundRecord,
    wire_digests: TensorDigests,
    /// Each update's backbone weight, in the order of the round's updates.
    weights: Vec<f64>,
}

/// A deep copy of `net` (same topology, every parameter's values copied).
fn copy_net(net: &MultiTalentNet) -> Result<MultiTalentNet> {
    let mut copy = MultiTalentNet::new(net.topology(), net.classes(), net.device())?;
    copy.params_mut().load_named(&net.params().named_tensors(false), true)?;
    Ok(copy)
}

/// A token bucket per remote IP: `burst` handshakes at once, refilled at `per_second`.
pub struct HandshakeLimiter {
    buckets: std::collections::HashMap<std::net::IpAddr, (f64, Instant)>,
    burst: f64,
    per_second: f64,
}

impl HandshakeLimiter {
    pub fn new(burst: f64, per_second: f64) -> Self {
        Self { buckets: std::collections::HashMap::new(), burst, per_second }
    }

    /// Takes a token of `ip`'s bucket if it has one.
    pub fn allow(&mut self, ip: std::net::IpAddr, now: Instant) -> bool {
        if self.buckets.len() > 10_000 {
            // Forget the addresses whose bucket is full again (as good as new).
            let (burst, rate) = (self.burst, self.per_second);
            self.buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = self.buckets.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One of a site's [`MAX_STREAMS_PER_SITE`] request slots, released on drop.
struct StreamSlot {
    coordinator: Arc<Coordinator>,
    site: String,
}

impl StreamSlot {
    fn take(coordinator: &Arc<Coordinator>, site: &str) -> Option<StreamSlot> {
        let mut inner = coordinator.lock();
        let state = inner.sites.entry(site.to_string()).or_default();
        if state.streams >= MAX_STREAMS_PER_SITE {
            return None;
        }
        state.streams += 1;
        Some(StreamSlot { coordinator: coordinator.clone(), site: site.to_string() })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Some(state) = self.coordinator.lock().sites.get_mut(&self.site) {
            state.streams = state.streams.saturating_sub(1);
        }
    }
}

/// The reservation of a site's update slot in an open round; released when the update was
/// stored or refused. Drop it only while the lock is not held.
struct Slot<'a> {
    coordinator: &'a Coordinator,
    site: String,
    round: u32,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut inner = self.coordinator.lock();
        if let Some(open) = inner.open.as_mut().filter(|o| o.round == self.round) {
            open.arriving.remove(&self.site);
        }
    }
}

/// What a removed site's connections are closed with (error code 1: the site agent takes it as
/// final and stops with this reason).
fn removed_reason(site: &str) -> String {
    format!("site {site} was removed from the federation")
}

/// Ends a removed site's membership: closes its connections, forgets its Hello and drops its
/// update from the open round (it must not count toward min_sites).
fn revoke(inner: &mut Inner, site: &str) {
    let reason = removed_reason(site);
    if let Some(state) = inner.sites.get_mut(site) {
        state.joined = false;
        for conn in std::mem::take(&mut state.connections).into_values() {
            conn.close(1u32.into(), reason.as_bytes());
        }
    }
    let dropped = inner.open.as_mut().and_then(|o| o.updates.remove(site).map(|_| o.round));
    match dropped {
        Some(round) => warn!(site, round, "site removed: connections closed, its update of round {round} dropped"),
        None => warn!(site, "site removed: connections closed"),
    }
}

/// The scalar fields of an update header: a loss or Dice that is not a finite number would
/// end up as `null` in the round record and the metrics (and make the checkpoint unreadable).
fn check_header(peer: &str, meta: &UpdateMeta) -> std::result::Result<(), String> {
    if !meta.train_loss.is_finite() {
        return Err(format!("site {peer}: train_loss is {}, not a finite number", meta.train_loss));
    }
    if let Some((class, dice)) = meta.dice.iter().find(|(_, d)| !d.is_finite()) {
        return Err(format!("site {peer}: dice of class {class:?} is {dice}, not a finite number"));
    }
    Ok(())
}

/// The longest duration a site may report for one phase of a round (a week): `coordinator
/// report` sums them, and nothing of a round takes longer than its deadline anyway.
const MAX_DURATION_MS: u64 = 7 * 24 * 3600 * 1000;

/// At most this many durations per update (a site reports download, evaluate, train).
const MAX_DURATIONS: usize = 16;

/// The metrics of an update header: Dice only for classes the sender owns, each once (they
/// become the federation's reported Dice of those classes); durations few, short-named and
/// below [`MAX_DURATION_MS`].
fn check_metrics(peer: &str, meta: &UpdateMeta, setup: &Setup) -> std::result::Result<(), String> {
    let mut seen = BTreeSet::new();
    for (class, _) in &meta.dice {
        if !setup.classes.iter().any(|c| &c.id == class && c.site == peer) {
            return Err(format!("site {peer}: dice of class {class:?}, which is not one of its classes"));
        }
        if !seen.insert(class) {
            return Err(format!("site {peer}: dice of class {class:?} reported twice"));
        }
    }
    if meta.durations_ms.len() > MAX_DURATIONS {
        return Err(format!("site {peer}: {} durations_ms entries (at most {MAX_DURATIONS})", meta.durations_ms.len()));
    }
    let mut seen = BTreeSet::new();
    for (key, ms) in &meta.durations_ms {
        let plain = !key.is_empty() && key.len() <= 32 && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
        if !plain || !seen.insert(key) {
            return Err(format!("site {peer}: durations_ms key {key:?} is not a distinct [a-z_]{{1,32}} name"));
        }
        if *ms > MAX_DURATION_MS {
            return Err(format!("site {peer}: durations_ms.{key} = {ms} ms is over the cap of {MAX_DURATION_MS} ms"));
        }
    }
    Ok(())
}

/// The training cases `site` registered with when the federation was set up.
fn registered_cases(setup: &Setup, site: &str) -> Option<u32> {
    setup.site_cases.iter().find(|(s, _)| s == site).map(|&(_, n)| n)
}

struct UpdateMeta {
    round: u32,
    n_cases: u32,
    train_loss: f32,
    dice: Vec<(String, f32)>,
    payload_digest: String,
    durations_ms: Vec<(String, u64)>,
}

async fn wait_finished(task: &tokio::task::JoinHandle<Result<()>>) {
    while !task.is_finished() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn refusal(kind: ErrorKind, reason: String) -> Message {
    Message::Error { kind, reason }
}

/// The answer to a request that did not decode. A `Hello` of another protocol version is
/// recognised by the frame decoder even when the rest of it has another layout
/// ([`fedtalent_protocol::decode_payload`]); it is answered `VersionMismatch`, which the site
/// takes as final (retrying cannot help), where anything else malformed is `BadMessage`.
fn refusal_of_frame_error(peer: &str, e: &FrameError) -> Message {
    match e {
        FrameError::VersionMismatch { got, expected } => {
            warn!(site = %peer, version = got, "refused: protocol version {got}, this coordinator speaks {expected}");
            refusal(
                ErrorKind::VersionMismatch,
                format!("site {peer}: protocol version {got} is not this coordinator's version {expected}"),
            )
        }
        e => {
            warn!(site = %peer, "refused a malformed request: {e}");
            refusal(ErrorKind::BadMessage, format!("malformed request: {e}"))
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn global_class(c: &ClassInfo) -> GlobalClass {
    GlobalClass {
        index: c.index,
        id: c.id.clone(),
        site: c.site.clone(),
        name: c.name.clone(),
        labels: c.labels.clone(),
    }
}

fn all_rows(setup: &Setup) -> Vec<(String, i64)> {
    setup.classes.iter().map(|c| (c.id.clone(), c.index as i64)).collect()
}

/// Everything of the global model: every class's heads and, with per-site decoders, every
/// site's decoder (decoder index = the site's position in `[federation].sites`).
fn transport_of(config: &FederationConfig) -> Transport {
    if config.plan.bf16_transport {
        Transport::Bf16
    } else {
        Transport::Native
    }
}

/// The digest naming `net` (over all its parts) and the per-tensor digests of its parts as they
/// travel; with native transport one hashing pass gives both.
fn digest_global(config: &FederationConfig, setup: &Setup, net: &MultiTalentNet) -> (String, TensorDigests) {
    let set = wire::parts_to_wire(net, &full_selection(config, setup));
    let mut native = TensorDigests::new(Transport::Native);
    let digest = set.wire_digest_cached(&mut native);
    let transport = transport_of(config);
    (digest, if transport == Transport::Native { native } else { TensorDigests::new(transport) })
}

/// What `peer` downloads: the backbone, its own heads and decoder (`full`: every site's).
fn site_selection(config: &FederationConfig, setup: &Setup, peer: &str, full: bool) -> wire::Selection {
    let all = full_selection(config, setup);
    wire::Selection {
        classes: all
            .classes
            .into_iter()
            .filter(|(id, _)| full || setup.classes.iter().any(|c| &c.id == id && c.site == peer))
            .collect(),
        decoders: all.decoders.into_iter().filter(|(site, _)| full || site == peer).collect(),
    }
}

fn full_selection(config: &FederationConfig, setup: &Setup) -> wire::Selection {
    let decoders = if config.plan.per_site_decoders {
        config.federation.sites.iter().enumerate().map(|(i, s)| (s.clone(), i)).collect()
    } else {
        Vec::new()
    };
    wire::Selection { classes: all_rows(setup), decoders }
}

/// The global topology: the preset, with one decoder per site (its classes) when asked for.
fn global_topology(config: &FederationConfig, setup: &Setup) -> Result<Topology> {
    let topo = Topology::preset(&config.plan.preset)?;
    if !config.plan.per_site_decoders {
        return Ok(topo);
    }
    let partition = config
        .federation
        .sites
        .iter()
        .map(|site| setup.classes.iter().filter(|c| &c.site == site).map(|c| c.index as i64).collect())
        .collect();
    Ok(topo.with_site_decoders(partition))
}

fn row_lookup(setup: &Setup) -> BTreeMap<String, i64> {
    all_rows(setup).into_iter().collect()
}

/// The global class list (config site order, then each site's order) and CT statistics from the
/// merged foreground histograms.
fn build_setup(config: &FederationConfig, regs: &BTreeMap<String, Registration>) -> Setup {
    let mut classes = Vec::new();
    for site in &config.federation.sites {
        for spec in &regs[site].classes {
            classes.push(ClassInfo {
                index: classes.len() as u32,
                id: format!("{site}/{}", spec.name),
                site: site.clone(),
                name: spec.name.clone(),
                labels: spec.labels.clone(),
            });
        }
    }
    let histograms: Vec<fedtalent_data::HuHistogram> =
        config.federation.sites.iter().map(|s| regs[s].histogram.clone()).collect();
    let normalization = match fedtalent_data::HuHistogram::merge(&histograms).ct_stats() {
        Some(n) => CtNormalization {
            clip_low: n.clip_low as f32,
            clip_high: n.clip_high as f32,
            mean: n.mean as f32,
            std: n.std as f32,
        },
        None => {
            warn!("no site reported foreground intensities; using the paper's CT normalization");
            CtNormalization::PAPER
        }
    };
    let site_cases = config.federation.sites.iter().map(|s| (s.clone(), regs[s].n_train)).collect();
    Setup { classes, normalization, site_cases }
}

/// The global model and the server optimizer's state: the last complete checkpoint, else a
/// fresh, deterministic initialisation.
fn load_global(
    config: &FederationConfig,
    state: &StateDir,
    setup: &Setup,
) -> Result<(MultiTalentNet, u32, ServerState)> {
    let topo = global_topology(config, setup)?;
    tch::manual_seed(0);
    let mut net = MultiTalentNet::new(&topo, setup.classes.len() as i64, Device::Cpu)?;
    match state.latest()? {
        Some((record, model)) => {
            if record.classes != setup.classes {
                bail!("checkpoint of round {} has other classes than {}", record.round, state.root().display());
            }
            net.load(&model)?;
            let velocity_file = model.with_file_name(CHECKPOINT_SERVER);
            let server =
                if velocity_file.is_file() { ServerState::load(&net, &velocity_file)? } else { ServerState::default() };
            Ok((net, record.round, server))
        }
        None => Ok((net, 0, ServerState::default())),
    }
}

/// Metrics log lines of a round: one per site, one per (site, class) Dice.
fn metric_lines(round: u32, updates: &[&Update], weights: &[f64]) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    for (u, w) in updates.iter().zip(weights) {
        let durations: serde_json::Map<String, serde_json::Value> =
            u.durations_ms.iter().map(|(k, v)| (k.clone(), (*v).into())).collect();
        lines.push(serde_json::json!({
            "round": round, "site": u.site, "n_cases": u.n_cases, "weight": w,
            "train_loss": u.train_loss, "bytes_up": u.bytes, "durations_ms": durations,
            "payload_digest": u.payload_digest,
        }));
        for (class, dice) in &u.dice {
            // Dice is measured on the global model the round started from.
            lines.push(serde_json::json!({ "round": round, "model_round": round - 1, "site": u.site, "class": class, "dice": dice }));
        }
    }
    lines
}

/// Writes `model.safetensors` (nnU-Net names, aliases included) + `model.json` into `dir`.
pub fn export_model(
    net: &MultiTalentNet,
    setup: &Setup,
    preset: &str,
    round: u32,
    digest: &str,
    dir: &Path,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    net.save(&dir.join(fedtalent_model::manifest::WEIGHTS_FILE))?;
    let topo = net.topology().clone();
    let manifest = ModelManifest {
        format: fedtalent_model::manifest::MANIFEST_FORMAT.into(),
        preset: preset.into(),
        patch: topo.patch,
        spacing: topo.spacing,
        topology: topo,
        normalization: setup.normalization,
        classes: setup.classes.clone(),
        round,
        digest: digest.into(),
        weights: fedtalent_model::manifest::WEIGHTS_FILE.into(),
    };
    manifest.write(dir)?;
    Ok(dir.to_path_buf())
}

/// Offline export from the newest checkpoint in the state dir (the coordinator may be stopped).
pub fn export_from_state(config: &FederationConfig, dir: &Path) -> Result<String> {
    let state = StateDir::open(&config.federation.state_dir)?;
    let setup = state.read_setup()?.context("no federation set up in the state dir yet")?;
    let (net, round, _) = load_global(config, &state, &setup)?;
    anyhow::ensure!(round > 0, "no round completed yet: nothing to export");
    let digest = wire::model_digest(&net, &full_selection(config, &setup));
    export_model(&net, &setup, &config.plan.preset, round, &digest, dir)?;
    Ok(format!("round {round} exported to {} (digest {digest})", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 21 item 12: a burst per address, then the refill rate; other addresses unaffected.
    #[test]
    fn handshakes_are_rate_limited_per_address() {
        let mut limiter = HandshakeLimiter::new(3.0, 2.0);
        let (a, b): (std::net::IpAddr, std::net::IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        assert_eq!((0..4).map(|_| limiter.allow(a, t0)).collect::<Vec<_>>(), [true, true, true, false]);
        assert!(limiter.allow(b, t0), "another address shares the bucket");
        assert!(!limiter.allow(a, t0 + Duration::from_millis(400)));
        // 0.8 tokens at 400 ms, 2 at 1 s.
        let t1 = t0 + Duration::from_millis(1000);
        assert_eq!((0..3).map(|_| limiter.allow(a, t1)).collect::<Vec<_>>(), [true, true, false]);
    }
}
