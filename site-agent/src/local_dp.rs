//! Local differential privacy (`[plan.privacy] noise = "sites"`): before an update leaves the
//! site, its backbone's change from the round's global model is clipped to L2 norm C and
//! Gaussian noise of std σ·C is added to every coordinate, so no one, the coordinator included,
//! ever sees an un-noised change. With secure aggregation the noised change is what is masked.

use anyhow::Result;
use fedtalent_model::noise::GaussianNoise;
use fedtalent_model::MultiTalentNet;
use fedtalent_vocab::Privacy;
use tch::{Kind, Tensor};

/// The backbone of the global model this round started from.
pub(crate) struct RoundStartBackbone(Vec<(String, Tensor)>);

impl RoundStartBackbone {
    pub(crate) fn of(net: &MultiTalentNet) -> Self {
        Self(net.params().backbone().into_iter().map(|(name, t)| (name, t.detach().copy())).collect())
    }

    /// Replaces `net`'s backbone by the round's global one plus the clipped, noised change;
    /// returns the change's L2 norm before clipping.
    pub(crate) fn privatize(&self, net: &mut MultiTalentNet, p: &Privacy) -> Result<f64> {
        let now = net.params().backbone();
        let changes: Vec<Tensor> = now
            .iter()
            .zip(&self.0)
            .map(|((_, t), (_, start))| t.to_kind(Kind::Double) - start.to_kind(Kind::Double))
            .collect();
        let norm = changes.iter().map(|c| c.square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt();
        let factor = if norm > p.clip_norm { p.clip_norm / norm } else { 1.0 };
        let mut noise = GaussianNoise::from_entropy(p.site_noise_std());
        for ((name, start), change) in self.0.iter().zip(changes) {
            let noise = noise.like(&change);
            let private = start.to_kind(Kind::Double) + change * factor + noise;
            net.params_mut().copy_into(name, &private.to_kind(Kind::Float))?;
        }
        Ok(norm)
    }
}

#[cfg(test)]
mod tests {
    use fedtalent_model::Topology;
    use fedtalent_vocab::NoiseAt;

    use super::*;

    /// A change longer than C leaves at length C plus N(0, (σC)²) per coordinate: the residual
    /// after removing the clipped change has that std, and the noise differs every time.
    #[test]
    fn the_change_leaves_clipped_and_noised() {
        tch::manual_seed(5);
        let mut net = MultiTalentNet::new(&Topology::preset("tiny").unwrap(), 2, tch::Device::Cpu).unwrap();
        let start = RoundStartBackbone::of(&net);
        let moved: Vec<(String, Tensor)> =
            net.params().backbone().into_iter().map(|(n, t)| (n, &t + t.randn_like() * 0.01)).collect();
        for (name, t) in &moved {
            net.params_mut().copy_into(name, t).unwrap();
        }
        let p = Privacy { noise: NoiseAt::Sites, ..Privacy::dp(0.5, 0.01) };
        let norm = start.privatize(&mut net, &p).unwrap();
        assert!(norm > p.clip_norm, "the test change ({norm}) must exceed C");
        let (mut residual_sq, mut count, mut clipped_sq) = (0f64, 0i64, 0f64);
        for (((_, after), (_, moved)), (_, before)) in net.params().backbone().iter().zip(&moved).zip(&start.0) {
            let clipped = (moved - before).to_kind(Kind::Double) * (p.clip_norm / norm);
            let residual = after.to_kind(Kind::Double) - before.to_kind(Kind::Double) - &clipped;
            residual_sq += residual.square().sum(Kind::Double).double_value(&[]);
            clipped_sq += clipped.square().sum(Kind::Double).double_value(&[]);
            count += residual.numel() as i64;
        }
        let std = (residual_sq / count as f64).sqrt();
        assert!((clipped_sq.sqrt() - p.clip_norm).abs() < 1e-6, "the clipped change has norm {}", clipped_sq.sqrt());
        let expected = p.site_noise_std();
        assert!((std / expected - 1.0).abs() < 0.02, "noise std {std}, expected {expected} over {count} values");
    }
}
