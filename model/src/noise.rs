//! Gaussian noise for differential privacy, from a generator no participant can reproduce.

use tch::Tensor;

/// N(0, std²) samples from a cryptographic generator seeded by the operating system (Box–Muller
/// in f64). Never from a seed: noise that can be regenerated can be subtracted.
pub struct GaussianNoise {
    rng: rand::rngs::StdRng,
    std: f64,
}

impl GaussianNoise {
    pub fn from_entropy(std: f64) -> Self {
        use rand::SeedableRng;
        Self { rng: rand::rngs::StdRng::from_entropy(), std }
    }

    /// A tensor of noise with `like`'s shape, f64, on the CPU then moved to its device.
    pub fn like(&mut self, like: &Tensor) -> Tensor {
        use rand::Rng;
        let n = like.numel();
        let mut values = Vec::with_capacity(n + 1);
        while values.len() < n {
            // u1 in (0, 1]: ln(u1) is finite.
            let u1: f64 = 1.0 - self.rng.gen::<f64>();
            let u2: f64 = self.rng.gen();
            let r = (-2.0 * u1.ln()).sqrt() * self.std;
            let theta = std::f64::consts::TAU * u2;
            values.push(r * theta.cos());
            values.push(r * theta.sin());
        }
        values.truncate(n);
        Tensor::from_slice(&values).view(like.size().as_slice()).to_device(like.device())
    }
}
