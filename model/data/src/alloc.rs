//! How the process's C allocator treats the large buffers libtorch frees on the CPU.
//!
//! glibc's malloc hands every allocation above its mmap threshold (at most 32 MB) to a fresh
//! `mmap` and gives it back with `munmap` when freed, and trims the heap's free top back to the
//! kernel. A training step or a sliding-window tile frees and allocates the same activation
//! sizes again and again, so each time the kernel zeroes new pages and takes a page fault per
//! 4 KB: measured on a 2-core CPU, a fifth of a `tiny` predict's CPU time was in the kernel
//! (`clear_page_erms`, page faults, `unmap_page_range`). Keeping freed memory in the process for
//! reuse (no mmap'd chunks, no trimming) made predict 1.3-1.5x and a `unet` training step
//! 1.2-1.7x faster there (docs/bench-cpu-alloc-2026-12-07.txt). This is what PyTorch's CPU
//! performance guide gets from swapping in jemalloc or tcmalloc, without a new allocator.
//! The cost: the process keeps its peak heap until it exits.
//! (libtorch's own 64-byte-aligned allocations stay 64-byte aligned, so no result changes.)

/// Keeps freed memory in the process for reuse (see the module doc). A no-op outside glibc, and
/// when the user chose malloc tunables themselves (`GLIBC_TUNABLES` naming `glibc.malloc`).
/// Call first thing in `main`, before any thread allocates.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::ffi::c_int;
        extern "C" {
            fn mallopt(param: c_int, value: c_int) -> c_int;
        }
        // glibc's malloc.h
        const M_TRIM_THRESHOLD: c_int = -1;
        const M_MMAP_MAX: c_int = -4;
        if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc")) {
            return;
        }
        // SAFETY: mallopt only sets the allocator's parameters; both are documented settings.
        // Without mmap'd chunks a request the heap cannot hold still falls back to mmap.
        unsafe {
            mallopt(M_MMAP_MAX, 0);
            mallopt(M_TRIM_THRESHOLD, c_int::MAX);
        }
    }
}
