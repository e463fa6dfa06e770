//! The benchmarks' model: pseudo-random f32 tensors (shared by the examples through `#[path]`).

use fedtalent_protocol::{TensorSet, WireTensor};

/// A seeded pseudo-random f32 model of `total_bytes`, in tensors of at most 4 MiB (the unet's
/// largest convolutions are ~3.5 MiB).
pub fn model(total_bytes: usize) -> TensorSet {
    let per = 1usize << 20; // f32 elements per tensor
    let mut left = total_bytes / 4;
    let mut set = TensorSet::default();
    let mut i = 0u32;
    let mut x = 0x1234_5678u32;
    while left > 0 {
        let n = left.min(per);
        let vals: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) - 0.5
            })
            .collect();
        set.push(WireTensor::from_f32(format!("layer{i}.weight"), vec![n as u64], &vals));
        left -= n;
        i += 1;
    }
    set
}
