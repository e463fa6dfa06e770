//! Per-site decoders, for every layout: site s's classes read the features of decoder s. Each
//! graph builds its decoders (one, or one per site under `decoders.<s>.*` with
//! [`crate::params::Role::SiteDecoder`]); this module routes the heads' rows to them, so the
//! outputs keep the `[B, C, ...]` class layout and the loss is unchanged.

use anyhow::{bail, ensure, Result};
use tch::Tensor;

use crate::blocks::Head;
use crate::params::ParamStore;

/// Per-site decoders: which classes' heads read which decoder.
#[derive(Debug)]
pub(crate) struct SiteRouting {
    /// Class indices of each site.
    rows: Vec<Tensor>,
    /// The permutation putting the sites' concatenated logits back into class order.
    inverse: Tensor,
}

impl Clone for SiteRouting {
    /// Index tensors of their own (a network's deep copy shares no storage with it).
    fn clone(&self) -> Self {
        Self { rows: self.rows.iter().map(Tensor::copy).collect(), inverse: self.inverse.copy() }
    }
}

impl SiteRouting {
    pub(crate) fn new(sites: &[Vec<i64>], device: tch::Device) -> Self {
        let order: Vec<i64> = sites.iter().flatten().copied().collect();
        let mut inverse = vec![0i64; order.len()];
        for (pos, &c) in order.iter().enumerate() {
            inverse[c as usize] = pos as i64;
        }
        let rows = sites.iter().map(|s| Tensor::from_slice(s).to_device(device)).collect();
        Self { rows, inverse: Tensor::from_slice(&inverse).to_device(device) }
    }

    /// Logits of `head` in class order, each site's classes from its own decoder's `features`.
    pub(crate) fn logits(&self, p: &ParamStore, head: &Head, features: &[&Tensor]) -> Tensor {
        let per_site: Vec<Tensor> =
            self.rows.iter().zip(features).map(|(rows, x)| head.forward_rows(p, x, rows)).collect();
        Tensor::cat(&per_site, 1).index_select(1, &self.inverse)
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
