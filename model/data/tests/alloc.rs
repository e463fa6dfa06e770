//! `keep_freed_memory`: a buffer of the size of a training activation comes from the heap, not
//! from its own mmap (which the kernel would zero and fault in again after every free), unless
//! the user set malloc tunables of their own.
#![cfg(all(target_os = "linux", target_env = "gnu"))]

/// glibc's `struct mallinfo2` (malloc.h): every field a size_t.
#[repr(C)]
#[derive(Default)]
struct MallInfo2 {
    arena: usize,
    ordblks: usize,
    smblks: usize,
    hblks: usize,
    hblkhd: usize,
    usmblks: usize,
    fsmblks: usize,
    uordblks: usize,
    fordblks: usize,
    keepcost: usize,
}

extern "C" {
    fn mallinfo2() -> MallInfo2;
}

/// Bytes in mmap'd chunks.
fn mmapped_bytes() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    unsafe { mallinfo2() }.hblkhd
}

#[test]
fn large_buffers_come_from_the_heap_and_stay_for_reuse() {
    const SIZE: usize = 16 << 20;
    // glibc's default: a 16 MB request in a fresh process is an mmap of its own. (Kept, not
    // freed: freeing an mmap'd chunk raises glibc's threshold to its size.)
    let before = mmapped_bytes();
    let first = std::hint::black_box(vec![1u8; SIZE]);
    assert!(mmapped_bytes() >= before + SIZE, "the default allocator did not mmap 16 MB (glibc changed?)");

    // A user's own malloc tunables win: the call changes nothing, a 16 MB buffer is still mmap'd.
    std::env::set_var("GLIBC_TUNABLES", "glibc.malloc.check=0");
    fedtalent_data::alloc::keep_freed_memory();
    std::env::remove_var("GLIBC_TUNABLES");
    let before = mmapped_bytes();
    let users = std::hint::black_box(vec![2u8; SIZE]);
    assert!(mmapped_bytes() >= before + SIZE, "the user's GLIBC_TUNABLES were overridden");

    fedtalent_data::alloc::keep_freed_memory();
    let before = mmapped_bytes();
    let buffers: Vec<Vec<u8>> = (0..4).map(|i| std::hint::black_box(vec![i as u8; SIZE])).collect();
    assert!(
        mmapped_bytes() < before + SIZE,
        "16 MB buffers were still mmap'd: {} bytes more",
        mmapped_bytes() - before
    );
    assert_eq!(buffers[3][SIZE - 1] + first[0] + users[0], 6);
}
