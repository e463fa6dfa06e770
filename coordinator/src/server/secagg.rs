//! Secure aggregation of a round's backbone (`[plan.privacy].secure_aggregation`, crate
//! `fedtalent-secagg`): the coordinator runs the protocol's server side inside the open round.
//!
//! The round task drives the stages: it opens the round with a [`SecAggRound`] over the sites in
//! the federation, closes the key advertisement and the key sharing once every site sent or
//! `secagg_stage_timeout_s` passed ([`Coordinator::secagg_key_stages`]), waits for the masked
//! uploads as for any round's updates, then closes the masked input, waits for the unmasking
//! answers and unmasks the sum ([`Coordinator::secagg_unmask`]). Each site's requests
//! ([`Coordinator::secagg_request`]) are long polls answered when their stage closes. A stage
//! with fewer sites than the threshold aborts the round, which is then repeated with fresh keys.
//!
//! The coordinator sees each site's heads and decoder as before, but of the backbone only the
//! sum: it can no longer check one site's backbone values (finite) nor its update norm (the
//! `max_update_norm` poisoning filter). Each site refuses to mask a non-finite value and clamps
//! every coordinate of its change to `secagg_clip_range` (with DP it also clips the whole change
//! to `clip_norm`), so that no site moves a coordinate of the sum by more than
//! sqrt(n_k)·`secagg_clip_range`.

use std::collections::BTreeMap;
use std::time::Duration;

use fedtalent_protocol::{
    AdvertiseKeys, ErrorKind, Message, Refusal, SecAggReply, SecAggRequest, SecAggStage, WireTensor, MASKED_BACKBONE,
};
use fedtalent_secagg::{Encoding, Params, Server, Unmasking};
use fedtalent_vocab::Privacy;
use tracing::{info, warn};

use super::{Coordinator, Inner};

/// A stage's outcome once it closed; `Err`: the round's secure aggregation aborted.
type Closed<T> = Option<Result<T, String>>;

/// The secure aggregation of one open round.
pub(super) struct SecAggRound {
    server: Server,
    /// Each site of the round by name, with its id (its place in `[federation].sites`, 1-based).
    ids: BTreeMap<String, u32>,
    peers: Closed<Vec<AdvertiseKeys>>,
    shared: Closed<Vec<u32>>,
    unmasking: Closed<Unmasking>,
}

/// The fixed-point encoding of `[plan.privacy]`.
pub fn encoding(privacy: &Privacy) -> Encoding {
    Encoding { clip_range: privacy.secagg_clip_range, frac_bits: privacy.secagg_frac_bits }
}

impl SecAggRound {
    /// A round of the sites `sites` (name, id, registered cases) over a backbone of `len` values;
    /// refused when their sqrt(n) weights could overflow the fixed-point sum.
    pub(super) fn new(round: u32, privacy: &Privacy, sites: &[(String, u32, u32)], len: usize) -> Result<Self, String> {
        let threshold = privacy.secagg_threshold_of(sites.len()).min(sites.len()).max(1);
        let encoding = encoding(privacy);
        let total: f64 = sites.iter().map(|(_, _, n)| (*n as f64).sqrt()).sum();
        encoding.check_total(total, sites.len()).map_err(|e| e.to_string())?;
        Ok(SecAggRound {
            server: Server::new(Params { round, threshold, encoding }, len),
            ids: sites.iter().map(|(s, id, _)| (s.clone(), *id)).collect(),
            peers: None,
            shared: None,
            unmasking: None,
        })
    }

    pub(super) fn id_of(&self, site: &str) -> Option<u32> {
        self.ids.get(site).copied()
    }

    pub(super) fn threshold(&self) -> usize {
        self.server.params().threshold
    }

    /// The sites of U2 (that shared their keys), once known.
    pub(super) fn shared_sites(&self) -> Option<Vec<&str>> {
        let ids = self.shared.as_ref()?.as_ref().ok()?;
        Some(self.ids.iter().filter(|(_, id)| ids.contains(id)).map(|(s, _)| s.as_str()).collect())
    }

    /// Adds `peer`'s masked backbone (the `I32` tensor [`MASKED_BACKBONE`]) to the sum.
    pub(super) fn masked_input(&mut self, peer: &str, masked: &WireTensor) -> Result<(), String> {
        let id = self.id_of(peer).ok_or_else(|| format!("site {peer} is not in this round's secure aggregation"))?;
        if masked.dtype != fedtalent_protocol::DType::I32 || !masked.data.len().is_multiple_of(4) {
            return Err(format!("site {peer}: {MASKED_BACKBONE} must be I32 words"));
        }
        let words: Vec<u32> =
            masked.data.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
        self.server.masked_input(id, &words).map_err(|e| format!("site {peer}: {e}"))
    }

    /// Stage 2 closed and the unmasking answers in: the weighted mean change of the survivors,
    /// which must be `counted` (the sites whose updates the round holds).
    fn finish(&mut self, counted: &[(String, u32)]) -> Result<Vec<f32>, String> {
        let (sum, survivors) = self.server.finish().map_err(|e| e.to_string())?;
        let mut names: Vec<&str> = survivors
            .iter()
            .filter_map(|id| self.ids.iter().find(|(_, i)| *i == id).map(|(s, _)| s.as_str()))
            .collect();
        names.sort_unstable();
        let mut held: Vec<&str> = counted.iter().map(|(s, _)| s.as_str()).collect();
        held.sort_unstable();
        if names != held {
            return Err(format!("the unmasked sum holds sites {names:?}, the round's updates {held:?}"));
        }
        let total: f64 = counted.iter().map(|(_, n)| (*n as f64).sqrt()).sum();
        Ok(self.server.params().encoding.decode_mean(&sum, total))
    }
}

impl Coordinator {
    fn stage_timeout(&self) -> Duration {
        Duration::from_secs(self.config.plan.privacy.map_or(120, |p| p.secagg_stage_timeout_s))
    }

    /// Runs `f` on round `round`'s secure aggregation, if that round is open with one.
    fn with_secagg<T>(&self, round: u32, f: impl FnOnce(&mut SecAggRound) -> T) -> Option<T> {
        let mut inner = self.lock();
        let open = inner.running_mut()?.open.as_mut().filter(|o| o.round == round)?;
        open.secagg.as_mut().map(f)
    }

    fn secagg_of(inner: &Inner, round: u32) -> Option<&SecAggRound> {
        inner.running()?.open.as_ref().filter(|o| o.round == round)?.secagg.as_ref()
    }

    /// Stages 0 and 1: each closes once every site of the round sent, or at the stage timeout.
    /// Whether the round goes on (else its secure aggregation aborted, and it is repeated).
    pub(super) async fn secagg_key_stages(&self, round: u32) -> bool {
        let all_advertised =
            |i: &Inner| Self::secagg_of(i, round).filter(|s| s.server.advertised() == s.ids.len()).map(|_| ());
        self.wait_for(self.stage_timeout(), all_advertised).await;
        let peers = self.with_secagg(round, |s| {
            let peers = s.server.close_advertise().map_err(|e| e.to_string());
            s.peers = Some(peers.clone());
            peers.map(|p| p.len())
        });
        self.changed();
        match peers {
            Some(Ok(n)) => info!(round, sites = n, "secure aggregation: keys advertised"),
            Some(Err(e)) => {
                warn!(round, "round aborted, it will be repeated: {e}");
                return false;
            }
            None => return false,
        }
        let all_shared = |i: &Inner| {
            Self::secagg_of(i, round)
                .filter(|s| {
                    s.peers.as_ref().and_then(|p| p.as_ref().ok()).is_some_and(|p| s.server.shared() == p.len())
                })
                .map(|_| ())
        };
        self.wait_for(self.stage_timeout(), all_shared).await;
        let shared = self.with_secagg(round, |s| {
            let shared = s.server.close_share_keys().map_err(|e| e.to_string());
            s.shared = Some(shared.clone());
            shared.map(|p| p.len())
        });
        self.changed();
        match shared {
            Some(Ok(n)) => {
                info!(round, sites = n, "secure aggregation: key shares relayed");
                true
            }
            Some(Err(e)) => {
                warn!(round, "round aborted, it will be repeated: {e}");
                false
            }
            None => false,
        }
    }

    /// Stages 2 and 3: closes the masked input, waits for every survivor's unmasking answer
    /// (at least the threshold by the stage timeout) and unmasks the weighted mean change of the
    /// round's updates (`counted`: site and case count).
    pub(super) async fn secagg_unmask(&self, round: u32, counted: &[(String, u32)]) -> Result<Vec<f32>, String> {
        let request = self
            .with_secagg(round, |s| {
                let request = s.server.close_masked_input().map_err(|e| e.to_string());
                s.unmasking = Some(request.clone());
                request
            })
            .ok_or("the round closed")??;
        self.changed();
        info!(round, survivors = ?request.survivors, dropped = ?request.dropped, "secure aggregation: unmasking");
        let everyone = request.survivors.len();
        let all_answered = |i: &Inner| Self::secagg_of(i, round).filter(|s| s.server.answers() == everyone).map(|_| ());
        self.wait_for(self.stage_timeout(), all_answered).await;
        let started = std::time::Instant::now();
        let mean = self.with_secagg(round, |s| s.finish(counted)).ok_or("the round closed")??;
        info!(round, unmask_ms = started.elapsed().as_millis() as u64, "secure aggregation: sum unmasked");
        Ok(mean)
    }

    /// A site's request of one stage, answered once the stage closed. A refusal drops the site
    /// from the round (it has answered it).
    pub(super) async fn secagg_request(&self, peer: &str, request: SecAggRequest) -> Message {
        let round = request.round;
        let answer = self.secagg_answer(peer, request).await;
        match answer {
            Ok(reply) => Message::SecAggReply(reply),
            Err(reason) => {
                warn!(site = %peer, round, "secure aggregation request refused: {reason}");
                if let Some(open) = self.lock().running_mut().and_then(|f| f.open.as_mut()).filter(|o| o.round == round)
                {
                    open.refused.insert(peer.to_string());
                }
                self.changed();
                Message::Error(Refusal::new(ErrorKind::LateUpdate, reason))
            }
        }
    }

    async fn secagg_answer(&self, peer: &str, request: SecAggRequest) -> Result<SecAggReply, String> {
        let round = request.round;
        let closed = || format!("round {round} is not open with secure aggregation");
        let id = self.with_secagg(round, |s| s.id_of(peer)).ok_or_else(closed)?;
        let id = id.ok_or_else(|| format!("site {peer} is not in round {round}'s secure aggregation"))?;
        // A stage's wait ends with the round at the latest.
        let until = Duration::from_secs(self.config.plan.round_deadline_s);
        match request.stage {
            SecAggStage::Keys(keys) => {
                if keys.id != id {
                    return Err(format!("site {peer}: keys for id {}, its id is {id}", keys.id));
                }
                self.with_secagg(round, |s| s.server.advertise(keys)).ok_or_else(closed)?.map_err(|e| e.to_string())?;
                self.changed();
                let peers = self.wait_for(until, |i| Self::secagg_of(i, round)?.peers.clone()).await;
                let peers = peers.ok_or_else(closed)??;
                Ok(SecAggReply::Peers(peers))
            }
            SecAggStage::Shares(shares) => {
                self.with_secagg(round, |s| s.server.share_keys(id, shares))
                    .ok_or_else(closed)?
                    .map_err(|e| e.to_string())?;
                self.changed();
                let shared = self.wait_for(until, |i| Self::secagg_of(i, round)?.shared.clone()).await;
                shared.ok_or_else(closed)??;
                let relayed = self.with_secagg(round, |s| s.server.shares_for(id)).ok_or_else(closed)?;
                Ok(SecAggReply::Relayed(relayed))
            }
            SecAggStage::UnmaskPoll => {
                let request = self.wait_for(until, |i| Self::secagg_of(i, round)?.unmasking.clone()).await;
                let Unmasking { survivors, dropped } = request.ok_or_else(closed)??;
                if !survivors.contains(&id) {
                    return Err(format!("site {peer}: its masked input is not in round {round}"));
                }
                Ok(SecAggReply::Unmasking { survivors, dropped })
            }
            SecAggStage::Unmask(answer) => {
                if answer.from != id {
                    return Err(format!("site {peer}: unmasking shares from id {}, its id is {id}", answer.from));
                }
                self.with_secagg(round, |s| s.server.unmask(answer)).ok_or_else(closed)?.map_err(|e| e.to_string())?;
                self.changed();
                Ok(SecAggReply::Accepted)
            }
        }
    }
}
