//! Measures what `inspect` reads: evicts the archive from the page cache,
//! runs the same code `nemo-tool inspect` runs, then asks the kernel which
//! pages of the archive are now resident (mincore), and splits them into
//! tensor payload (zip `data/*` records) and everything else (tar headers,
//! configs, pickles, zip directories). Prints one JSON line.
//!
//! ```text
//! cargo run --release --example inspect_io -- big.nemo
//! ```

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::Instant;

use nemo_tool::formats::torch::zip::ZipArchive;
use nemo_tool::model::checkpoint::Checkpoint;

fn resident_pages(file: &File, len: usize) -> anyhow::Result<Vec<u8>> {
    let page = 4096usize;
    let mut vec = vec![0u8; len.div_ceil(page)];
    if len == 0 {
        return Ok(vec);
    }
    // SAFETY: a fresh read-only shared mapping of the whole file, unmapped
    // before returning; mincore only writes into `vec`, sized one byte per page.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        anyhow::ensure!(p != libc::MAP_FAILED, "mmap failed");
        let rc = libc::mincore(p, len, vec.as_mut_ptr());
        libc::munmap(p, len);
        anyhow::ensure!(rc == 0, "mincore failed");
    }
    Ok(vec)
}

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: inspect_io PATH"))?;
    let file = File::open(&path)?;
    let len = file.metadata()?.len() as usize;
    // SAFETY: plain syscall on an open descriptor.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    anyhow::ensure!(rc == 0, "posix_fadvise failed");
    let before: usize = resident_pages(&file, len)?
        .iter()
        .filter(|b| **b & 1 == 1)
        .count();

    let t = Instant::now();
    let ckpt = Checkpoint::open_metadata(&path)?;
    let report = nemo_tool::ops::inspect::report(&ckpt)?;
    let secs = t.elapsed().as_secs_f64();
    let resident = resident_pages(&file, len)?;

    // Payload byte ranges: every zip `data/*` record of every rank file.
    let mut payload: Vec<(u64, u64)> = Vec::new();
    for r in ckpt.rank_files() {
        let m = ckpt
            .archive()
            .get(&r.member)
            .ok_or_else(|| anyhow::anyhow!("no {}", r.member))?;
        let base = m.data_offset.ok_or_else(|| anyhow::anyhow!("not a tar"))?;
        let zip = ZipArchive::open(ckpt.read_member(&r.member)?)?;
        for e in zip.entries() {
            if e.name
                .split_once('/')
                .is_some_and(|(_, n)| n.starts_with("data/"))
            {
                // Measured after the report, so reading local headers here does not count.
                let d = zip.data_offset(e)?;
                payload.push((base + d, base + d + e.size));
            }
        }
    }
    let page = 4096u64;
    let (mut total, mut in_payload) = (0u64, 0u64);
    for (i, b) in resident.iter().enumerate() {
        if b & 1 == 0 {
            continue;
        }
        let (s, e) = (i as u64 * page, (i as u64 + 1) * page);
        total += page;
        in_payload += payload
            .iter()
            .map(|(ps, pe)| e.min(*pe).saturating_sub(s.max(*ps)))
            .sum::<u64>();
    }
    println!(
        "{{\"seconds\": {secs:.4}, \"apparent_bytes\": {len}, \"tensors\": {}, \"resident_before_pages\": {before}, \
\"bytes_read\": {total}, \"payload_bytes_read\": {in_payload}, \"payload_bytes_total\": {}}}",
        report.tensors.len(),
        payload.iter().map(|(s, e)| e - s).sum::<u64>()
    );
    Ok(())
}
