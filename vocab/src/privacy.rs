//! `[plan.privacy]`: client-level differential privacy of the backbone (DP-FedAvg, McMahan et
//! al. 2018, with the coordinator as the trusted aggregator, as Flower's server-side fixed
//! clipping) and its Rényi-DP accountant.
//!
//! Each round, every site's backbone change is clipped to L2 norm `clip_norm` = C, the
//! sqrt(n)-weighted sum of the clipped changes gets Gaussian noise of std σ·C·max_k w_k per
//! coordinate (max_k w_k·C bounds what one site's change moves the sum, so σ is the noise
//! multiplier of a Gaussian mechanism with sensitivity 1), and only that noisy sum leaves the
//! coordinator. Every site takes part in every round (no client subsampling, so no
//! amplification: q = 1), and the rounds compose: after T rounds the RDP of order α is
//! T·α / (2σ²) (Mironov 2017, Prop. 7 for the Gaussian mechanism), converted to (ε, δ) with
//! Balle et al. 2020's bound as Opacus does: ε = min_α RDP(α) + log((α−1)/α) − (log δ + log α)/(α−1).
//!
//! What ε covers: the backbones the coordinator sends to sites and exports. Heads (and per-site
//! decoders) are trained by their owner alone and sent to no other site during a federation;
//! noising them would add noise of the full sensitivity to a single owner's weights (nothing is
//! averaged), which destroys them at any useful σ. They leave the coordinator only in the
//! exported model, which is therefore covered for the backbone only: share the exported
//! backbone, not the heads, with parties outside the federation.
//!
//! `secure_aggregation = true` (off by default; with or without the DP keys) masks each site's
//! backbone change so that the coordinator learns only the sqrt(n)-weighted sum (SecAgg, crate
//! `fedtalent-secagg`). The coordinator then cannot clip per update: with both on, each site
//! clips its own change to `clip_norm` before masking (Flower's client-side fixed clipping) and
//! the coordinator adds the noise to the unmasked sum, so ε is the same.
//!
//! `noise = "sites"` (local DP; default `"server"`): each site clips its own change to C and adds
//! Gaussian noise of std σ·C to it before it uploads (or masks) it, so no one — the coordinator
//! included — ever sees an un-noised change; the coordinator neither clips nor adds noise. Each
//! site's release is then a Gaussian mechanism of sensitivity C and noise multiplier σ, so the
//! same accountant gives its ε; the weighted mean carries σ·C·sqrt(Σ w_k²) ≥ σ·C·max w_k of
//! noise, more than the central mechanism's, which is the price of trusting no aggregator.

use serde::{Deserialize, Serialize};

/// Where differential privacy's Gaussian noise is added (`[plan.privacy].noise`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseAt {
    /// The coordinator clips each change and noises their weighted sum (central DP).
    #[default]
    Server,
    /// Each site clips its own change and noises it before uploading (local DP).
    Sites,
}

/// `[plan.privacy]`; absent: no differential privacy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Privacy {
    /// C: the L2 bound on one site's backbone change per round (over all backbone tensors).
    /// 0 (absent) with `noise_multiplier` 0: no differential privacy.
    #[serde(default)]
    pub clip_norm: f64,
    /// σ: the noise std relative to one site's largest possible contribution, max_k w_k·C.
    #[serde(default)]
    pub noise_multiplier: f64,
    /// δ of the reported (ε, δ); well below 1 / (number of sites).
    #[serde(default = "Privacy::default_delta")]
    pub delta: f64,
    /// The federation stops after the last round whose ε stays within this budget.
    #[serde(default)]
    pub epsilon_budget: Option<f64>,
    /// Who adds the noise: the coordinator (`"server"`, the default) or each site (`"sites"`).
    #[serde(default)]
    pub noise: NoiseAt,
    /// Secure aggregation of the backbone (the coordinator sees only the weighted sum).
    #[serde(default)]
    pub secure_aggregation: bool,
    /// R: each coordinate of a site's backbone change is clamped to [−R, R] before masking.
    #[serde(default = "Privacy::default_secagg_clip_range")]
    pub secagg_clip_range: f32,
    /// f: the fixed-point unit is 2^-f (before the sqrt(n) weight).
    #[serde(default = "Privacy::default_secagg_frac_bits")]
    pub secagg_frac_bits: u32,
    /// t: the sites any stage needs (and the shares that rebuild a secret); absent: a majority
    /// of the sites in the round, at least 2.
    #[serde(default)]
    pub secagg_threshold: Option<u32>,
    /// How long the key stages wait for the sites (and the unmasking after the round's inputs).
    #[serde(default = "Privacy::default_secagg_stage_timeout_s")]
    pub secagg_stage_timeout_s: u64,
}

/// The Rényi orders the accountant minimises over: Opacus' `DEFAULT_ALPHAS` and larger ones,
/// which the small σ of few-site federations need.
fn orders() -> impl Iterator<Item = f64> {
    (1..100).map(|x| 1.0 + x as f64 / 10.0).chain((12..64).map(f64::from)).chain([128.0, 256.0, 512.0, 1024.0])
}

impl Privacy {
    fn default_delta() -> f64 {
        1e-5
    }

    fn default_secagg_clip_range() -> f32 {
        1.0
    }

    fn default_secagg_frac_bits() -> u32 {
        20
    }

    fn default_secagg_stage_timeout_s() -> u64 {
        120
    }

    /// Differential privacy (DP-FedAvg) of `clip_norm` and `noise_multiplier`, without secure
    /// aggregation.
    pub fn dp(clip_norm: f64, noise_multiplier: f64) -> Self {
        Privacy {
            clip_norm,
            noise_multiplier,
            delta: Self::default_delta(),
            epsilon_budget: None,
            noise: NoiseAt::Server,
            secure_aggregation: false,
            secagg_clip_range: Self::default_secagg_clip_range(),
            secagg_frac_bits: Self::default_secagg_frac_bits(),
            secagg_threshold: None,
            secagg_stage_timeout_s: Self::default_secagg_stage_timeout_s(),
        }
    }

    /// Secure aggregation at its defaults, without differential privacy.
    pub fn secure_aggregation_only() -> Self {
        Privacy { secure_aggregation: true, ..Self::dp(0.0, 0.0) }
    }

    /// `[plan.privacy]` of the command-line flags: DP where its flags are given, secure
    /// aggregation where asked; None without either.
    pub fn of_flags(dp: Option<Privacy>, secure_aggregation: bool) -> Option<Privacy> {
        match dp {
            Some(p) => Some(Privacy { secure_aggregation, ..p }),
            None if secure_aggregation => Some(Self::secure_aggregation_only()),
            None => None,
        }
    }

    /// Whether differential privacy is on (`clip_norm` and `noise_multiplier` set).
    pub fn differential(&self) -> bool {
        self.clip_norm != 0.0 || self.noise_multiplier != 0.0
    }

    /// Whether each site clips and noises its own change (local DP).
    pub fn noised_by_sites(&self) -> bool {
        self.differential() && self.noise == NoiseAt::Sites
    }

    /// The per-coordinate noise std each site adds to its clipped change under local DP: σ·C.
    pub fn site_noise_std(&self) -> f64 {
        self.noise_multiplier * self.clip_norm
    }

    /// The threshold of a round of `sites` sites: `secagg_threshold`, or a majority (at least 2).
    pub fn secagg_threshold_of(&self, sites: usize) -> usize {
        self.secagg_threshold.map_or((sites / 2 + 1).max(2), |t| t as usize)
    }

    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.noise == NoiseAt::Sites && !self.differential() {
            return Err("[plan.privacy].noise = \"sites\" needs clip_norm and noise_multiplier".into());
        }
        if !self.differential() && !self.secure_aggregation {
            return Err("[plan.privacy] sets neither clip_norm and noise_multiplier nor secure_aggregation".into());
        }
        if self.secure_aggregation {
            if !(self.secagg_clip_range > 0.0 && self.secagg_clip_range.is_finite()) {
                return Err(format!("[plan.privacy].secagg_clip_range = {} must be positive", self.secagg_clip_range));
            }
            if self.secagg_frac_bits > 30
                || self.secagg_clip_range as f64 * (self.secagg_frac_bits as f64).exp2() >= 2f64.powi(31)
            {
                return Err(format!(
                    "[plan.privacy].secagg_frac_bits = {} with secagg_clip_range {} does not fit 31 bits",
                    self.secagg_frac_bits, self.secagg_clip_range
                ));
            }
            if self.secagg_threshold.is_some_and(|t| t < 2) {
                return Err("[plan.privacy].secagg_threshold must be at least 2".into());
            }
            if self.secagg_stage_timeout_s == 0 {
                return Err("[plan.privacy].secagg_stage_timeout_s must be at least 1".into());
            }
            if !self.differential() {
                return if self.epsilon_budget.is_some() {
                    Err("[plan.privacy].epsilon_budget needs clip_norm and noise_multiplier".into())
                } else {
                    Ok(())
                };
            }
        }
        if !(self.clip_norm > 0.0 && self.clip_norm.is_finite()) {
            return Err(format!("[plan.privacy].clip_norm = {} must be positive", self.clip_norm));
        }
        if !(self.noise_multiplier > 0.0 && self.noise_multiplier.is_finite()) {
            return Err(format!("[plan.privacy].noise_multiplier = {} must be positive", self.noise_multiplier));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(format!("[plan.privacy].delta = {} must be in (0, 1)", self.delta));
        }
        if let Some(budget) = self.epsilon_budget {
            if !(budget > 0.0 && budget.is_finite()) {
                return Err(format!("[plan.privacy].epsilon_budget = {budget} must be positive"));
            }
        }
        Ok(())
    }

    /// ε after `rounds` rounds (0 rounds: nothing released, ε = 0).
    pub fn epsilon(&self, rounds: u32) -> f64 {
        if rounds == 0 {
            return 0.0;
        }
        let per_order = |alpha: f64| rounds as f64 * alpha / (2.0 * self.noise_multiplier.powi(2));
        orders()
            .map(|alpha| {
                let eps =
                    per_order(alpha) + ((alpha - 1.0) / alpha).ln() - (self.delta.ln() + alpha.ln()) / (alpha - 1.0);
                eps.max(0.0)
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// The last round of `planned` whose ε stays within the budget (all of them without one).
    pub fn rounds_within_budget(&self, planned: u32) -> u32 {
        match self.epsilon_budget {
            None => planned,
            // ε grows with the rounds: the first round over the budget ends the federation.
            Some(budget) => (1..=planned).take_while(|&r| self.epsilon(r) <= budget).last().unwrap_or(0),
        }
    }

    /// The per-coordinate noise std on the weighted sum of clipped changes, for the largest
    /// sqrt(n) weight among the sites of the round.
    pub fn noise_std(&self, max_weight: f64) -> f64 {
        self.noise_multiplier * self.clip_norm * max_weight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn privacy(sigma: f64, budget: Option<f64>) -> Privacy {
        Privacy { epsilon_budget: budget, ..Privacy::dp(1.0, sigma) }
    }

    #[test]
    fn epsilon_grows_with_rounds_and_falls_with_noise() {
        let p = privacy(1.0, None);
        assert_eq!(p.epsilon(0), 0.0);
        assert!(p.epsilon(1) < p.epsilon(10));
        assert!(privacy(2.0, None).epsilon(10) < p.epsilon(10));
    }

    /// The Gaussian mechanism of σ composed T times is one of σ/√T: same ε.
    #[test]
    fn composition_equals_one_mechanism_of_scaled_noise() {
        let t = 16;
        let many = privacy(4.0, None).epsilon(t);
        let one = privacy(1.0, None).epsilon(1);
        assert!((many - one).abs() < 1e-9, "{many} vs {one}");
    }

    #[test]
    fn budget_stops_at_the_last_round_within_it() {
        let p = privacy(1.0, Some(5.0));
        let r = p.rounds_within_budget(1000);
        assert!((1..1000).contains(&r));
        assert!(p.epsilon(r) <= 5.0 && p.epsilon(r + 1) > 5.0);
        assert_eq!(privacy(1.0, Some(1e-3)).rounds_within_budget(10), 0);
        assert_eq!(privacy(1.0, None).rounds_within_budget(10), 10);
    }

    #[test]
    fn bad_values_are_named() {
        for (p, field) in [
            (Privacy { clip_norm: 0.0, ..privacy(1.0, None) }, "clip_norm"),
            (Privacy { noise_multiplier: f64::NAN, ..privacy(1.0, None) }, "noise_multiplier"),
            (Privacy { delta: 1.0, ..privacy(1.0, None) }, "delta"),
            (privacy(1.0, Some(-1.0)), "epsilon_budget"),
            (Privacy { noise: NoiseAt::Sites, ..Privacy::secure_aggregation_only() }, "noise = \"sites\""),
        ] {
            let e = p.validate().unwrap_err();
            assert!(e.contains(field), "{e}");
        }
        assert!(privacy(1.0, Some(3.0)).validate().is_ok());
        let local = Privacy { noise: NoiseAt::Sites, ..privacy(2.0, None) };
        assert!(local.validate().is_ok() && local.noised_by_sites());
        assert_eq!(local.site_noise_std(), 2.0);
        assert!(!privacy(2.0, None).noised_by_sites());
    }

    /// `secure_aggregation` stands alone (no DP keys) or goes with DP; DP keys half set, or
    /// a fixed-point range over 31 bits, are refused by name.
    #[test]
    fn secure_aggregation_alone_or_with_dp() {
        let alone = Privacy::secure_aggregation_only();
        assert!(alone.validate().is_ok() && !alone.differential());
        assert_eq!(alone.secagg_threshold_of(3), 2);
        assert_eq!(alone.secagg_threshold_of(10), 6);
        let both = Privacy { secure_aggregation: true, ..privacy(1.0, None) };
        assert!(both.validate().is_ok() && both.differential());
        for (p, field) in [
            (Privacy { clip_norm: 1.0, ..alone }, "noise_multiplier"),
            (Privacy { secagg_frac_bits: 31, ..alone }, "secagg_frac_bits"),
            (Privacy { secagg_threshold: Some(1), ..alone }, "secagg_threshold"),
            (Privacy { epsilon_budget: Some(1.0), ..alone }, "epsilon_budget"),
            (Privacy { secure_aggregation: false, ..alone }, "secure_aggregation"),
        ] {
            let e = p.validate().unwrap_err();
            assert!(e.contains(field), "{e}");
        }
    }
}
