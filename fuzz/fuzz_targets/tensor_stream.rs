#![no_main]
//! Tensor stream receiver: arbitrary bytes must be refused (or, if they happen to form a valid
//! stream, accepted) without a panic and without allocating beyond the limits.
use fedtalent_protocol::{recv_tensors, RecvLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let limits = RecvLimits { max_total_bytes: 1 << 20, ..RecvLimits::default() };
    let _ = rt.block_on(recv_tensors(&mut &data[..], &limits));
});
