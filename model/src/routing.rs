//! Per-site decoders, for every layout: site s's classes read the features of decoder s. Each
//! graph builds its decoders (one, or one per site under `decoders.<s>.*` with
//! [`crate::params::Role::SiteDecoder`]); this module routes the heads' rows to them, so the
//! outputs keep the `[B, C, ...]` class layout and the loss is unchanged.

use anyhow::{bail, ensure, Result};
use tch::Tensor;

use crate::blocks::Head;
use crate::network::Outputs;
use crate::params::ParamStore;

/// Per-site decoders: which classes' heads read which decoder.
#[derive(Debug)]
pub(crate) struct SiteRouting {
    /// Class indices of each site.
    rows: Vec<Tensor>,
    /// The permutation putting the sites' concatenated logits back into class order.
    inverse: Tensor,
    /// The site (decoder) of each class.
    site_of: Vec<usize>,
}

impl Clone for SiteRouting {
    /// Index tensors of their own (a network's deep copy shares no storage with it).
    fn clone(&self) -> Self {
        Self {
            rows: self.rows.iter().map(Tensor::copy).collect(),
            inverse: self.inverse.copy(),
            site_of: self.site_of.clone(),
        }
    }
}

impl SiteRouting {
    pub(crate) fn new(sites: &[Vec<i64>], device: tch::Device) -> Self {
        let order: Vec<i64> = sites.iter().flatten().copied().collect();
        let mut inverse = vec![0i64; order.len()];
        let mut site_of = vec![0usize; order.len()];
        for (pos, &c) in order.iter().enumerate() {
            inverse[c as usize] = pos as i64;
        }
        for (s, site) in sites.iter().enumerate() {
            for &c in site {
                site_of[c as usize] = s;
            }
        }
        let rows = sites.iter().map(|s| Tensor::from_slice(s).to_device(device)).collect();
        Self { rows, inverse: Tensor::from_slice(&inverse).to_device(device), site_of }
    }

    /// Whether decoder `site` has to run for `outputs`: always, unless only some classes are
    /// asked for and none of them is this site's.
    pub(crate) fn runs(&self, site: usize, outputs: Outputs) -> bool {
        match outputs {
            Outputs::Classes(classes) => classes.iter().any(|&c| self.site_of[c as usize] == site),
            Outputs::AllLevels | Outputs::FullResolution => true,
        }
    }

    /// Logits of `head`, each site's classes from its own decoder's `features` (`None` where the
    /// decoder did not run): in class order, or `Outputs::Classes`' classes in their order.
    /// `None` when a decoder whose classes are needed has no features at this level.
    pub(crate) fn logits(
        &self,
        p: &ParamStore,
        head: &Head,
        features: &[Option<&Tensor>],
        outputs: Outputs,
    ) -> Option<Tensor> {
        if let Outputs::Classes(classes) = outputs {
            return self.selected_logits(p, head, features, classes);
        }
        let per_site: Option<Vec<Tensor>> =
            self.rows.iter().zip(features).map(|(rows, x)| Some(head.forward_rows(p, (*x)?, rows))).collect();
        Some(Tensor::cat(&per_site?, 1).index_select(1, &self.inverse))
    }

    /// The rows `classes` of `head`, in that order: per site, its requested classes from its
    /// decoder, then the permutation back to the request's order.
    fn selected_logits(
        &self,
        p: &ParamStore,
        head: &Head,
        features: &[Option<&Tensor>],
        classes: &[i64],
    ) -> Option<Tensor> {
        let mut per_site = Vec::new();
        let mut position = vec![0i64; classes.len()];
        let mut next = 0i64;
        for (site, x) in features.iter().enumerate() {
            let wanted: Vec<usize> =
                (0..classes.len()).filter(|&i| self.site_of[classes[i] as usize] == site).collect();
            if wanted.is_empty() {
                continue;
            }
            let x = (*x)?;
            let rows: Vec<i64> = wanted.iter().map(|&i| classes[i]).collect();
            per_site.push(head.forward_rows(p, x, &Tensor::from_slice(&rows).to_device(x.device())));
            for i in wanted {
                position[i] = next;
                next += 1;
            }
        }
        let logits = Tensor::cat(&per_site, 1);
        Some(logits.index_select(1, &Tensor::from_slice(&position).to_device(logits.device())))
    }
}

/// Each decoder's features by level, `forward(decoder)` for those `outputs` needs: a decoder
/// whose classes are not asked for does not run (no features at any level).
pub(crate) fn decoder_features(
    routing: Option<&SiteRouting>,
    decoders: usize,
    outputs: Outputs,
    forward: impl Fn(usize) -> Vec<Option<Tensor>>,
) -> Vec<Vec<Option<Tensor>>> {
    let runs = |s: usize| routing.is_none_or(|r| r.runs(s, outputs));
    (0..decoders).map(|s| if runs(s) { forward(s) } else { Vec::new() }).collect()
}

/// One head's logits from the decoders' features at its level (one entry per decoder; `None`
/// where it did not run or this level needs no head): `routing`'s, or the single decoder's
/// rows (all, or `Outputs::Classes`' in their order).
pub(crate) fn head_logits(
    p: &ParamStore,
    head: &Head,
    routing: Option<&SiteRouting>,
    features: &[Option<&Tensor>],
    outputs: Outputs,
) -> Option<Tensor> {
    match routing {
        Some(routing) => routing.logits(p, head, features, outputs),
        None => {
            let x = features[0]?;
            Some(match outputs {
                Outputs::Classes(classes) => {
                    head.forward_rows(p, x, &Tensor::from_slice(classes).to_device(x.device()))
                }
                Outputs::AllLevels | Outputs::FullResolution => head.forward(p, x),
            })
        }
    }
}

/// Refuses per-site decoders that are no partition of the classes `0..classes` (none: fine).
pub(crate) fn check_site_partition(sites: &[Vec<i64>], classes: i64) -> Result<()> {
    if sites.is_empty() {
        return Ok(());
    }
    let mut seen = vec![false; classes as usize];
    for (s, site) in sites.iter().enumerate() {
        ensure!(!site.is_empty(), "per-site decoders: site {s} has no class");
        for &c in site {
            ensure!(c >= 0 && c < classes, "per-site decoders: site {s} lists class {c}, the network has {classes}");
            ensure!(!seen[c as usize], "per-site decoders: class {c} is listed twice");
            seen[c as usize] = true;
        }
    }
    if let Some(c) = seen.iter().position(|s| !s) {
        bail!("per-site decoders: class {c} belongs to no site");
    }
    Ok(())
}
