//! A growing federation: a site added to `[federation].sites` after the federation was set up
//! (the operator signs its certificate, lists it and restarts `serve`) says Hello like any
//! other. Its classes are appended to the global class list, the global model grows by fresh
//! heads for them (and, with per-site decoders, a fresh decoder), and the rounds after that
//! include it. Nothing trained is touched: every earlier class keeps its index and heads.
//!
//! A site joins between rounds only: the sites of an open round work on the model it opened
//! with, and a round being closed is aggregated into a copy of that model, so growing it then
//! would lose the growth or the round. The round task admits the waiting sites before it opens
//! the next round ([`Coordinator::admit_joining`]); the site's Hello is answered then.
//!
//! The grown setup is written first; the model grows in memory and reaches the disk with the
//! next round's checkpoint. A restart in between rebuilds the same model from the last
//! checkpoint and the setup ([`super::setup::load_global`]): the fresh heads are seeded.

use anyhow::Result;
use tracing::{info, warn};

use super::setup::{digest_global, global_selection, grow_global, Registration};
use super::{Coordinator, Federation};
use crate::config::FederationConfig;
use crate::state::{Setup, StateDir};
use fedtalent_model::MultiTalentNet;

impl Coordinator {
    /// Grows the federation by every site waiting to join (the round task, between rounds).
    /// A site that cannot be admitted (its setup not written) keeps waiting for the next try.
    pub(super) fn admit_joining(&self) {
        let mut inner = self.lock();
        let Some(federation) = inner.running_mut() else {
            return;
        };
        let mut admitted = false;
        while let Some((site, registration)) = federation.joining.pop_first() {
            if let Err(e) = admit(&self.config, &self.state, federation, &site, &registration) {
                warn!(site = %site, "site not admitted yet, retried before the next round: {e:#}");
                federation.joining.insert(site, registration);
                break;
            }
            admitted = true;
        }
        drop(inner);
        if admitted {
            self.changed();
        }
    }
}

/// Appends `site`'s classes to the federation: the grown setup on disk, then the grown global
/// model in memory.
fn admit(
    config: &FederationConfig,
    state: &StateDir,
    federation: &mut Federation,
    site: &str,
    registration: &Registration,
) -> Result<()> {
    let setup = federation.setup.with_site(site, &registration.classes, registration.n_train, registration.exclusive);
    let global = grow_global(config, &federation.global, &federation.setup, &setup)?;
    state.write_setup(&setup)?;
    let first = federation.setup.classes.len();
    let ids: Vec<&str> = setup.classes[first..].iter().map(|c| c.id.as_str()).collect();
    info!(site, n_train = registration.n_train, classes = ?ids, "site joined the federation: its classes appended with fresh heads");
    federation.adopt(config, setup, global);
    Ok(())
}

impl Federation {
    /// Makes `global`, the model of `setup`, the federation's (its selection and digests too).
    fn adopt(&mut self, config: &FederationConfig, setup: Setup, global: MultiTalentNet) {
        self.selection = global_selection(config, &setup);
        let (digest, wire_digests) = digest_global(config.plan.transport, &self.selection, &global);
        self.setup = setup;
        self.global = global;
        self.digest = digest;
        self.wire_digests = wire_digests;
        self.site_digests.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use fedtalent_vocab::{ClassRegion, CtNormalization, GlobalClass};
    use tch::Tensor;

    use super::super::setup::{fresh_global, load_global};
    use super::*;
    use crate::aggregate::ServerState;
    use crate::state::RoundRecord;

    fn config(dir: &Path, sites: &[&str], per_site_decoders: bool) -> FederationConfig {
        let sites: Vec<String> = sites.iter().map(|s| s.to_string()).collect();
        let text = crate::config::template("t", "127.0.0.1:7443".parse().unwrap(), &sites)
            .replace("preset = \"unet\"", "preset = \"tiny\"")
            .replace("min_sites = 2", "min_sites = 1")
            .replace("per_site_decoders = false", &format!("per_site_decoders = {per_site_decoders}"));
        let path = dir.join("federation.toml");
        std::fs::write(&path, text).unwrap();
        FederationConfig::load(&path).unwrap()
    }

    fn region(name: &str) -> ClassRegion {
        ClassRegion { name: name.into(), labels: vec![1] }
    }

    fn tensors(net: &MultiTalentNet) -> BTreeMap<String, Tensor> {
        net.params().named_tensors(false).into_iter().collect()
    }

    /// The federation of sites a (one class) and b (two), and that federation after c joined.
    fn two_then_three() -> (Setup, Setup) {
        let two = Setup::empty(CtNormalization::PAPER, Default::default())
            .with_site("a", &[region("x")], 3, false)
            .with_site("b", &[region("y"), region("z")], 4, true);
        let three = two.with_site("c", &[region("w")], 5, false);
        (two, three)
    }

    #[test]
    fn a_joining_site_is_appended_and_every_earlier_class_keeps_its_index() {
        let (two, three) = two_then_three();
        let ids: Vec<(u32, &str)> = three.classes.iter().map(|c| (c.index, c.id.as_str())).collect();
        assert_eq!(ids, vec![(0, "a/x"), (1, "b/y"), (2, "b/z"), (3, "c/w")]);
        assert_eq!(three.sites(), vec!["a", "b", "c"]);
        assert_eq!(three.cases_of("c"), Some(5));
        assert_eq!(three.normalization, two.normalization);
        assert_eq!(three.before(&two.classes), Some(two.clone()));
        assert_eq!(three.before(&three.classes), Some(three.clone()));
        // b's classes are one softmax, in every setup it is part of.
        assert_eq!(three.exclusive_sites, vec!["b"]);
        assert_eq!(three.before(&three.classes[..1]).unwrap().exclusive_sites, Vec::<String>::new());
        // Not a prefix, or a site cut in half: not an earlier state of this federation.
        let other = GlobalClass::new(0, "b", &region("y"));
        assert_eq!(three.before(std::slice::from_ref(&other)), None);
        assert_eq!(three.before(&three.classes[..2]), None);
    }

    /// A restart after c joined, before any round checkpointed the grown model: the model is
    /// the checkpoint's, grown by c's fresh heads (and decoder) exactly as the running
    /// coordinator grew it.
    #[test]
    fn a_checkpoint_written_before_a_site_joined_grows_into_the_setup() {
        let _rng = crate::torch_rng();
        for per_site_decoders in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let config = config(dir.path(), &["a", "b", "c"], per_site_decoders);
            let (two, three) = two_then_three();
            // The two-site model after some training: every tensor differs from a fresh one.
            let trained = fresh_global(&config, &two).unwrap();
            tch::no_grad(|| {
                for (_, t) in trained.params().named_tensors(false) {
                    let _ = t.shallow_clone().g_add_scalar_(1.0);
                }
            });
            let state = StateDir::open(&dir.path().join("state")).unwrap();
            let record = RoundRecord {
                round: 2,
                digest: "d".into(),
                contributions: vec![],
                classes: two.classes.clone(),
                unix_time: 0,
            };
            state.write_checkpoint(&trained, &ServerState::default(), &record, 10).unwrap();
            state.write_setup(&three).unwrap();

            let (grown, round, _) = load_global(&config, &state, &three).unwrap();
            assert_eq!(round, 2);
            let in_memory = grow_global(&config, &trained, &two, &three).unwrap();
            let (got, old, fresh) =
                (tensors(&grown), tensors(&trained), tensors(&fresh_global(&config, &three).unwrap()));
            let (mut heads, mut decoders) = (0, 0);
            for (name, t) in &got {
                assert!(t.equal(&tensors(&in_memory)[name]), "{name}: a restart rebuilds another model");
                if name.starts_with("seg_outputs.") || name.contains(".seg_outputs.") {
                    heads += 1;
                    assert!(t.narrow(0, 0, 3).equal(&old[name]), "{name}: the earlier classes' heads changed");
                    assert!(t.get(3).equal(&fresh[name].get(3)), "{name}: c's head is not fresh");
                } else if name.starts_with("decoders.2.") {
                    decoders += 1;
                    assert!(t.equal(&fresh[name]), "{name}: c's decoder is not fresh");
                } else {
                    assert!(t.equal(&old[name]), "{name}: not the checkpoint's");
                }
            }
            assert!(heads > 0, "no head compared");
            assert_eq!(decoders > 0, per_site_decoders, "per-site decoders {per_site_decoders}: {decoders} compared");
        }
    }
}
