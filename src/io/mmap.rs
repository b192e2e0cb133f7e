//! The one place that memory-maps files (everything else sees `&[u8]` through
//! [`crate::io::bytes::ByteView`]), and with it the other raw OS call we make: the writeback
//! hint of [`start_writeback`].

use std::fs::File;
use std::io;

pub use memmap2::Mmap;

/// Maps `file` read-only.
///
/// # Safety contract (upheld by callers, documented for users)
/// The mapping is only sound while no other process truncates or rewrites the
/// file. Checkpoints are inputs we never modify, and our own writer never
/// rewrites a file in place (it writes a sibling temporary file and renames it),
/// so the only risk is an outside process editing an input while we read it;
/// like ripgrep and safetensors we accept that risk.
pub fn map_file(file: &File) -> io::Result<Mmap> {
    // SAFETY: see the contract above; the map is read-only and we never create
    // mutable aliases of it.
    let map = unsafe { Mmap::map(file) }?;
    // Checkpoint access hops between headers, directories and pickles spread
    // over many GB; the kernel's default read-around would pull megabytes of
    // tensor payload in with each of those small reads. Code that streams a
    // range can re-advise it.
    #[cfg(unix)]
    if !map.is_empty() {
        let _ = map.advise(memmap2::Advice::Random);
    }
    Ok(map)
}

/// Drops the resident pages of `[offset, offset+len)` of a read-only file
/// mapping from this process (they are re-read from the file if touched
/// again). Streaming writers call it after a source range has been written so
/// that resident memory stays bounded while a multi-GB input streams through.
/// Errors are ignored: this is only a hint.
pub fn release(map: &Mmap, offset: usize, len: usize) {
    // The kernel maps whole large folios (up to 2 MiB of page cache) on a
    // fault or populate, i.e. also pages just outside the range: widen the
    // release to 2 MiB boundaries so those are dropped too (dropping a
    // mapping of pages we still need only costs a re-fault).
    // Folios are aligned in file offsets, and the map starts at offset 0.
    const FOLIO: usize = 2 << 20;
    let start = offset & !(FOLIO - 1);
    let end = offset
        .saturating_add(len)
        .checked_add(FOLIO - 1)
        .map(|e| e & !(FOLIO - 1))
        .unwrap_or(usize::MAX)
        .min(map.len());
    let (offset, len) = (start, end.saturating_sub(start));
    #[cfg(unix)]
    if len > 0 {
        // SAFETY: `Mmap` is a read-only mapping of a file that we never write
        // through; MADV_DONTNEED on such pages discards nothing that cannot be
        // re-read from the file, and no Rust reference observes a change
        // (the content after re-faulting is the same file content).
        let _ =
            unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
    }
    #[cfg(not(unix))]
    let _ = (map, offset, len);
}

/// Asks the kernel to read `[offset, offset+len)` ahead sequentially: the range
/// is about to be streamed (the whole map was advised random at open).
pub fn prefetch(map: &Mmap, offset: usize, len: usize) {
    #[cfg(unix)]
    if len > 0 {
        let _ = map.advise_range(memmap2::Advice::Sequential, offset, len);
        // Map the (usually cached) pages in one call instead of one fault per
        // page; older kernels (< 5.14) refuse it and fall back to read-ahead.
        #[cfg(target_os = "linux")]
        if map
            .advise_range(memmap2::Advice::PopulateRead, offset, len)
            .is_ok()
        {
            return;
        }
        let _ = map.advise_range(memmap2::Advice::WillNeed, offset, len);
    }
    #[cfg(not(unix))]
    let _ = (map, offset, len);
}

/// Asks the kernel to start writing `[offset, offset+len)` of `file` to disk now, without
/// waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). A large output written this way as it
/// goes leaves its final fsync only the tail to wait for, instead of the whole file after the
/// last write. Errors are ignored: only a hint (the fsync still makes the data durable).
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: a plain syscall on a file descriptor we own for the duration of the call;
        // it takes no pointers and only starts I/O on the file's own dirty pages.
        let _ =
            unsafe { libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}
