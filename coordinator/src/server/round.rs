//! A round (DESIGN.md §2.1), top-down: [`Coordinator::run_round`] opens it; each site's poll
//! gets its [`RoundStart`] ([`Coordinator::poll`]) and downloads its part of the global model
//! ([`Coordinator::send_model`]); each upload is admitted or refused
//! ([`Coordinator::receive_update`]); at the deadline, or once every site reported, the round
//! closes: the updates are aggregated into a copy of the global model, checkpointed, and the
//! copy becomes the global model ([`Coordinator::close_round`]). A round with fewer than
//! `min_sites` updates is repeated.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Context, Result};
use fedtalent_model::wire::{self, Parts};
use fedtalent_model::MultiTalentNet;
use fedtalent_protocol::{
    close, recv_tensors_resumable, write_frame, Ack, DType, ErrorKind, Finished, Held, Message, PartialSet, Received,
    RecvLimits, RecvStream, Refusal, RoundStart, SecAggRound, SendStream, TensorDigests, UpdateHeader, MASKED_BACKBONE,
};
use tracing::{info, warn};

use super::secagg::SecAggRound as SecAggState;
use super::setup::digest_global;
use super::{Coordinator, Federation, Inner};
use crate::aggregate::{self, Aggregated, PrivateRound, ServerState, ServerStep, Update};
use crate::metrics::{MetricsLine, Participation, PrivacySpent, RefusalNote, RoundLine};
use crate::state::{Contribution, RoundRecord, Setup};

/// How long a site's poll waits for work before the coordinator answers `Heartbeat`.
const POLL_WAIT: Duration = Duration::from_secs(10);

/// The longest duration a site may report for one phase of a round (a week): `coordinator
/// report` sums them, and nothing of a round takes longer than its deadline anyway.
const MAX_DURATION_MS: u64 = 7 * 24 * 3600 * 1000;

/// The round accepting updates.
pub(super) struct OpenRound {
    pub(super) round: u32,
    opened: Instant,
    pub(super) updates: BTreeMap<String, Update>,
    /// Sites whose update of this round is arriving: the slot is taken before the payload is
    /// read, so that two concurrent uploads of one site cannot both be acknowledged.
    arriving: BTreeSet<String>,
    /// Sites whose update of this round was refused for the tensors it holds (NaN, a wrong
    /// shape, another site's heads, ...): they answered and may not send another one this
    /// round, as a failed client result in Flower. A refused header or a payload cut in transit
    /// is not here: that site may send again. With secure aggregation also the sites that
    /// dropped out of its key stages.
    pub(super) refused: BTreeSet<String>,
    /// Sites handed this round's `RoundStart`. A site works one round at a time (its previous
    /// upload was acknowledged before it polled for this one), so an update of an older round
    /// from one of them is no late arrival but a broken site: that answers this round for it.
    handed: BTreeSet<String>,
    /// Every refusal while the round was open (of this round's updates or late ones), with its
    /// reason: the round's participation in the metrics log.
    refusals: Vec<RefusalNote>,
    /// Bytes of the model streamed to each site during the round (a site that fetched twice,
    /// after a broken stream, counts both; a resumed download only what was resent).
    downloads: BTreeMap<String, u64>,
    /// Updates of this round cut in transit, by site: what arrived of each (bound to its
    /// payload digest), so that the site's resumed upload sends only the rest. One per site,
    /// each within the round's manifest; dropped with the round when it closes.
    partials: BTreeMap<String, PartialSet>,
    /// With `[plan.privacy].secure_aggregation`: the round's protocol state.
    pub(super) secagg: Option<SecAggState>,
}

impl OpenRound {
    fn new(round: u32) -> Self {
        Self {
            round,
            opened: Instant::now(),
            updates: BTreeMap::new(),
            arriving: BTreeSet::new(),
            refused: BTreeSet::new(),
            handed: BTreeSet::new(),
            refusals: Vec::new(),
            downloads: BTreeMap::new(),
            partials: BTreeMap::new(),
            secagg: None,
        }
    }

    /// Refuses `site`'s update for what it holds, which answers the round for the site, and notes
    /// the refusal in the same step: the round may close as soon as the site counts as answered,
    /// so a note added afterwards could miss the round's participation record.
    fn refuse(&mut self, site: &str, reason: &str) {
        self.refused.insert(site.to_string());
        self.note_refusal(site, reason);
    }

    /// Notes a refusal in the round's participation, once.
    fn note_refusal(&mut self, site: &str, reason: &str) {
        if !self.refusals.iter().any(|n| n.site == site && n.reason == reason) {
            self.refusals.push(RefusalNote { site: site.to_string(), reason: reason.to_string() });
        }
    }

    /// Whether the round has every input it waits for: `target` answers, or with secure
    /// aggregation an answer of every site that shared its keys (no other site can contribute).
    fn inputs_complete(&self, target: usize) -> bool {
        match self.secagg.as_ref().and_then(|s| s.shared_sites()) {
            Some(shared) => shared.iter().all(|s| self.answered(s)),
            None => self.answers() >= target,
        }
    }

    /// Whether `site` is done with this round: its update was accepted or refused.
    fn answered(&self, site: &str) -> bool {
        self.updates.contains_key(site) || self.refused.contains(site)
    }

    /// Forgets a removed site's answer (it must not count toward closing the round); whether
    /// an accepted update was dropped.
    pub(super) fn forget(&mut self, site: &str) -> bool {
        self.refused.remove(site);
        self.updates.remove(site).is_some()
    }

    /// How many sites are done with this round.
    fn answers(&self) -> usize {
        self.updates.len() + self.refused.iter().filter(|s| !self.updates.contains_key(*s)).count()
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
    /// With `[plan.privacy]`: the round's clipping and noise.
    privacy: Option<PrivateRound>,
}

impl Coordinator {
    /// The round task: once the federation is set up and launched, runs every round of the
    /// plan in turn (a dropped round is repeated), then reports the federation finished.
    /// Between rounds it admits the sites that joined ([`Coordinator::admit_joining`]).
    pub(super) async fn run_rounds(self: Arc<Self>) -> Result<()> {
        loop {
            let completed = self
                .wait_for(super::FOREVER, |i| {
                    i.running().filter(|f| i.launched || !f.joining.is_empty()).map(|f| f.completed)
                })
                .await
                .expect("waits forever");
            // Between rounds (or before the launch): sites registered to join, join now.
            self.admit_joining();
            if !self.lock().launched {
                continue;
            }
            let round = completed + 1;
            if round > self.config.plan.rounds_to_run() {
                info!(rounds = self.config.plan.rounds_to_run(), "federation finished");
                self.changed();
                if self.config.federation.exit_when_done {
                    // Give polling sites a moment to hear `Finished`.
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    return Ok(());
                }
                // Still serving (export, status): a site listed later may still join.
                loop {
                    self.wait_for(super::FOREVER, |i| i.running().filter(|f| !f.joining.is_empty()).map(|_| ())).await;
                    self.admit_joining();
                }
            }
            self.run_round(round).await;
        }
    }

    /// Opens `round`, waits for its updates, and closes it.
    async fn run_round(&self, round: u32) {
        let deadline = Instant::now() + Duration::from_secs(self.config.plan.round_deadline_s);
        let mut opened = OpenRound::new(round);
        let secure = self.config.plan.privacy.filter(|p| p.secure_aggregation);
        if let Some(privacy) = &secure {
            match self.secagg_round(round, privacy) {
                Ok(state) => opened.secagg = Some(state),
                Err(e) => {
                    tracing::error!(round, "round not opened: {e}");
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    return;
                }
            }
        }
        if let Some(federation) = self.lock().running_mut() {
            federation.open = Some(opened);
        }
        self.changed();
        info!(round, "round opened");
        if secure.is_some() && !self.secagg_key_stages(round).await {
            self.lock().running_mut().and_then(|f| f.open.take());
            self.changed();
            return;
        }
        // A round closes early once every site still in the federation answered (its update
        // accepted or refused) and at least `min_sites` answered; removed sites are not waited
        // for (their updates were dropped). Too few accepted updates then repeat the round.
        let min_sites = self.config.plan.min_sites as usize;
        let wait = deadline.saturating_duration_since(Instant::now());
        self.wait_for(wait, |i| {
            let target = self.active_sites(i).max(min_sites);
            i.running()?.open.as_ref().filter(|o| o.inputs_complete(target)).map(|_| ())
        })
        .await;
        let mut masked_mean = None;
        if secure.is_some() {
            let counted: Vec<(String, u32)> = {
                let inner = self.lock();
                let open = inner.running().and_then(|f| f.open.as_ref());
                open.map(|o| o.updates.values().map(|u| (u.site.clone(), u.header.n_cases)).collect())
                    .unwrap_or_default()
            };
            match self.secagg_unmask(round, &counted).await {
                Ok(mean) => masked_mean = Some(mean),
                Err(e) => {
                    warn!(round, "round aborted, it will be repeated: {e}");
                    self.lock().running_mut().and_then(|f| f.open.take());
                    self.changed();
                    return;
                }
            }
        }
        let Some(open) = self.lock().running_mut().and_then(|f| f.open.take()) else {
            return;
        };
        self.changed();
        let reported = open.updates.len();
        if reported < min_sites {
            warn!(round, reported, min_sites, "round closed without enough updates; it will be repeated");
            return;
        }
        self.close_round(open, masked_mean).await;
    }

    /// The secure aggregation of `round` over the sites in the federation now.
    fn secagg_round(&self, round: u32, privacy: &fedtalent_vocab::Privacy) -> Result<SecAggState> {
        let inner = self.lock();
        let federation = inner.running().context("the federation is not set up")?;
        let sites: Vec<(String, u32, u32)> = self
            .active_site_names(&inner)
            .into_iter()
            .filter_map(|s| {
                let id = self.config.federation.sites.iter().position(|c| *c == s)? as u32 + 1;
                let cases = federation.setup.cases_of(&s)?;
                Some((s, id, cases))
            })
            .collect();
        let len = aggregate::backbone_len(&federation.global);
        SecAggState::new(round, privacy, &sites, len).map_err(|e| anyhow!("secure aggregation: {e}"))
    }

    /// A site's long poll for work: its `RoundStart` while a round is open that it has not
    /// reported in, `Finished` after the last round, else `Heartbeat` after [`POLL_WAIT`].
    pub(super) async fn poll(&self, peer: &str) -> Message {
        let plan = &self.config.plan;
        let work = self
            .wait_for(POLL_WAIT, |i| {
                let federation = i.running()?;
                if federation.completed >= plan.rounds_to_run() {
                    return Some(Message::Finished(Finished {
                        rounds: plan.rounds_to_run(),
                        model_digest: federation.digest.clone(),
                    }));
                }
                let open = federation.open.as_ref()?;
                if open.answered(peer) {
                    return None;
                }
                // A site not in the round's secure aggregation waits for the next round.
                let secagg = match &open.secagg {
                    Some(s) => Some(SecAggRound { id: s.id_of(peer)?, threshold: s.threshold() as u32 }),
                    None => None,
                };
                Some(Message::RoundStart(RoundStart {
                    secagg,
                    round: open.round,
                    model_digest: federation.digest.clone(),
                    local_steps: plan.local_steps,
                    step_offset: plan.step_offset(open.round),
                    total_steps: plan.total_steps(),
                    evaluate: plan.evaluates(open.round),
                }))
            })
            .await;
        let Some(Message::RoundStart(start)) = work else {
            return work.unwrap_or(Message::Heartbeat);
        };
        let mut inner = self.lock();
        // Announce the site's part of the model the round was opened with; if a round closed
        // meanwhile, the site simply polls again.
        let Some(federation) = inner.running_mut() else {
            return Message::Heartbeat;
        };
        if federation.digest != start.model_digest || federation.open.as_ref().map(|o| o.round) != Some(start.round) {
            return Message::Heartbeat;
        }
        if let Some(open) = federation.open.as_mut() {
            open.handed.insert(peer.to_string());
        }
        Message::RoundStart(RoundStart { model_digest: federation.site_digest(peer), ..start })
    }

    /// Streams the current global model's backbone plus the site's heads (all heads if `full`),
    /// each tensor from where the site's `held` copy of a cut download ends.
    pub(super) async fn send_model(
        &self,
        peer: &str,
        digest: &str,
        full: bool,
        held: &Held,
        send: &mut fedtalent_protocol::SendStream,
    ) -> Result<()> {
        let (set, mut digests, version) = {
            let mut inner = self.lock();
            let federation = inner.running_mut().context("the federation is not set up yet")?;
            // The operator names the whole model by its global digest, a site its part by the
            // digest its RoundStart announced.
            let (selection, current) = if full {
                (federation.selection.clone(), federation.digest.clone())
            } else {
                (federation.selection.of_site(peer), federation.site_digest(peer))
            };
            anyhow::ensure!(digest == current, "model {digest} is not the current global model {current}");
            let set = wire::parts_to_wire(&federation.global, &selection);
            (set, federation.wire_digests.clone(), federation.digest.clone())
        };
        let sent = fedtalent_protocol::conn::send_tensors_shared(send, Arc::new(set), &mut digests, held)
            .await
            .map_err(|e| anyhow!("streaming the model to {peer}: {e}"))?;
        let bytes = sent.bytes;
        if !held.tensors.is_empty() {
            info!(site = %peer, held_bytes = held.bytes(), sent_bytes = bytes, "resumed a cut model download");
        }
        if let Some(federation) = self.lock().running_mut().filter(|f| f.digest == version) {
            federation.wire_digests.merge(digests);
            // A site's download is part of the round it works on; the operator's is not.
            if let Some(open) = federation.open.as_mut().filter(|_| !full) {
                *open.downloads.entry(peer.to_string()).or_default() += bytes;
            }
        }
        Ok(())
    }

    /// Admits a site's update into the open round, or refuses it, and says which.
    pub(super) async fn receive_update(
        &self,
        peer: &str,
        header: UpdateHeader,
        send: &mut SendStream,
        recv: &mut RecvStream,
    ) -> Message {
        let round = header.round;
        let refusal = self.admit_update(peer, header, send, recv).await.err();
        if let Some(refusal) = &refusal {
            warn!(site = %peer, round, "update refused: {}", refusal.reason);
            // A refusal that answered the round was noted already, with the answer.
            if let Some(open) = self.lock().running_mut().and_then(|f| f.open.as_mut()) {
                open.note_refusal(peer, &refusal.reason);
            }
            // A refusal may have been the round's last answer: the round task re-checks.
            self.changed();
        }
        Message::Ack(Ack { round, refusal })
    }

    /// The steps of admitting an update: its header (before the payload is read, so a refused
    /// update costs nothing more), its payload within the round's deadline, its tensors against
    /// the global model, and finally the round still being open for the site.
    async fn admit_update(
        &self,
        peer: &str,
        header: UpdateHeader,
        send: &mut SendStream,
        recv: &mut RecvStream,
    ) -> std::result::Result<(), Refusal> {
        let round = header.round;
        if header.resume {
            self.wait_for_cut_upload(peer, round).await;
        }
        let (_slot, limits, until, mut partial) = match self.reserve_slot(peer, &header) {
            Ok(reserved) => reserved,
            Err(refusal) => {
                let _ = recv.stop(close::REFUSED);
                return Err(refusal);
            }
        };
        if header.resume {
            let held = partial.held(&header.payload_digest);
            info!(site = %peer, round, held_bytes = held.bytes(), "resuming a cut update");
            if let Err(e) = write_frame(send, &Message::Resume(held)).await {
                return Err(Refusal::new(ErrorKind::BadUpdate, format!("site {peer}: resuming its update: {e}")));
            }
        }
        // A stalled payload would hold its slot (and this task) forever: it must arrive before
        // the round closes, when it could not count any more. No shorter stall timeout: until
        // the deadline a stalled upload is an absent site, which the round waits for anyway, as
        // for a site still training; a shorter one would only drop slow honest links.
        let receiving = Instant::now();
        let receiving_payload = recv_tensors_resumable(recv, &limits, &mut partial);
        let received = match tokio::time::timeout_at(until.into(), receiving_payload).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                let _ = recv.stop(close::REFUSED);
                let reason = format!("payload: {e}");
                if !e.is_transport() {
                    self.mark_refused(peer, round, &reason);
                }
                self.keep_partial(peer, round, partial);
                return Err(Refusal::new(ErrorKind::BadUpdate, reason));
            }
            Err(_) => {
                let _ = recv.stop(close::REFUSED);
                return Err(Refusal::new(
                    ErrorKind::LateUpdate,
                    format!(
                        "site {peer}: payload of round {round} still arriving at its deadline ({} s after the round opened)",
                        self.config.plan.round_deadline_s
                    ),
                ));
            }
        };
        let Received { mut set, digest, wire_bytes, received_bytes, attempts } = received;
        // With secure aggregation the backbone arrived as one masked tensor.
        let masked = set.tensors.iter().position(|t| t.name == MASKED_BACKBONE).map(|i| set.tensors.remove(i));
        // Decoding the payload's tensors is the large part of the work: outside the lock.
        let parts = Parts::from_wire(&set).map_err(|e| {
            let reason = format!("{e:#}");
            self.mark_refused(peer, round, &reason);
            Refusal::new(ErrorKind::BadUpdate, reason)
        })?;
        let mut inner = self.lock();
        let joined = inner.sites.get(peer).is_some_and(|s| s.joined);
        let federation = inner.running_mut().ok_or_else(|| late(format!("round {round} is closed")))?;
        let secure = federation.open.as_ref().filter(|o| o.round == round).is_some_and(|o| o.secagg.is_some());
        let checked = match (&masked, secure) {
            // Not checkable per update under secure aggregation: recorded as 0.
            (Some(_), true) => {
                aggregate::validate_masked(&federation.global, &federation.selection, peer, &parts).map(|()| 0.0)
            }
            (None, true) => {
                Err(anyhow!("site {peer}: round {round} aggregates the backbone securely: no {MASKED_BACKBONE}"))
            }
            (Some(_), false) => Err(anyhow!("site {peer}: a masked backbone in round {round}, which is not secure")),
            (None, false) => aggregate::validate(
                &federation.global,
                &federation.selection,
                peer,
                &parts,
                self.config.plan.max_update_norm,
            ),
        };
        let backbone_norm = match checked {
            Ok(norm) => norm,
            Err(e) => {
                let reason = format!("{e:#}");
                if let Some(open) = federation.open.as_mut().filter(|o| o.round == round) {
                    open.refuse(peer, &reason);
                }
                return Err(Refusal::new(ErrorKind::BadUpdate, reason));
            }
        };
        // The site may have been removed, or the round closed, while the payload was streaming.
        if !joined {
            return Err(Refusal::new(ErrorKind::NotAllowed, format!("site {peer} was removed from the federation")));
        }
        let open = federation
            .open
            .as_mut()
            .filter(|o| o.round == round)
            .ok_or_else(|| late(format!("round {round} closed while the update was arriving")))?;
        if let (Some(secagg), Some(masked)) = (open.secagg.as_mut(), &masked) {
            // The masked input counts iff the update does: both under this lock.
            if let Err(e) = secagg.masked_input(peer, masked) {
                open.refuse(peer, &e);
                return Err(Refusal::new(ErrorKind::BadUpdate, e));
            }
        }
        let upload_ms = receiving.elapsed().as_millis() as u64;
        let n_cases = header.n_cases;
        let loss = header.train_loss;
        let header = UpdateHeader { payload_digest: digest, ..header };
        open.updates.insert(
            peer.to_string(),
            Update { site: peer.to_string(), header, bytes: set.total_bytes(), upload_ms, backbone_norm, parts },
        );
        drop(inner);
        self.changed();
        info!(site = %peer, round, n_cases, loss, wire_bytes, received_bytes, attempts, "update accepted");
        Ok(())
    }

    /// A site that resumes its cut upload may have reconnected before this side noticed that
    /// the cut stream ended (a link that went silent, not reset): that stream still holds the
    /// site's slot in the round. It ends at the latest when its connection idles out; until
    /// then the resumed upload waits for the slot rather than being refused for it.
    async fn wait_for_cut_upload(&self, peer: &str, round: u32) {
        let free = |i: &Inner| {
            let open = i.running().and_then(|f| f.open.as_ref()).filter(|o| o.round == round);
            (!open.is_some_and(|o| o.arriving.contains(peer))).then_some(())
        };
        if self.wait_for(fedtalent_protocol::tcp::IDLE_TIMEOUT, free).await.is_none() {
            warn!(site = %peer, round, "its cut upload still holds its slot; the resumed one is refused");
        }
    }

    /// Keeps what arrived of `peer`'s cut update of `round` for its resumed upload, while that
    /// round is open (a refused or completed one has nothing kept: `partial` is empty then).
    fn keep_partial(&self, peer: &str, round: u32, partial: PartialSet) {
        if partial.kept_bytes() == 0 {
            return;
        }
        if let Some(open) = self.lock().running_mut().and_then(|f| f.open.as_mut()).filter(|o| o.round == round) {
            info!(site = %peer, round, kept_bytes = partial.kept_bytes(), "kept a cut update for its resumption");
            open.partials.insert(peer.to_string(), partial);
        }
    }

    /// Records that `peer`'s update of `round` was refused for what it holds (see
    /// [`OpenRound::refuse`]), if that round is still open.
    fn mark_refused(&self, peer: &str, round: u32, reason: &str) {
        if let Some(open) = self.lock().running_mut().and_then(|f| f.open.as_mut()).filter(|o| o.round == round) {
            open.refuse(peer, reason);
        }
    }

    /// Checks an update's header against the open round and takes the site's arriving slot in
    /// it; returns the slot, the payload's limits, the time by which it must have arrived, and
    /// what was kept of this very update (its payload digest) from a cut upload.
    fn reserve_slot(
        &self,
        peer: &str,
        header: &UpdateHeader,
    ) -> std::result::Result<(Slot<'_>, RecvLimits, Instant, PartialSet), Refusal> {
        let bad = |reason: String| Refusal::new(ErrorKind::BadUpdate, reason);
        let round = header.round;
        let mut inner = self.lock();
        let federation = inner.running_mut().ok_or_else(|| late(format!("round {round} is closed")))?;
        // The manifest names every class's heads (so that another site's heads reach
        // `validate` and are refused by name); which of them must be there, each with every
        // tensor, is `validate`'s check.
        let mut manifest = wire::parts_manifest(&federation.global, &federation.selection);
        if federation.open.as_ref().is_some_and(|o| o.round == round && o.secagg.is_some()) {
            for (name, _) in federation.global.params().backbone() {
                manifest.remove(&name);
            }
            let len = aggregate::backbone_len(&federation.global) as u64;
            manifest.insert(MASKED_BACKBONE.to_string(), (DType::I32, vec![len]));
        }
        let mut limits = RecvLimits::for_manifest(manifest);
        limits.require_all = false;
        limits.expected_digest = Some(header.payload_digest.clone());
        let open = match federation.open.as_mut() {
            Some(open) if open.round == round && open.refused.contains(peer) => {
                return Err(bad(format!("site {peer}: its update of round {round} was refused already")));
            }
            Some(open) if open.round == round && open.answered(peer) => {
                return Err(bad(format!("site {peer} already sent round {round}")));
            }
            Some(open) if open.round == round => open,
            Some(open) if round < open.round && open.handed.contains(peer) => {
                let reason =
                    format!("round {round} is not the open round {}, which site {peer} was handed already", open.round);
                open.refuse(peer, &reason);
                return Err(bad(reason));
            }
            Some(open) => return Err(late(format!("round {round} is not the open round {}", open.round))),
            None => return Err(late(format!("round {round} is closed"))),
        };
        // A refused header costs the site nothing but this message: it may send a corrected one
        // in this round, so the refusal does not answer the round for it.
        check_header(peer, header, &federation.setup).map_err(bad)?;
        if !open.arriving.insert(peer.to_string()) {
            return Err(bad(format!("site {peer}: another update of round {round} is already arriving")));
        }
        let until = open.opened + Duration::from_secs(self.config.plan.round_deadline_s);
        // Another update of the site (another digest) makes what was kept of the last useless.
        let partial = open.partials.remove(peer).filter(|p| p.key() == Some(header.payload_digest.as_str()));
        Ok((Slot { coordinator: self, site: peer.to_string(), round }, limits, until, partial.unwrap_or_default()))
    }

    /// Aggregates the round into a copy of the global model and commits it. An aggregation
    /// error drops the round (it is repeated). A checkpoint error (disk full, state dir not
    /// writable) must not stop `serve` nor leave the in-memory model ahead of the disk: the
    /// global model stays the previous round's until the checkpoint is written, and the commit
    /// is retried with back-off, keeping the sites' updates (they poll `Heartbeat` meanwhile).
    async fn close_round(&self, open: OpenRound, masked_mean: Option<Vec<f32>>) {
        let round = open.round;
        let closing = Instant::now();
        let next = match self.aggregate_round(&open, masked_mean.as_deref()) {
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
    fn aggregate_round(&self, open: &OpenRound, masked_mean: Option<&[f32]>) -> Result<NextGlobal> {
        let (mut net, mut server, selection, classes) = {
            let inner = self.lock();
            let federation = inner.running().context("the federation is not set up")?;
            let velocity = federation.server.velocity.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
            (
                federation.global.deep_copy(),
                ServerState { velocity },
                federation.selection.clone(),
                federation.setup.classes.clone(),
            )
        };
        let updates: Vec<&Update> = open.updates.values().collect();
        let step = ServerStep {
            optimizer: &self.config.plan.server,
            state: &mut server,
            privacy: self.config.plan.privacy.as_ref().filter(|p| p.differential()),
        };
        let Aggregated { weights, privacy } = match masked_mean {
            Some(mean) => aggregate::aggregate_masked(&mut net, &updates, step, &selection, mean)?,
            None => aggregate::aggregate(&mut net, &updates, step, &selection)?,
        };
        let (digest, wire_digests) = digest_global(self.config.plan.transport, &selection, &net);
        let contributions: Vec<Contribution> = updates
            .iter()
            .zip(&weights)
            .map(|(u, &weight)| Contribution {
                site: u.site.clone(),
                n_cases: u.header.n_cases,
                weight,
                train_loss: u.header.train_loss,
                payload_digest: u.header.payload_digest.clone(),
                backbone_norm: u.backbone_norm,
            })
            .collect();
        let record = RoundRecord { round: open.round, digest, contributions, classes, unix_time: unix_now() };
        Ok(NextGlobal { net, server, record, wire_digests, weights, privacy })
    }

    /// `[plan.privacy]`'s account once `round` is released (logged, and for the metrics).
    fn privacy_spent(&self, round: u32, updates: &[&Update], private: Option<&PrivateRound>) -> Option<PrivacySpent> {
        let (plan, private) = (self.config.plan.privacy.filter(|p| p.differential())?, private?);
        let clipped: Vec<String> = updates
            .iter()
            .zip(&private.clip_factors)
            .filter(|(_, &factor)| factor < 1.0)
            .map(|(u, _)| u.site.clone())
            .collect();
        let epsilon = plan.epsilon(round);
        info!(round, epsilon, delta = plan.delta, noise_std = private.noise_std, clipped = ?clipped, "privacy spent");
        Some(PrivacySpent { epsilon, delta: plan.delta, noise_std: private.noise_std, clipped })
    }

    /// Who `open` waited for (the configured sites not removed) and whom it refused.
    fn participation(&self, open: &OpenRound) -> Participation {
        Participation { expected: self.active_site_names(&self.lock()), refusals: open.refusals.clone() }
    }

    /// Makes the checkpointed aggregate the global model and logs the round's metrics. A
    /// metrics write error is a warning: the checkpoint, already written, is what counts.
    fn commit_round(&self, open: &OpenRound, next: NextGlobal, closing: Instant) {
        let updates: Vec<&Update> = open.updates.values().collect();
        let mut lines = MetricsLine::of_updates(open.round, &updates, &next.weights, &open.downloads);
        let privacy = self.privacy_spent(open.round, &updates, next.privacy.as_ref());
        lines.push(MetricsLine::Round(
            RoundLine::new(
                open.round,
                open.opened.elapsed().as_millis() as u64,
                // Aggregation, metrics and the atomic checkpoint (the checkpoint is already written).
                closing.elapsed().as_millis() as u64,
                updates.len(),
            )
            .with_privacy(privacy)
            .with_participation(self.participation(open)),
        ));
        if let Err(e) = self.state.append_metrics(&lines) {
            warn!(round = open.round, "metrics of the round not written (its checkpoint is): {e:#}");
        }
        self.publish_round(&lines);
        info!(
            round = open.round,
            reported = updates.len(),
            close_ms = closing.elapsed().as_millis() as u64,
            "round aggregated and checkpointed"
        );
        let mut inner = self.lock();
        for u in &updates {
            for (class, dice) in &u.header.dice {
                inner.last_dice.insert(class.clone(), *dice);
            }
            let site = inner.sites.entry(u.site.clone()).or_default();
            site.last_round = Some(open.round);
            site.last_loss = Some(u.header.train_loss);
        }
        if let Some(federation) = inner.running_mut() {
            federation.global = next.net;
            federation.server = next.server;
            federation.digest = next.record.digest;
            federation.site_digests.clear();
            federation.wire_digests = next.wire_digests;
            federation.completed = open.round;
        }
        drop(inner);
        self.changed();
    }
}

impl Federation {
    /// The digest of `peer`'s part of the current global model (see `site_digests`).
    fn site_digest(&mut self, peer: &str) -> String {
        if let Some(digest) = self.site_digests.get(peer) {
            return digest.clone();
        }
        let set = wire::parts_to_wire(&self.global, &self.selection.of_site(peer));
        let digest = set.wire_digest_cached(&mut self.wire_digests);
        self.site_digests.insert(peer.to_string(), digest.clone());
        digest
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
        let mut inner: std::sync::MutexGuard<'_, Inner> = self.coordinator.lock();
        if let Some(open) = inner.running_mut().and_then(|f| f.open.as_mut()).filter(|o| o.round == self.round) {
            open.arriving.remove(&self.site);
        }
        drop(inner);
        // A resumed upload of the site may be waiting for the slot.
        self.coordinator.changed();
    }
}

fn late(reason: String) -> Refusal {
    Refusal::new(ErrorKind::LateUpdate, reason)
}

/// The scalar fields of an update header: a loss or Dice that is not a finite number would
/// end up as `null` in the round record and the metrics (and make the checkpoint unreadable).
/// What an update's header says of itself: its training cases those the site registered, its
/// metrics finite and its own (checked before the payload is read).
fn check_header(peer: &str, header: &UpdateHeader, setup: &Setup) -> std::result::Result<(), String> {
    let registered = setup.cases_of(peer);
    if registered != Some(header.n_cases) {
        return Err(format!(
            "site {peer}: n_cases {} is not its {} registered training cases",
            header.n_cases,
            registered.map_or("(none)".to_string(), |n| n.to_string())
        ));
    }
    check_metrics(peer, header, setup)?;
    if !header.train_loss.is_finite() {
        return Err(format!("site {peer}: train_loss is {}, not a finite number", header.train_loss));
    }
    if let Some((class, dice)) = header.dice.iter().find(|(_, d)| !d.is_finite()) {
        return Err(format!("site {peer}: dice of class {class:?} is {dice}, not a finite number"));
    }
    Ok(())
}

/// The metrics of an update header: Dice only for classes the sender owns, each once (they
/// become the federation's reported Dice of those classes); durations below
/// [`MAX_DURATION_MS`].
fn check_metrics(peer: &str, header: &UpdateHeader, setup: &Setup) -> std::result::Result<(), String> {
    let mut seen = BTreeSet::new();
    for (class, _) in &header.dice {
        if !setup.classes.iter().any(|c| &c.id == class && c.site == peer) {
            return Err(format!("site {peer}: dice of class {class:?}, which is not one of its classes"));
        }
        if !seen.insert(class) {
            return Err(format!("site {peer}: dice of class {class:?} reported twice"));
        }
    }
    let longest = header.durations_ms.max();
    if longest > MAX_DURATION_MS {
        return Err(format!(
            "site {peer}: durations_ms {:?} has a phase of {longest} ms, over the cap of {MAX_DURATION_MS} ms",
            header.durations_ms
        ));
    }
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::OpenRound;

    /// A refusal that answers the round is in the round's participation record the moment the
    /// site counts as answered: the round may close right then (a refusal noted in a second
    /// step was lost that way under load), and a repeated note is not a second refusal.
    #[test]
    fn a_refusal_answers_the_round_and_is_noted_together() {
        let mut open = OpenRound::new(3);
        open.refuse("liver", "tensor \"x\" holds NaN");
        assert!(open.answered("liver"));
        assert_eq!(open.refusals.len(), 1);
        assert_eq!(
            (open.refusals[0].site.as_str(), open.refusals[0].reason.as_str()),
            ("liver", "tensor \"x\" holds NaN")
        );
        open.note_refusal("liver", "tensor \"x\" holds NaN");
        open.note_refusal("kidney", "payload: shape");
        assert_eq!(open.refusals.len(), 2);
        assert!(!open.answered("kidney"), "a refused header does not answer the round");
    }
}
