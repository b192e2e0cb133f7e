//! Bytes in and out: memory maps and zero-copy views (`bytes`, `mmap`),
//! atomic outputs (`output`, `outdir`) and the streaming writer underneath
//! every command that writes (`sink`, `stream`). Nothing here knows a format.

pub mod bytes;
pub mod mmap;
pub mod outdir;
pub mod output;
pub mod piece;
pub mod sink;
pub mod stream;
