//! Update validation and aggregation (DESIGN.md §2.1 step 4): the backbone is the
//! sqrt(n_k)-weighted mean of the reporting sites' backbones; each class's heads are its owner's
//! latest upload. Pure functions on tensors, so the arithmetic is testable on its own.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, ensure, Result};
use fedtalent_model::wire::Parts;
use fedtalent_model::MultiTalentNet;
use tch::{Kind, Tensor};

/// One site's decoded upload for the open round.
pub struct Update {
    pub site: String,
    pub n_cases: u32,
    pub train_loss: f32,
    pub dice: Vec<(String, f32)>,
    pub payload_digest: String,
    pub bytes: u64,
    pub durations_ms: Vec<(String, u64)>,
    pub parts: Parts,
}

/// `w_k = sqrt(n_k) / Σ_j sqrt(n_j)` over the reporting sites.
pub fn sqrt_weights(n_cases: &[u32]) -> Vec<f64> {
    let roots: Vec<f64> = n_cases.iter().map(|&n| (n as f64).sqrt()).collect();
    let sum: f64 = roots.iter().sum();
    roots.iter().map(|r| r / sum).collect()
}

/// Checks an upload against the global model: the sender's own heads only and all of them,
/// every backbone tensor, all values finite, and the backbone's distance to the global one under
/// `max_norm`. The error names the site and the field.
pub fn validate(
    global: &MultiTalentNet,
    owned: &BTreeSet<String>,
    owners: &BTreeMap<String, String>,
    sender: &str,
    parts: &Parts,
    max_norm: f64,
    own_decoder: bool,
) -> Result<()> {
    for site in parts.decoders.keys() {
        ensure!(own_decoder && site == sender, "site {sender}: sent the decoder of site {site}");
    }
    ensure!(!own_decoder || parts.decoders.contains_key(sender), "site {sender}: its decoder is missing");
    for (site, tensors) in &parts.decoders {
        for (name, t) in tensors {
            ensure!(
                all_finite(t),
                "site {sender}: decoder tensor {name:?} of site {site} holds NaN or infinite values"
            );
        }
    }
    for class in parts.heads.keys() {
        match owners.get(class) {
            Some(owner) if owner == sender => {}
            Some(owner) => bail!("site {sender}: sent heads of class {class:?}, owned by site {owner}"),
            None => bail!("site {sender}: sent heads of unknown class {class:?}"),
        }
    }
    for class in owned {
        ensure!(parts.heads.contains_key(class), "site {sender}: heads of its class {class:?} are missing");
    }
    let global_backbone = global.params().backbone();
    ensure!(
        parts.backbone.len() == global_backbone.len(),
        "site {sender}: {} backbone tensors, the model has {}",
        parts.backbone.len(),
        global_backbone.len()
    );
    let mut squared = 0f64;
    for ((name, theirs), (global_name, ours)) in parts.backbone.iter().zip(&global_backbone) {
        ensure!(name == global_name, "site {sender}: backbone tensor {name:?} where {global_name:?} was expected");
        ensure!(
            theirs.size() == ours.size(),
            "site {sender}: tensor {name:?} has shape {:?}, expected {:?}",
            theirs.size(),
            ours.size()
        );
        ensure!(all_finite(theirs), "site {sender}: tensor {name:?} holds NaN or infinite values");
        squared += f64::try_from((theirs - ours).square().sum(Kind::Double))?;
    }
    for (class, rows) in &parts.heads {
        for (name, t) in rows {
            ensure!(all_finite(t), "site {sender}: head {name:?} of class {class:?} holds NaN or infinite values");
        }
    }
    let norm = squared.sqrt();
    ensure!(norm <= max_norm, "site {sender}: update norm {norm:.3e} exceeds the bound {max_norm:.3e}");
    Ok(())
}

fn all_finite(t: &Tensor) -> bool {
    t.isfinite().all().int64_value(&[]) == 1
}

/// Writes the aggregate of `updates` into `global`; returns each update's backbone weight.
/// `row_of` maps class ids to the global model's rows, `decoder_of` sites to their decoders.
pub fn aggregate(
    global: &mut MultiTalentNet,
    updates: &[&Update],
    row_of: &dyn Fn(&str) -> Option<i64>,
    decoder_of: &dyn Fn(&str) -> Option<usize>,
) -> Result<Vec<f64>> {
    ensure!(!updates.is_empty(), "no update to aggregate");
    let weights = sqrt_weights(&updates.iter().map(|u| u.n_cases).collect::<Vec<_>>());
    let names: Vec<String> = global.params().backbone().into_iter().map(|(n, _)| n).collect();
    let mut averaged = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let mut acc: Option<Tensor> = None;
        for (u, w) in updates.iter().zip(&weights) {
            let term = u.parts.backbone[i].1.to_kind(Kind::Double) * *w;
            acc = Some(match acc {
                Some(a) => a + term,
                None => term,
            });
        }
        averaged.push((name.clone(), acc.expect("at least one update").to_kind(Kind::Float)));
    }
    global.params_mut().load_named(&averaged, false)?;
    for u in updates {
        // Heads and site decoders: the owner's upload, as is.
        u.parts.apply_owned(global, row_of, decoder_of)?;
    }
    Ok(weights)
}
