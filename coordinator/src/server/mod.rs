//! `coordinator serve`: the federation as a state machine over one lock.
//!
//! The federation is first [`Phase::Registering`]: every listed site says `Hello` with its
//! classes, case count and HU histogram. Once all did, [`setup`] fixes the global class list,
//! the CT normalization and the global model, and the phase becomes [`Phase::Running`] (a
//! restarted coordinator starts there, from its last checkpoint). Running, the round task
//! ([`round`]) opens a round, admits the sites' updates, closes it (aggregate, checkpoint,
//! commit) and opens the next, until the plan's rounds are done.
//!
//! Around it: [`accept`] takes connections and keeps the membership (allowlist, removals),
//! [`dispatch`] turns each request stream into a call of the phase's handlers, [`export`] writes
//! the global model for PyTorch users.
//!
//! Every request is one bidirectional stream opened by the peer: `Hello` → `Welcome`;
//! `Heartbeat` (a site's long poll for work) → `RoundStart` | `Heartbeat` | `Finished`;
//! `ModelRequest` → tensor stream; `UpdateHeader` + tensor stream → `Ack`; `Admin` → `AdminReply`.

mod accept;
mod dispatch;
mod export;
mod join;
mod publish;
mod round;
mod secagg;
mod setup;
mod start_from;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use fedtalent_certs::Allowlist;
use fedtalent_model::wire::Selection;
use fedtalent_model::MultiTalentNet;
use fedtalent_protocol::{Connection, TensorDigests};
use tokio::sync::watch;
use tracing::info;

pub use accept::HandshakeLimiter;
pub use export::{export_from_state, export_model};
pub use publish::{write_progress_png, write_progress_png_to};

use crate::aggregate::ServerState;
use crate::config::{FederationConfig, Launch, ADMIN_IDENTITY};
use crate::state::{Setup, StateDir};
use round::OpenRound;
use setup::Registration;

/// "No timeout" for waits that end only on an event (ten years, far from Instant overflow).
const FOREVER: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Where the federation is. It only moves forward: registering → running.
enum Phase {
    /// Waiting until every site of `[federation].sites` has registered (by site).
    Registering(BTreeMap<String, Registration>),
    /// Set up: the classes, normalization and global model are fixed; rounds run.
    Running(Box<Federation>),
}

/// A federation that is set up.
struct Federation {
    setup: Setup,
    /// Every class's heads and every site's decoder of `global`, at their places.
    selection: Selection,
    global: MultiTalentNet,
    /// The server optimizer's state over `global`'s backbone.
    server: ServerState,
    /// Digest naming `global` (over all its parts).
    digest: String,
    /// Per site, the digest of its part of `global` as its download carries it (what its
    /// `RoundStart` announces, so that the site can bind the download to the announcement);
    /// filled on demand, emptied whenever `global` changes.
    site_digests: BTreeMap<String, String>,
    /// Per-tensor wire digests of `global` (filled as it is hashed or sent), so that streaming
    /// it to N sites hashes each tensor once, not N times.
    wire_digests: TensorDigests,
    /// Rounds completed (checkpointed) so far.
    completed: u32,
    /// The round accepting updates, if one is.
    open: Option<OpenRound>,
    /// Sites listed after the setup that registered and join before the next round (by site).
    joining: BTreeMap<String, Registration>,
}

/// What the coordinator knows of one site, whatever the phase.
#[derive(Default)]
struct SiteState {
    /// Its open connections (QUIC or TLS over TCP) by [`Connection::stable_id`], so that a
    /// removal can close them.
    connections: BTreeMap<usize, Connection>,
    /// Its requests being served now (see [`accept::MAX_STREAMS_PER_SITE`]).
    streams: usize,
    /// Its Hello was accepted by this run of the coordinator: only then may it poll, download
    /// or upload (membership is checked per request, not only at Hello).
    joined: bool,
    last_round: Option<u32>,
    last_loss: Option<f32>,
}

/// Everything that changes while serving, behind one lock (sections are short, no awaits).
struct Inner {
    phase: Phase,
    launched: bool,
    sites: BTreeMap<String, SiteState>,
    /// Sites of `[federation].sites` (as at start) that the operator removed since: they are
    /// no longer members, and rounds neither wait for nor count them.
    removed: BTreeSet<String>,
    last_dice: BTreeMap<String, f32>,
}

impl Inner {
    fn running(&self) -> Option<&Federation> {
        match &self.phase {
            Phase::Running(f) => Some(f),
            Phase::Registering(_) => None,
        }
    }

    fn running_mut(&mut self) -> Option<&mut Federation> {
        match &mut self.phase {
            Phase::Running(f) => Some(f),
            Phase::Registering(_) => None,
        }
    }
}

pub struct Coordinator {
    config: FederationConfig,
    state: StateDir,
    inner: Mutex<Inner>,
    /// Bumped on every state change that a waiting request may care about.
    changes: watch::Sender<u64>,
    pub allowlist: Allowlist,
    /// What each committed round publishes for people (progress.png, TensorBoard).
    publisher: publish::Publisher,
}

impl Coordinator {
    /// Opens the state dir and resumes from the last complete round, if any.
    pub fn open(config: FederationConfig) -> Result<Arc<Self>> {
        let state = StateDir::open(&config.federation.state_dir)?;
        let phase = match state.read_setup()? {
            Some(setup) => {
                let federation = setup::start(&config, &state, setup)?;
                info!(
                    completed = federation.completed,
                    digest = %federation.digest,
                    "resumed federation from {}",
                    state.root().display()
                );
                Phase::Running(Box::new(federation))
            }
            None => Phase::Registering(BTreeMap::new()),
        };
        let inner = Inner {
            phase,
            launched: config.federation.launch == Launch::Auto,
            sites: BTreeMap::new(),
            removed: BTreeSet::new(),
            last_dice: BTreeMap::new(),
        };
        let mut allowed: Vec<String> = config.federation.sites.clone();
        allowed.push(ADMIN_IDENTITY.to_string());
        let (changes, _) = watch::channel(0);
        Ok(Arc::new(Self {
            config,
            state,
            inner: Mutex::new(inner),
            changes,
            allowlist: Allowlist::new(allowed),
            publisher: publish::Publisher::default(),
        }))
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

    /// Sites of this federation that were not removed since `serve` started and, once it is
    /// set up, are in it: a site listed later counts once it joined.
    fn active_sites(&self, inner: &Inner) -> usize {
        self.active_site_names(inner).len()
    }

    fn active_site_names(&self, inner: &Inner) -> Vec<String> {
        let member = |site: &String| inner.running().is_none_or(|f| f.setup.cases_of(site).is_some());
        self.config.federation.sites.iter().filter(|s| !inner.removed.contains(*s) && member(s)).cloned().collect()
    }
}
