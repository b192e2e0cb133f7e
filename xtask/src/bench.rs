//! `cargo xtask bench <name>`: benchmarks that time nemo-tool against its baseline in the same
//! run (see docs/ and style.md "Benchmarks"). Each bench is one entry of [`BENCHES`].

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Result};

/// A bench: its name, a one-line description, and its entry point (gets the remaining args).
type Bench = (&'static str, &'static str, fn(&[String]) -> Result<()>);

/// Registered benches.
const BENCHES: &[Bench] = &[
    (
        "inspect",
        "inspect a sparse Llama-70B-shaped TP8 .nemo (>100 GiB): time and bytes read",
        inspect,
    ),
    (
        "reshard",
        "reshard a 2.2 GB bf16 Llama-shaped TP2 .nemo to TP4: time vs cp and a PyTorch baseline, peak RSS",
        crate::bench_reshard::reshard,
    ),
];

/// Builds the release binary and the bench examples.
pub(crate) fn build_release() -> Result<PathBuf> {
    crate::util::run(crate::util::cargo().args([
        "build",
        "--release",
        "--bin",
        "nemo-tool",
        "--example",
        "synth",
        "--example",
        "inspect_io",
    ]))?;
    Ok(crate::util::target_dir().join("release"))
}

/// The number after `"key": ` in a one-line JSON object.
fn json_number(json: &str, key: &str) -> Option<f64> {
    let k = format!("\"{key}\": ");
    let rest = &json[json.find(&k)? + k.len()..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

/// `cargo xtask bench inspect [--regen]`: generates (once) a Llama-70B-shaped
/// TP8 checkpoint as a sparse file, then measures `nemo-tool inspect` on it:
/// wall time of the CLI (median of 5 warm runs) and, with the archive evicted
/// from the page cache first, the bytes the kernel had to read for it, split
/// into tensor payload and metadata (mincore after the run).
fn inspect(args: &[String]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    use std::time::Instant;
    let release = build_release()?;
    let dir = crate::util::target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("llama70b_tp8.nemo");
    if !path.exists() || args.iter().any(|a| a == "--regen") {
        crate::util::step("generating a sparse Llama-70B-shaped TP8 .nemo (once; about a minute)");
        crate::util::run(Command::new(release.join("examples/synth")).args([
            "--shape".as_ref(),
            "llama-70b".as_ref(),
            "--tp".as_ref(),
            "8".as_ref(),
            "--fill".as_ref(),
            "sparse".as_ref(),
            "--out".as_ref(),
            path.as_os_str(),
        ]))?;
    }
    let md = std::fs::metadata(&path)?;
    let apparent = md.len();
    let on_disk = md.blocks() * 512;
    let tool = release.join("nemo-tool");
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let out = Command::new(&tool)
            .arg("inspect")
            .arg(&path)
            .arg("--json")
            .output()?;
        times.push(t.elapsed().as_secs_f64());
        if !out.status.success() {
            bail!("inspect failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let io = Command::new(release.join("examples/inspect_io"))
        .arg(&path)
        .output()?;
    if !io.status.success() {
        bail!("inspect_io failed: {}", String::from_utf8_lossy(&io.stderr));
    }
    let line = String::from_utf8_lossy(&io.stdout).trim().to_string();
    let num = |k: &str| json_number(&line, k).unwrap_or(f64::NAN);
    let (cold, read, payload, tensors) = (
        num("seconds"),
        num("bytes_read"),
        num("payload_bytes_read"),
        num("tensors"),
    );
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let mib = |b: f64| b / (1u64 << 20) as f64;
    crate::util::step("bench inspect");
    println!(
        "archive            {} ({:.1} GiB apparent, {:.1} MiB on disk, {tensors} tensors, TP8)",
        path.display(),
        gib(apparent as f64),
        mib(on_disk as f64)
    );
    println!(
        "inspect, warm      median {median:.3} s over 5 runs (min {:.3} s)   target < 1 s: {}",
        times[0],
        verdict(median < 1.0)
    );
    println!(
        "inspect, cold      {cold:.3} s in-process after evicting the archive from the page cache"
    );
    println!("bytes read, cold   {:.2} MiB in all; tensor payload {:.1} KiB of {:.1} GiB ({:.2e} of it)   target < 1 MiB: {}",
        mib(read), payload / 1024.0, gib(num("payload_bytes_total")), payload / num("payload_bytes_total"), verdict(payload < (1u64 << 20) as f64));
    println!("raw: {line}");
    if median >= 1.0 || payload >= (1u64 << 20) as f64 {
        bail!("bench inspect: a target was missed");
    }
    Ok(())
}

pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

/// Entry point for `cargo xtask bench`.
pub fn run(args: &[String]) -> Result<()> {
    let Some(name) = args.first() else {
        list();
        bail!("bench: no bench name given");
    };
    if name == "list" {
        list();
        return Ok(());
    }
    match BENCHES.iter().find(|(n, _, _)| n == name) {
        Some((_, _, f)) => f(args.get(1..).unwrap_or_default()),
        None => {
            list();
            bail!("unknown bench {name:?}")
        }
    }
}

fn list() {
    if BENCHES.is_empty() {
        println!("no benches yet");
    }
    for (name, about, _) in BENCHES {
        println!("  {name:<20} {about}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unknown_bench_fails() {
        let err = super::run(&["nope".to_string()]).unwrap_err();
        assert!(err.to_string().contains("unknown bench"), "{err}");
        assert!(super::run(&["list".to_string()]).is_ok());
    }
}
