//! The one place that memory-maps files. Everything else sees `&[u8]` through
//! [`crate::bytes::ByteView`].

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
