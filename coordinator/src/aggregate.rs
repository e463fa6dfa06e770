//! Update validation and aggregation (DESIGN.md §2.1 step 4): the backbone is the
//! sqrt(n_k)-weighted mean of the reporting sites' backbones; each class's heads are its owner's
//! latest upload. Pure functions on tensors, so the arithmetic is testable on its own.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{anyhow, bail, ensure, Context, Result};
use fedtalent_model::noise::GaussianNoise;
use fedtalent_model::params::Role;
use fedtalent_model::wire::{owner_of, Parts, Selection};
use fedtalent_model::MultiTalentNet;
use fedtalent_protocol::UpdateHeader;
use tch::{Kind, Tensor};

use crate::config::ServerOptimizer;
use fedtalent_vocab::Privacy;

#[cfg(test)]
#[path = "aggregate_test.rs"]
mod aggregate_test;

/// One site's decoded upload for the open round.
pub struct Update {
    pub site: String,
    /// As the site sent it; `payload_digest` is the digest the payload was checked against.
    pub header: UpdateHeader,
    pub bytes: u64,
    /// Receiving its payload at the coordinator.
    pub upload_ms: u64,
    /// Its backbone's L2 distance to the global backbone it started from ([`validate`]).
    pub backbone_norm: f64,
    pub parts: Parts,
}

/// `w_k = sqrt(n_k) / Σ_j sqrt(n_j)` over the reporting sites.
pub fn sqrt_weights(n_cases: &[u32]) -> Vec<f64> {
    let roots: Vec<f64> = n_cases.iter().map(|&n| (n as f64).sqrt()).collect();
    let sum: f64 = roots.iter().sum();
    roots.iter().map(|r| r / sum).collect()
}

/// Checks an upload against the global model: the sender's own heads only and all of them,
/// each with exactly every head tensor, its own decoder (with per-site decoders) with exactly
/// every tensor, every backbone tensor, all values finite, and the backbone's distance to the
/// global one under `max_norm`. `selection` is what of `global` travels (every class's heads
/// and every site's decoder, at their places); it names the classes and decoders the sender
/// owns. The error names the site and the field; an accepted upload's backbone update norm
/// (its L2 distance to the global backbone) is the answer.
///
/// What this accepts, [`aggregate`] can apply: that is what keeps one site's upload from
/// stopping the round (and `serve`) after it was acknowledged.
pub fn validate(
    global: &MultiTalentNet,
    selection: &Selection,
    sender: &str,
    parts: &Parts,
    max_norm: f64,
) -> Result<f64> {
    check_owners(selection, sender, parts)?;
    check_complete(global, sender, parts, selection.decoder_of(sender), false)?;
    check_owned_finite(sender, parts)?;
    let global_backbone = global.params().backbone();
    let mut squared = 0f64;
    for ((name, theirs), (_, ours)) in parts.backbone.iter().zip(&global_backbone) {
        // One pass: a non-finite value of the upload makes the tensor's sum non-finite (an f32
        // difference squared cannot overflow an f64), and only then is the tensor scanned again.
        let tensor_squared = squared_distance(theirs, ours)?;
        ensure!(
            tensor_squared.is_finite() || all_finite(theirs),
            "site {sender}: tensor {name:?} holds NaN or infinite values"
        );
        squared += tensor_squared;
    }
    let norm = squared.sqrt();
    ensure!(norm <= max_norm, "site {sender}: update norm {norm:.3e} exceeds the bound {max_norm:.3e}");
    Ok(norm)
}

/// [`validate`] of a secure-aggregation upload, whose backbone arrived masked (checked and
/// summed by `fedtalent-secagg`): its heads and decoder as [`validate`] checks them, and no
/// backbone tensor. What cannot be checked any more is each site's backbone values (finite)
/// and its update norm (`max_update_norm`): the sites clamp each coordinate to the fixed-point
/// range instead (`[plan.privacy].secagg_clip_range`).
pub fn validate_masked(global: &MultiTalentNet, selection: &Selection, sender: &str, parts: &Parts) -> Result<()> {
    check_owners(selection, sender, parts)?;
    check_complete(global, sender, parts, selection.decoder_of(sender), true)?;
    check_owned_finite(sender, parts)
}

/// The sender's heads and decoder hold finite values only.
fn check_owned_finite(sender: &str, parts: &Parts) -> Result<()> {
    for (site, tensors) in &parts.decoders {
        for (name, t) in tensors {
            ensure!(
                all_finite(t),
                "site {sender}: decoder tensor {name:?} of site {site} holds NaN or infinite values"
            );
        }
    }
    for (class, rows) in &parts.heads {
        for (name, t) in rows {
            ensure!(all_finite(t), "site {sender}: head {name:?} of class {class:?} holds NaN or infinite values");
        }
    }
    Ok(())
}

/// The L2 distance of `parts`' backbone to `global` (both in the backbone's order), over all
/// tensors: a site's update norm.
fn backbone_distance(global: &[(String, Tensor)], parts: &Parts) -> Result<f64> {
    let mut squared = 0f64;
    for ((_, theirs), (_, ours)) in parts.backbone.iter().zip(global) {
        squared += squared_distance(theirs, ours)?;
    }
    Ok(squared.sqrt())
}

/// The values of a CPU float32 tensor laid out contiguously, borrowed: what the coordinator's
/// models and the decoded uploads are. `None` for anything else (the caller computes with
/// tensor operations then).
fn f32_values(t: &Tensor) -> Option<&[f32]> {
    if t.kind() != Kind::Float || t.device() != tch::Device::Cpu || !t.is_contiguous() {
        return None;
    }
    let n = t.numel();
    if n == 0 {
        return Some(&[]);
    }
    // SAFETY: a contiguous CPU float tensor holds `n` initialised f32 values at `data_ptr`
    // (storage offset included); the storage lives as long as the tensor `t` borrows, and the
    // coordinator writes no tensor in place while a slice of it is read.
    Some(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, n) })
}

/// Σ (theirs − ours)² over two same-shaped tensors, in f64: in one pass over the float32
/// values (four partial sums, no temporaries); with tensor operations if either is not a
/// contiguous CPU float32 tensor.
fn squared_distance(theirs: &Tensor, ours: &Tensor) -> Result<f64> {
    let (Some(a), Some(b)) = (f32_values(theirs), f32_values(ours)) else {
        return Ok(f64::try_from(
            (theirs.to_kind(Kind::Double) - ours.to_kind(Kind::Double)).square().sum(Kind::Double),
        )?);
    };
    ensure!(a.len() == b.len(), "tensors of {} and {} values", a.len(), b.len());
    let mut sums = [0f64; 4];
    let (a4, b4) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (a4.remainder(), b4.remainder());
    for (x, y) in a4.zip(b4) {
        for k in 0..4 {
            let d = x[k] as f64 - y[k] as f64;
            sums[k] += d * d;
        }
    }
    for (x, y) in ra.iter().zip(rb) {
        let d = *x as f64 - *y as f64;
        sums[0] += d * d;
    }
    Ok((sums[0] + sums[1]) + (sums[2] + sums[3]))
}

/// One backbone tensor's FedAvg step without server momentum or noise, in one pass over the
/// float32 values: `old + lr · Σ_k scale_k (x_k − old)`, each operation in f64 in the order of
/// the tensor version (so the result is the same to the bit) and rounded to f32 once. `None`
/// if a tensor is not a contiguous CPU float32 tensor.
fn fused_step(old: &Tensor, theirs: &[&Tensor], scales: &[f64], lr: f64) -> Option<Tensor> {
    const BLOCK: usize = 4096;
    let o = f32_values(old)?;
    let xs: Vec<&[f32]> = theirs.iter().map(|t| f32_values(t).filter(|x| x.len() == o.len())).collect::<Option<_>>()?;
    let (first, rest) = xs.split_first()?;
    let out = Tensor::empty(old.size().as_slice(), (Kind::Float, tch::Device::Cpu));
    if o.is_empty() {
        return Some(out);
    }
    // SAFETY: `out` is a fresh contiguous CPU float tensor of `o.len()` values that nothing
    // else references while this slice lives.
    let dst = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, o.len()) };
    // Block by block, so that each update's pass vectorises; per value the operations are those
    // of the tensor formula, in its order.
    let mut change = [0f64; BLOCK];
    for (start, dst) in (0..o.len()).step_by(BLOCK).zip(dst.chunks_mut(BLOCK)) {
        let olds = &o[start..start + dst.len()];
        let change = &mut change[..dst.len()];
        for ((c, &x), &old) in change.iter_mut().zip(&first[start..]).zip(olds) {
            *c = (x as f64 - old as f64) * scales[0];
        }
        for (x, &scale) in rest.iter().zip(&scales[1..]) {
            for ((c, &x), &old) in change.iter_mut().zip(&x[start..]).zip(olds) {
                *c += (x as f64 - old as f64) * scale;
            }
        }
        for ((d, &c), &old) in dst.iter_mut().zip(change.iter()).zip(olds) {
            *d = (old as f64 + c * lr) as f32;
        }
    }
    Some(out)
}

/// The sender sent heads of exactly its own classes and no decoder but its own.
fn check_owners(selection: &Selection, sender: &str, parts: &Parts) -> Result<()> {
    let has_decoder = selection.decoder_of(sender).is_some();
    for site in parts.decoders.keys() {
        ensure!(has_decoder && site == sender, "site {sender}: sent the decoder of site {site}");
    }
    ensure!(!has_decoder || parts.decoders.contains_key(sender), "site {sender}: its decoder is missing");
    for class in parts.heads.keys() {
        match selection.row_of(class).and(owner_of(class)) {
            Some(owner) if owner == sender => {}
            Some(owner) => bail!("site {sender}: sent heads of class {class:?}, owned by site {owner}"),
            None => bail!("site {sender}: sent heads of unknown class {class:?}"),
        }
    }
    for class in selection.of_site(sender).class_ids() {
        ensure!(parts.heads.contains_key(class), "site {sender}: heads of its class {class:?} are missing");
    }
    Ok(())
}

/// The structure [`aggregate`] relies on, without looking at values: the backbone tensor for
/// tensor in the model's order, every head class with exactly every head tensor as one row,
/// and the sender's decoder (if `own_decoder`) with exactly every tensor, shapes included.
/// `masked`: the backbone arrived masked, so the upload must hold none.
fn check_complete(
    global: &MultiTalentNet,
    sender: &str,
    parts: &Parts,
    own_decoder: Option<usize>,
    masked: bool,
) -> Result<()> {
    let params = global.params();
    let global_backbone = if masked { Vec::new() } else { params.backbone() };
    ensure!(
        parts.backbone.len() == global_backbone.len(),
        "site {sender}: {} backbone tensors, the model has {}",
        parts.backbone.len(),
        global_backbone.len()
    );
    for ((name, theirs), (global_name, ours)) in parts.backbone.iter().zip(&global_backbone) {
        ensure!(name == global_name, "site {sender}: backbone tensor {name:?} where {global_name:?} was expected");
        ensure!(
            theirs.size() == ours.size(),
            "site {sender}: tensor {name:?} has shape {:?}, expected {:?}",
            theirs.size(),
            ours.size()
        );
    }
    let head_rows: BTreeMap<String, Vec<i64>> = params
        .iter()
        .filter(|p| matches!(p.role, Role::Head { .. }))
        .map(|p| {
            let mut row = p.tensor.size();
            row[0] = 1;
            (p.name.clone(), row)
        })
        .collect();
    for (class, rows) in &parts.heads {
        exactly(&head_rows, rows).map_err(|e| anyhow!("site {sender}: heads of class {class:?}: {e}"))?;
    }
    if let Some(index) = own_decoder {
        let prefix = format!("decoders.{index}.");
        let expected: BTreeMap<String, Vec<i64>> = params
            .site_decoder(index)
            .into_iter()
            .map(|(name, t)| (name.strip_prefix(&prefix).unwrap_or(&name).to_string(), t.size()))
            .collect();
        ensure!(!expected.is_empty(), "site {sender}: the model has no decoder {index} for it");
        let sent = parts.decoders.get(sender).map_or(&[][..], Vec::as_slice);
        exactly(&expected, sent).map_err(|e| anyhow!("site {sender}: its decoder: {e}"))?;
    }
    Ok(())
}

/// `given` names each tensor of `expected` exactly once, with its shape, and nothing else.
fn exactly(expected: &BTreeMap<String, Vec<i64>>, given: &[(String, Tensor)]) -> Result<()> {
    let mut seen = BTreeSet::new();
    for (name, t) in given {
        let shape = expected.get(name).with_context(|| format!("unexpected tensor {name:?}"))?;
        ensure!(seen.insert(name.as_str()), "tensor {name:?} sent twice");
        ensure!(&t.size() == shape, "tensor {name:?} has shape {:?}, expected {shape:?}", t.size());
    }
    if let Some(missing) = expected.keys().find(|n| !seen.contains(n.as_str())) {
        bail!("tensor {missing:?} is missing ({} of {} sent)", seen.len(), expected.len());
    }
    Ok(())
}

fn all_finite(t: &Tensor) -> bool {
    t.isfinite().all().int64_value(&[]) == 1
}

/// FedAvgM's velocity over the backbone, by tensor name (empty until the first round with
/// momentum); checkpointed with the global model so that a restarted coordinator resumes it.
#[derive(Default)]
pub struct ServerState {
    pub velocity: Vec<(String, Tensor)>,
}

impl ServerState {
    /// Reads a checkpointed velocity, in the backbone's order (safetensors files do not keep
    /// the order tensors were written in); every backbone tensor must be there with its shape.
    pub fn load(global: &MultiTalentNet, file: &std::path::Path) -> Result<Self> {
        let mut saved: BTreeMap<String, Tensor> = fedtalent_model::io::read_tensors(file)?.into_iter().collect();
        let backbone = global.params().backbone();
        ensure!(
            saved.len() == backbone.len(),
            "{}: {} server momentum tensors, the backbone has {}",
            file.display(),
            saved.len(),
            backbone.len()
        );
        let mut velocity = Vec::with_capacity(backbone.len());
        for (name, t) in &backbone {
            let v =
                saved.remove(name).with_context(|| format!("{}: no server momentum for {name:?}", file.display()))?;
            ensure!(v.size() == t.size(), "{}: server momentum {name:?} has shape {:?}", file.display(), v.size());
            velocity.push((name.clone(), v.to_kind(Kind::Double)));
        }
        Ok(Self { velocity })
    }
}

/// The coordinator's side of a round's aggregation (Flower's strategy): its optimizer over the
/// backbone with that optimizer's state, and `[plan.privacy]`.
pub struct ServerStep<'a> {
    pub optimizer: &'a ServerOptimizer,
    pub state: &'a mut ServerState,
    pub privacy: Option<&'a Privacy>,
}

/// What [`aggregate`] did besides writing the global model.
#[derive(Debug)]
pub struct Aggregated {
    /// Each update's backbone weight, `sqrt(n_k) / Σ_j sqrt(n_j)`.
    pub weights: Vec<f64>,
    /// With `[plan.privacy]`: how each update was clipped and the noise added.
    pub privacy: Option<PrivateRound>,
}

/// The differential privacy of one round's backbone aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivateRound {
    /// Each update's clip factor `min(1, C / ‖Δ_k‖)` (1: its change was within the bound).
    pub clip_factors: Vec<f64>,
    /// The per-coordinate std of the Gaussian noise added to the weighted sum.
    pub noise_std: f64,
}

/// Writes the aggregate of `updates` into `global`. The backbone takes `server`'s step along
/// the sqrt(n)-weighted mean change of the sites' backbones (with lr 1 and no momentum: that
/// mean; with `[plan.privacy]`: of the clipped changes, plus Gaussian noise); heads and site
/// decoders are the owners' uploads, placed by `selection` (the global model's rows and
/// decoders).
pub fn aggregate(
    global: &mut MultiTalentNet,
    updates: &[&Update],
    server: ServerStep<'_>,
    selection: &Selection,
) -> Result<Aggregated> {
    aggregate_backbone(global, updates, server, selection, None)
}

/// [`aggregate`] of a secure-aggregation round: `mean` is the unmasked sqrt(n)-weighted mean of
/// the sites' backbone changes (every backbone tensor flattened, in the model's order), the
/// updates hold heads and decoders only. With `[plan.privacy]`'s DP, the sites clipped their
/// changes (the coordinator cannot see them): the noise is added here as in [`aggregate`].
pub fn aggregate_masked(
    global: &mut MultiTalentNet,
    updates: &[&Update],
    server: ServerStep<'_>,
    selection: &Selection,
    mean: &[f32],
) -> Result<Aggregated> {
    aggregate_backbone(global, updates, server, selection, Some(mean))
}

/// The number of values in the backbone: the length of a masked backbone.
pub fn backbone_len(global: &MultiTalentNet) -> usize {
    global.params().backbone().iter().map(|(_, t)| t.numel()).sum()
}

fn aggregate_backbone(
    global: &mut MultiTalentNet,
    updates: &[&Update],
    server: ServerStep<'_>,
    selection: &Selection,
    masked: Option<&[f32]>,
) -> Result<Aggregated> {
    ensure!(!updates.is_empty(), "no update to aggregate");
    if let Some(mean) = masked {
        let len = backbone_len(global);
        ensure!(mean.len() == len, "a masked sum of {} values for a backbone of {len}", mean.len());
    }
    // Validation already checked each update; checking the structure again here (cheap: no
    // tensor values are read) means a failure can never leave `global` half written.
    for u in updates {
        check_complete(global, &u.site, &u.parts, selection.decoder_of(&u.site), masked.is_some())?;
        ensure!(u.parts.decoders.keys().all(|s| s == &u.site), "site {}: sent another site's decoder", u.site);
        for class in u.parts.heads.keys() {
            ensure!(selection.row_of(class).is_some(), "site {}: heads of unknown class {class:?}", u.site);
        }
    }
    let ServerStep { optimizer, state, privacy } = server;
    let weights = sqrt_weights(&updates.iter().map(|u| u.header.n_cases).collect::<Vec<_>>());
    let current = global.params().backbone();
    let max_weight = weights.iter().copied().fold(0.0, f64::max);
    // Local DP: each site clipped and noised its own change, so the coordinator adds no noise,
    // and clipping a noisy change again would only distort it.
    let coordinator_noise = |p: &Privacy| if p.noised_by_sites() { 0.0 } else { p.noise_std(max_weight) };
    let private = match privacy {
        None => None,
        // The sites clipped their own changes, which only they see.
        Some(p) if masked.is_some() => Some(PrivateRound { clip_factors: Vec::new(), noise_std: coordinator_noise(p) }),
        Some(p) if p.noised_by_sites() => Some(PrivateRound { clip_factors: vec![1.0; updates.len()], noise_std: 0.0 }),
        Some(p) => {
            // The norms are measured here, not taken from validation: the clip is what the
            // guarantee rests on.
            let norms = updates.iter().map(|u| backbone_distance(&current, &u.parts)).collect::<Result<Vec<_>>>()?;
            Some(PrivateRound {
                clip_factors: norms.iter().map(|&n| clip_factor(n, p.clip_norm)).collect(),
                noise_std: coordinator_noise(p),
            })
        }
    };
    let scales: Vec<f64> = match &private {
        Some(p) => weights.iter().zip(&p.clip_factors).map(|(w, c)| w * c).collect(),
        None => weights.clone(),
    };
    // Noise from the operating system's entropy, never from a seed a site could know: noise
    // that can be regenerated can be subtracted.
    let mut noise = private.as_ref().filter(|p| p.noise_std > 0.0).map(|p| GaussianNoise::from_entropy(p.noise_std));
    let with_momentum = optimizer.momentum > 0.0;
    if with_momentum && state.velocity.len() != current.len() {
        state.velocity = current.iter().map(|(n, t)| (n.clone(), t.zeros_like().to_kind(Kind::Double))).collect();
    }
    let mut stepped = Vec::with_capacity(current.len());
    let mut offset = 0;
    // FedAvg (no momentum, no noise, the backbone in plain view): one pass per tensor.
    let fused = masked.is_none() && noise.is_none() && !with_momentum;
    for (i, (name, old)) in current.iter().enumerate() {
        if fused {
            let theirs: Vec<&Tensor> = updates.iter().map(|u| &u.parts.backbone[i].1).collect();
            if let Some(new) = fused_step(old, &theirs, &scales, optimizer.lr) {
                stepped.push((name.clone(), new));
                continue;
            }
        }
        let old = old.to_kind(Kind::Double);
        let mut change: Option<Tensor> = None;
        if let Some(mean) = masked {
            let n = old.numel();
            let values = Tensor::from_slice(&mean[offset..offset + n]);
            change = Some(values.view(old.size().as_slice()).to_kind(Kind::Double).to_device(old.device()));
            offset += n;
        }
        for (u, scale) in updates.iter().zip(&scales).filter(|_| masked.is_none()) {
            let term = (u.parts.backbone[i].1.to_kind(Kind::Double) - &old) * *scale;
            change = Some(match change {
                Some(c) => c + term,
                None => term,
            });
        }
        let mut change = change.expect("at least one update");
        if let Some(noise) = &mut noise {
            change += noise.like(&change);
        }
        if with_momentum {
            let velocity = &mut state.velocity[i].1;
            *velocity = &*velocity * optimizer.momentum + &change;
            change = velocity.shallow_clone();
        }
        stepped.push((name.clone(), (old + change * optimizer.lr).to_kind(Kind::Float)));
    }
    global.params_mut().load_named(&stepped, false)?;
    for u in updates {
        // Heads and site decoders: the owner's upload, as is.
        u.parts.apply_owned(global, selection)?;
    }
    Ok(Aggregated { weights, privacy: private })
}

/// DP-FedAvg's clipping: the factor that scales a change of L2 norm `norm` into the ball of
/// radius `clip_norm`.
fn clip_factor(norm: f64, clip_norm: f64) -> f64 {
    if norm > clip_norm {
        clip_norm / norm
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use fedtalent_model::wire;
    use fedtalent_model::Topology;
    use fedtalent_vocab::{ClassRegion, GlobalClass};
    use tch::Device;

    use super::*;

    /// Two sites, one class each: "a/x" (row 0) and "b/y" (row 1); with `decoders`, the
    /// FIRENet preset with one decoder per site (a = 0, b = 1).
    struct Fixture {
        global: MultiTalentNet,
        /// The global model's classes and decoders, as the coordinator builds them.
        selection: Selection,
    }

    impl Fixture {
        fn new(decoders: bool) -> Self {
            let topo = if decoders {
                Topology::preset("firenet-tiny").unwrap().with_site_decoders(vec![vec![0], vec![1]])
            } else {
                Topology::preset("tiny").unwrap()
            };
            // Tests compare the models of two fixtures: both must be the seed's.
            let global = {
                let _rng = crate::torch_rng();
                tch::manual_seed(0);
                MultiTalentNet::new(&topo, 2, Device::Cpu).unwrap()
            };
            let region = |name: &str| ClassRegion { name: name.into(), labels: vec![1] };
            let classes = [GlobalClass::new(0, "a", &region("x")), GlobalClass::new(1, "b", &region("y"))];
            let sites = if decoders { vec!["a".to_string(), "b".to_string()] } else { Vec::new() };
            Self { global, selection: Selection::global(&classes, &sites) }
        }

        /// What an honest site uploads when it did not train at all: its part of the global model.
        fn upload(&self, site: &str) -> Parts {
            Parts::from_wire(&wire::parts_to_wire(&self.global, &self.selection.of_site(site))).unwrap()
        }

        fn validate(&self, site: &str, parts: &Parts) -> Result<f64> {
            validate(&self.global, &self.selection, site, parts, 1e4)
        }

        fn update(&self, site: &str, parts: Parts) -> Update {
            super::aggregate_test::update(site, 4, parts)
        }

        fn aggregate(&mut self, updates: &[&Update]) -> Result<Vec<f64>> {
            self.aggregate_with(updates, &ServerOptimizer::default(), &mut ServerState::default())
        }

        fn aggregate_with(
            &mut self,
            updates: &[&Update],
            optimizer: &ServerOptimizer,
            state: &mut ServerState,
        ) -> Result<Vec<f64>> {
            aggregate(&mut self.global, updates, ServerStep { optimizer, state, privacy: None }, &self.selection)
                .map(|a| a.weights)
        }
    }

    #[test]
    fn sqrt_weights_sum_to_one_and_follow_the_case_counts() {
        let w = sqrt_weights(&[1, 4, 16]);
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((w[1] / w[0] - 2.0).abs() < 1e-12 && (w[2] / w[1] - 2.0).abs() < 1e-12);
    }

    /// Issue 21 item 1: dropping any one head tensor (e.g. a deep-supervision level) of an owned
    /// class must be refused by `validate`, naming the site, the class and the tensor; what
    /// `validate` accepts must aggregate.
    #[test]
    fn partial_heads_are_refused_and_accepted_updates_aggregate() {
        let mut f = Fixture::new(false);
        let honest = f.upload("a");
        f.validate("a", &honest).unwrap();
        let n_heads = honest.heads["a/x"].len();
        assert!(n_heads > 2, "the tiny preset has heads at several levels");
        for dropped in 0..n_heads {
            let mut partial = f.upload("a");
            let name = partial.heads.get_mut("a/x").unwrap().remove(dropped).0;
            let err = format!("{:#}", f.validate("a", &partial).expect_err("a partial head set was accepted"));
            assert!(err.contains("site a") && err.contains("a/x") && err.contains(&name), "{err}");
        }
        // A head tensor sent twice instead of another one.
        let mut doubled = f.upload("a");
        let rows = doubled.heads.get_mut("a/x").unwrap();
        let copy = (rows[0].0.clone(), rows[0].1.shallow_clone());
        rows[1] = copy;
        assert!(f.validate("a", &doubled).is_err(), "a repeated head tensor was accepted");
        // A head row of the wrong shape.
        let mut wide = f.upload("a");
        let rows = wide.heads.get_mut("a/x").unwrap();
        rows[0].1 = Tensor::cat(&[&rows[0].1, &rows[0].1], 0);
        assert!(f.validate("a", &wide).is_err(), "a head row of two classes was accepted");

        let (a, b) = (f.update("a", f.upload("a")), f.update("b", f.upload("b")));
        f.validate("b", &b.parts).unwrap();
        assert_eq!(f.aggregate(&[&a, &b]).unwrap().len(), 2);
    }

    /// Issue 21 item 1, per-site decoders: a decoder missing one tensor is refused; a whole one
    /// aggregates.
    #[test]
    fn partial_site_decoders_are_refused_and_accepted_updates_aggregate() {
        let mut f = Fixture::new(true);
        let honest = f.upload("b");
        f.validate("b", &honest).unwrap();
        let n = honest.decoders["b"].len();
        for dropped in [0, n / 2, n - 1] {
            let mut partial = f.upload("b");
            let name = partial.decoders.get_mut("b").unwrap().remove(dropped).0;
            let err = format!("{:#}", f.validate("b", &partial).expect_err("a partial decoder was accepted"));
            assert!(err.contains("site b") && err.contains("decoder") && err.contains(&name), "{err}");
        }
        let (a, b) = (f.update("a", f.upload("a")), f.update("b", honest));
        f.validate("a", &a.parts).unwrap();
        assert_eq!(f.aggregate(&[&a, &b]).unwrap().len(), 2);
    }

    /// However it gets there, an incomplete update makes `aggregate` fail before it writes
    /// anything: the global model is left as it was.
    #[test]
    fn aggregate_checks_every_update_before_writing() {
        let mut f = Fixture::new(false);
        let before = wire::model_digest(&f.global, &Selection::default());
        let mut moved = f.upload("a");
        for (_, t) in &mut moved.backbone {
            *t = &*t + 1.0;
        }
        let good = f.update("a", moved);
        let mut partial = f.upload("b");
        partial.heads.get_mut("b/y").unwrap().pop();
        let bad = f.update("b", partial);
        assert!(f.aggregate(&[&good, &bad]).is_err());
        assert_eq!(wire::model_digest(&f.global, &Selection::default()), before, "the global model changed");
    }

    /// The first backbone tensor of `parts` / of the global model, as doubles.
    fn first(parts: &Parts) -> Tensor {
        parts.backbone[0].1.to_kind(Kind::Double)
    }

    /// Site a moved every backbone tensor by `by`, site b did not move.
    fn moved_updates(f: &Fixture, by: f64) -> (Update, Update) {
        let mut moved = f.upload("a");
        for (_, t) in &mut moved.backbone {
            *t = &*t + by;
        }
        (f.update("a", moved), f.update("b", f.upload("b")))
    }

    /// `[plan.server]`: lr 1 without momentum is the weighted mean; lr η steps η times the mean
    /// change; momentum μ adds μ times the previous round's step (FedAvgM). Heads stay the
    /// owners' uploads whatever the server does.
    #[test]
    fn the_server_optimizer_steps_along_the_mean_change() {
        let step = |optimizer: ServerOptimizer, rounds: usize| {
            let mut f = Fixture::new(false);
            let start = first(&f.upload("a"));
            let mut state = ServerState::default();
            for _ in 0..rounds {
                let (a, b) = moved_updates(&f, 0.5);
                f.aggregate_with(&[&a, &b], &optimizer, &mut state).unwrap();
            }
            let after = first(&f.upload("a"));
            let head = f.upload("b").heads["b/y"][0].1.shallow_clone();
            (f64::try_from((after - start).mean(Kind::Double)).unwrap(), head, state)
        };
        // Equal case counts: the mean change is 0.25 per round.
        let (fedavg, head, state) = step(ServerOptimizer::default(), 1);
        assert!((fedavg - 0.25).abs() < 1e-6, "{fedavg}");
        assert!(state.velocity.is_empty(), "FedAvg keeps no server state");
        let (scaled, scaled_head, _) = step(ServerOptimizer { lr: 3.0, momentum: 0.0 }, 1);
        assert!((scaled - 0.75).abs() < 1e-6, "{scaled}");
        assert!(head.equal(&scaled_head), "the server step touched a head");
        let (with_momentum, _, state) = step(ServerOptimizer { lr: 1.0, momentum: 0.5 }, 2);
        // Round 1 steps 0.25; round 2 steps 0.5 * 0.25 + 0.25.
        assert!((with_momentum - 0.625).abs() < 1e-6, "{with_momentum}");
        let velocity = f64::try_from(state.velocity[0].1.mean(Kind::Double)).unwrap();
        assert!((velocity - 0.375).abs() < 1e-6, "{velocity}");
    }

    fn dp(clip_norm: f64, noise_multiplier: f64) -> Privacy {
        Privacy::dp(clip_norm, noise_multiplier)
    }

    /// The backbone change of one private aggregation of `updates` and what it reports.
    fn private_change(f: &mut Fixture, updates: &[&Update], privacy: &Privacy) -> (Tensor, Aggregated) {
        let before: Vec<Tensor> = f.global.params().backbone().iter().map(|(_, t)| t.to_kind(Kind::Double)).collect();
        let step = ServerStep {
            optimizer: &ServerOptimizer::default(),
            state: &mut ServerState::default(),
            privacy: Some(privacy),
        };
        let aggregated = aggregate(&mut f.global, updates, step, &f.selection).unwrap();
        let after = f.global.params().backbone();
        let change: Vec<Tensor> =
            after.iter().zip(&before).map(|((_, a), b)| (a.to_kind(Kind::Double) - b).flatten(0, -1)).collect();
        (Tensor::cat(&change, 0), aggregated)
    }

    /// `[plan.privacy]`'s clipping: a change longer than C enters the sum scaled to length C
    /// (weight 1/2 each for equal case counts), one within C as it is; heads stay the uploads.
    #[test]
    fn a_private_aggregate_clips_each_change_to_the_bound() {
        let mut f = Fixture::new(false);
        let (a, b) = moved_updates(&f, 0.5);
        let numel: i64 = f.global.params().backbone().iter().map(|(_, t)| t.numel() as i64).sum();
        let norm = 0.5 * (numel as f64).sqrt();
        let head = f.upload("b").heads["b/y"][0].1.shallow_clone();
        // Noise far below float precision: the change is the clipped mean.
        let (change, aggregated) = private_change(&mut f, &[&a, &b], &dp(1.0, 1e-12));
        let private = aggregated.privacy.expect("a private round reports its clipping");
        assert!((private.clip_factors[0] - 1.0 / norm).abs() < 1e-9, "{:?}", private.clip_factors);
        assert_eq!(private.clip_factors[1], 1.0, "the unmoved site was clipped");
        let expected = 0.5 * 0.5 / norm;
        let mean = f64::try_from(change.mean(Kind::Double)).unwrap();
        assert!((mean - expected).abs() < 1e-6 * expected.max(1e-3), "{mean} vs {expected}");
        let total = f64::try_from(change.norm()).unwrap();
        assert!((total - 0.5).abs() < 1e-3, "the clipped mean has norm {total}, expected C / 2");
        assert!(f.upload("b").heads["b/y"][0].1.equal(&head), "a head changed");
        // Within the bound: not clipped, the plain mean.
        let mut g = Fixture::new(false);
        let (a, b) = moved_updates(&g, 0.5);
        let (change, aggregated) = private_change(&mut g, &[&a, &b], &dp(2.0 * norm, 1e-12));
        assert_eq!(aggregated.privacy.unwrap().clip_factors, vec![1.0, 1.0]);
        assert!((f64::try_from(change.mean(Kind::Double)).unwrap() - 0.25).abs() < 1e-6);
    }

    /// The noise: zero-mean Gaussian of std σ·C·max w per coordinate, different every round
    /// (drawn from the OS, not from a seed).
    #[test]
    fn a_private_aggregate_adds_gaussian_noise_of_the_stated_std() {
        let privacy = dp(0.1, 2.0);
        let noise = |f: &mut Fixture| {
            let (a, b) = (f.update("a", f.upload("a")), f.update("b", f.upload("b")));
            private_change(f, &[&a, &b], &privacy)
        };
        let mut f = Fixture::new(false);
        let (first, aggregated) = noise(&mut f);
        let std = aggregated.privacy.unwrap().noise_std;
        assert!((std - 2.0 * 0.1 * 0.5).abs() < 1e-12, "{std}");
        let n = first.numel() as f64;
        let mean = f64::try_from(first.mean(Kind::Double)).unwrap();
        let sample_std = f64::try_from(first.std(true)).unwrap();
        assert!(n > 1e4, "too few coordinates ({n}) for the statistics");
        assert!(mean.abs() < 5.0 * std / n.sqrt(), "mean {mean}");
        // The float32 backbone rounds each value: allow 1 % (the sample's own error is ~1/sqrt(2n)).
        assert!((sample_std / std - 1.0).abs() < 0.01, "std {sample_std} vs {std}");
        let kurtosis = f64::try_from((&first / sample_std).pow_tensor_scalar(4).mean(Kind::Double)).unwrap();
        assert!((kurtosis - 3.0).abs() < 0.2, "kurtosis {kurtosis}: not Gaussian");
        let mut g = Fixture::new(false);
        let (second, _) = noise(&mut g);
        assert!(!first.allclose(&second, 0.0, 1e-9, false), "the same noise twice");
    }

    /// A checkpointed velocity comes back in the backbone's order whatever order the file
    /// keeps; a file missing a tensor is refused naming it.
    #[test]
    fn a_checkpointed_velocity_loads_in_backbone_order_and_a_broken_one_is_refused() {
        let f = Fixture::new(false);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("server_momentum.safetensors");
        let velocity: Vec<(String, Tensor)> = {
            let _rng = crate::torch_rng(); // it draws from the generator other tests seed
            f.global.params().backbone().into_iter().map(|(n, t)| (n, t.rand_like().to_kind(Kind::Double))).collect()
        };
        let mut reversed: Vec<(String, Tensor)> =
            velocity.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        reversed.reverse();
        fedtalent_model::io::write_tensors_atomic(&file, &reversed).unwrap();
        let loaded = ServerState::load(&f.global, &file).unwrap();
        assert_eq!(loaded.velocity.len(), velocity.len());
        for ((a, x), (b, y)) in loaded.velocity.iter().zip(&velocity) {
            assert_eq!(a, b);
            assert!(x.equal(y), "{a}: values changed");
        }
        fedtalent_model::io::write_tensors_atomic(&file, &velocity[1..]).unwrap();
        let err = format!("{:#}", ServerState::load(&f.global, &file).err().expect("a partial velocity was accepted"));
        assert!(err.contains("server_momentum.safetensors") && err.contains("server momentum"), "{err}");
    }
}
