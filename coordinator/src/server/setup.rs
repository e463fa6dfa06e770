//! Registering → running: each site's `Hello` is checked and recorded; once every listed site
//! registered, the global class list, the CT normalization and the global model are fixed
//! ([`Setup`], written to the state dir) and every waiting site is welcomed.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{anyhow, bail, ensure, Context, Result};
use fedtalent_model::wire::{self, Parts, Selection};
use fedtalent_model::{MultiTalentNet, Topology};
use fedtalent_protocol::{ErrorKind, Hello, Message, TensorDigests, Transport, Welcome};
use fedtalent_vocab::{ClassRegion, CtNormalization, GlobalClass, HuHistogram};
use tch::Device;
use tracing::{info, warn};

use super::{Coordinator, Federation, Inner, Phase, FOREVER};
use crate::aggregate::ServerState;
use crate::config::FederationConfig;
use crate::state::{Setup, StateDir, CHECKPOINT_SERVER};

/// What a site registered with, kept until the federation is set up.
pub(super) struct Registration {
    pub(super) classes: Vec<ClassRegion>,
    pub(super) n_train: u32,
    /// Its classes are one softmax ([`Hello::exclusive_classes`]).
    pub(super) exclusive: bool,
    /// Checked ([`HuHistogram::check`]) before it is stored.
    histogram: HuHistogram,
}

impl Inner {
    /// The training cases `site` registered with (fixed with the setup once running).
    pub(super) fn registered_cases(&self, site: &str) -> Option<u32> {
        match &self.phase {
            Phase::Registering(registrations) => registrations.get(site).map(|r| r.n_train),
            Phase::Running(f) => f.setup.cases_of(site).or_else(|| f.joining.get(site).map(|r| r.n_train)),
        }
    }
}

impl Coordinator {
    /// Answers a site's `Hello`: refused, or `Welcome` once the federation is set up (the reply
    /// waits for the last site to register).
    pub(super) async fn hello(&self, peer: &str, hello: Hello) -> Message {
        let site = &hello.site;
        if site != peer {
            warn!(site = %peer, claimed = %site, "refused: Hello names another site than the certificate");
            return Message::refusal(
                ErrorKind::NotAllowed,
                format!("certificate is for site {peer}, Hello says {site}"),
            );
        }
        if !self.config.federation.sites.iter().any(|s| s == peer) || !self.allowlist.contains(peer) {
            warn!(site = %peer, "refused: not a site of this federation");
            return Message::refusal(ErrorKind::NotAllowed, format!("site {peer} is not in this federation"));
        }
        if let Err(reason) = self.register(peer, hello) {
            warn!(site = %peer, "registration refused: {reason:#}");
            return Message::refusal(ErrorKind::BadDataset, format!("{reason:#}"));
        }
        self.lock().sites.entry(peer.to_string()).or_default().joined = true;
        self.changed();
        // Set up with this site in it: when every listed site registered, or, for a site that
        // joins a running federation, before the next round.
        let (classes, normalization, completed) = self
            .wait_for(FOREVER, |i| {
                let federation = i.running().filter(|f| f.setup.cases_of(peer).is_some())?;
                Some((federation.setup.classes.clone(), federation.setup.normalization, federation.completed))
            })
            .await
            .expect("waits forever");
        info!(site = %peer, completed, "welcomed");
        Message::Welcome(Welcome {
            federation: self.config.federation.name.clone(),
            plan: self.config.plan.clone(),
            classes,
            normalization,
            current_round: completed,
        })
    }

    /// Records a site's registration; once every listed site registered, sets the federation up.
    fn register(&self, site: &str, hello: Hello) -> Result<()> {
        let Hello { classes, n_train, hu_histogram: histogram, device, channels, exclusive_classes: exclusive, .. } =
            hello;
        // Channel k of every site feeds the same input filters of the shared network.
        channels.check_against(&self.config.plan.input_channels).map_err(|e| anyhow!("site {site}: {e}"))?;
        ensure!(!classes.is_empty(), "site {site}: no classes");
        // Class ids are `<site>/<name>`: a name listed twice would give two classes one id.
        let mut names = BTreeSet::new();
        if let Some(twice) = classes.iter().find(|c| !names.insert(c.name.as_str())) {
            bail!("site {site}: class {:?} is listed twice", twice.name);
        }
        // n_train is the site's aggregation weight (sqrt); with none, the weights are undefined.
        ensure!(n_train >= 1, "site {site}: n_train is 0");
        // Checked before it is stored: the setup merges every site's histogram under the lock,
        // and one absurd histogram there would stop every later registration too.
        histogram.check().map_err(|e| anyhow!("site {site}: hu_histogram.{e}"))?;
        let mut inner = self.lock();
        let registrations = match &mut inner.phase {
            Phase::Running(federation) if federation.setup.cases_of(site).is_some() => {
                return check_rejoin(&federation.setup, site, &classes, n_train, exclusive)
            }
            Phase::Running(federation) => {
                // Listed after the federation was set up: it joins before the next round.
                info!(site, classes = classes.len(), n_train, %device, "registered: joins the running federation before the next round");
                federation.joining.insert(site.to_string(), Registration { classes, n_train, exclusive, histogram });
                drop(inner);
                self.changed();
                return Ok(());
            }
            Phase::Registering(registrations) => registrations,
        };
        info!(site, classes = classes.len(), n_train, %device, "registered");
        registrations.insert(site.to_string(), Registration { classes, n_train, exclusive, histogram });
        if !self.config.federation.sites.iter().all(|s| registrations.contains_key(s)) {
            return Ok(());
        }
        let setup = build_setup(&self.config, registrations)?;
        self.state.write_setup(&setup)?;
        let federation = start(&self.config, &self.state, setup)?;
        info!(classes = federation.setup.classes.len(), norm = ?federation.setup.normalization, "federation set up");
        inner.phase = Phase::Running(Box::new(federation));
        Ok(())
    }
}

/// A site registering again (a reconnect, a restarted site or coordinator) must bring what the
/// setup fixed: the same classes, and the same case count, which is what every update's
/// n_cases must match (its aggregation weight); a changed dataset is refused here, visibly,
/// rather than each of its updates later.
fn check_rejoin(setup: &Setup, site: &str, classes: &[ClassRegion], n_train: u32, exclusive: bool) -> Result<()> {
    let fixed: Vec<ClassRegion> = setup.classes.iter().filter(|c| c.site == site).map(GlobalClass::region).collect();
    ensure!(fixed == classes, "site {site}: classes {classes:?} differ from those registered earlier {fixed:?}");
    let registered = setup.cases_of(site);
    ensure!(
        registered == Some(n_train),
        "site {site}: n_train {n_train} differs from the {} training cases registered when the federation was set up",
        registered.map_or("(none)".to_string(), |n| n.to_string())
    );
    // Its heads were trained as one softmax or as sigmoids: the other way they mean another thing.
    let was = setup.exclusive_sites.iter().any(|s| s == site);
    ensure!(
        was == exclusive,
        "site {site}: exclusive_classes = {exclusive} differs from the {was} it registered with when it joined the federation"
    );
    Ok(())
}

/// The global class list (config site order, then each site's order) and CT statistics from the
/// merged foreground histograms.
fn build_setup(config: &FederationConfig, regs: &BTreeMap<String, Registration>) -> Result<Setup> {
    let mut classes = Vec::new();
    for site in &config.federation.sites {
        for region in &regs[site].classes {
            classes.push(GlobalClass::new(classes.len() as u32, site, region));
        }
    }
    let histograms: Vec<HuHistogram> = config.federation.sites.iter().map(|s| regs[s].histogram.clone()).collect();
    let normalization = match super::start_from::model_normalization(config)? {
        Some(model) => model,
        None => HuHistogram::merge(&histograms).ct_stats().unwrap_or_else(|| {
            warn!("no site reported foreground intensities; using the paper's CT normalization");
            CtNormalization::PAPER
        }),
    };
    let site_cases = config.federation.sites.iter().map(|s| (s.clone(), regs[s].n_train)).collect();
    let exclusive_sites = config.federation.sites.iter().filter(|s| regs[*s].exclusive).cloned().collect();
    Ok(Setup { classes, normalization, site_cases, channels: config.plan.input_channels.clone(), exclusive_sites })
}

/// The running federation of `setup`: the global model of the last complete checkpoint (else
/// a fresh, deterministic initialisation), its digests and the server optimizer's state.
pub(super) fn start(config: &FederationConfig, state: &StateDir, setup: Setup) -> Result<Federation> {
    let (global, completed, server) = load_global(config, state, &setup)?;
    let selection = global_selection(config, &setup);
    let (digest, wire_digests) = digest_global(config.plan.transport, &selection, &global);
    Ok(Federation {
        setup,
        selection,
        global,
        server,
        digest,
        site_digests: BTreeMap::new(),
        wire_digests,
        completed,
        open: None,
        joining: BTreeMap::new(),
    })
}

/// The global topology: the preset, with one decoder per site (its classes) when asked for.
fn global_topology(config: &FederationConfig, setup: &Setup) -> Result<Topology> {
    let topo = Topology::preset(&config.plan.preset)?.with_in_channels(setup.channels.len());
    if !config.plan.per_site_decoders {
        return Ok(topo);
    }
    let partition = setup
        .sites()
        .iter()
        .map(|site| setup.classes.iter().filter(|c| &c.site == site).map(|c| c.index as i64).collect())
        .collect();
    Ok(topo.with_site_decoders(partition).with_site_encoder_stages(config.plan.site_encoder_stages as usize))
}

/// Every class's heads and, with per-site decoders, every site's decoder of the global model of
/// `setup`, at their places.
pub(super) fn global_selection(config: &FederationConfig, setup: &Setup) -> Selection {
    Selection::global(&setup.classes, &setup.decoder_sites(config.plan.per_site_decoders))
}

/// A fresh global network of `setup`, the same for the same setup (seeded): a restarted
/// coordinator rebuilds bit for bit the heads it had not checkpointed yet.
pub(super) fn fresh_global(config: &FederationConfig, setup: &Setup) -> Result<MultiTalentNet> {
    let topo = global_topology(config, setup)?;
    tch::manual_seed(0);
    MultiTalentNet::new(&topo, setup.classes.len() as i64, Device::Cpu)
}

/// `net`, the global model of `from`, carried into a fresh network of `to`, a setup grown from
/// it by sites that joined: the backbone, every class's heads (same ids, same rows) and every
/// site's decoder are `net`'s, the new sites' heads and decoders fresh.
pub(super) fn grow_global(
    config: &FederationConfig,
    net: &MultiTalentNet,
    from: &Setup,
    to: &Setup,
) -> Result<MultiTalentNet> {
    let parts = Parts::from_wire(&wire::parts_to_wire(net, &global_selection(config, from)))?;
    let mut grown = fresh_global(config, to)?;
    parts.apply(&mut grown, &global_selection(config, to)).context("carrying the global model into the grown one")?;
    Ok(grown)
}

/// The global model and the server optimizer's state: the last complete checkpoint (grown by
/// the sites that joined since), else a fresh, deterministic initialisation.
pub(super) fn load_global(
    config: &FederationConfig,
    state: &StateDir,
    setup: &Setup,
) -> Result<(MultiTalentNet, u32, ServerState)> {
    let Some((record, model)) = state.latest()? else {
        let mut net = fresh_global(config, setup)?;
        if let Some(dir) = &config.plan.init_model {
            super::start_from::load_into(dir, &mut net, config, setup)?;
        }
        return Ok((net, 0, ServerState::default()));
    };
    // A restart between a site's joining and the next checkpoint: the checkpoint is the global
    // model of the setup before it joined.
    let written = setup.before(&record.classes).with_context(|| {
        format!("checkpoint of round {} has other classes than {}", record.round, state.root().display())
    })?;
    let mut net = fresh_global(config, &written)?;
    net.load(&model)?;
    let velocity_file = model.with_file_name(CHECKPOINT_SERVER);
    let server =
        if velocity_file.is_file() { ServerState::load(&net, &velocity_file)? } else { ServerState::default() };
    if written.classes.len() < setup.classes.len() {
        let joined = &setup.sites()[written.site_cases.len()..];
        info!(round = record.round, ?joined, "the last checkpoint predates sites that joined: growing it");
        net = grow_global(config, &net, &written, setup)?;
    }
    Ok((net, record.round, server))
}

/// The digest naming `net` (over all its parts) and the per-tensor digests of its parts as they
/// travel; with native transport one hashing pass gives both.
pub(super) fn digest_global(
    transport: Transport,
    selection: &Selection,
    net: &MultiTalentNet,
) -> (String, TensorDigests) {
    let set = wire::parts_to_wire(net, selection);
    let mut native = TensorDigests::new(Transport::Native);
    let digest = set.wire_digest_cached(&mut native);
    (digest, if transport == Transport::Native { native } else { TensorDigests::new(transport) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_registers_again_only_as_it_joined() {
        let organ = ClassRegion { name: "organ".into(), labels: vec![1] };
        let empty = Setup::empty(CtNormalization::PAPER, Default::default());
        let setup = empty.with_site("a", std::slice::from_ref(&organ), 3, true);
        check_rejoin(&setup, "a", std::slice::from_ref(&organ), 3, true).unwrap();
        let refused = |classes: &[ClassRegion], n_train, exclusive| {
            format!("{:#}", check_rejoin(&setup, "a", classes, n_train, exclusive).unwrap_err())
        };
        assert!(refused(std::slice::from_ref(&organ), 3, false).contains("exclusive_classes = false"));
        assert!(refused(std::slice::from_ref(&organ), 4, true).contains("n_train 4"));
        let other = ClassRegion { name: "organ".into(), labels: vec![2] };
        assert!(refused(&[other], 3, true).contains("differ from those registered earlier"));
    }
}
