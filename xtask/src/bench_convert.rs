//! `cargo xtask bench convert`: HF -> .nemo of a generated TinyLlama-shaped
//! bf16 model (2.2 GB, three safetensors shards) against `cp` of the same
//! bytes in the same run, with the peak RSS of the converter. Ours fsyncs
//! its output, so it is judged against `cp && sync`; `--no-sync` (atomic,
//! data left in the page cache) is judged against plain `cp`.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Result};

/// Runs `cmd` under `/usr/bin/time -f %M` when present: (seconds, peak RSS KiB).
fn timed(cmd: &mut Command) -> Result<(f64, Option<u64>)> {
    timed_output(cmd).map(|(s, rss, _)| (s, rss))
}

/// [`timed`], also returning the command's stdout.
pub(crate) fn timed_output(cmd: &mut Command) -> Result<(f64, Option<u64>, String)> {
    let time = Path::new("/usr/bin/time");
    let mut c = if time.exists() {
        let mut c = Command::new(time);
        c.args(["-f", "%M"])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        c
    } else {
        let mut c = Command::new(cmd.get_program());
        c.args(cmd.get_args());
        c
    };
    let t = Instant::now();
    let out = c.output()?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rss = time
        .exists()
        .then(|| {
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .and_then(|l| l.trim().parse().ok())
        })
        .flatten();
    Ok((secs, rss, String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        n += e?.metadata()?.len();
    }
    Ok(n)
}

/// `cargo xtask bench convert [--regen]`.
pub fn convert(args: &[String]) -> Result<()> {
    crate::util::run(crate::util::cargo().args([
        "build",
        "--release",
        "--bin",
        "nemo-tool",
        "--example",
        "gen_hf",
    ]))?;
    let release = crate::util::target_dir().join("release");
    let dir = crate::util::target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let hf = dir.join("hf_tinyllama_bf16");
    if !hf.join("config.json").exists() || args.iter().any(|a| a == "--regen") {
        crate::util::step("generating a random bf16 TinyLlama-shaped HF model (once)");
        let _ = std::fs::remove_dir_all(&hf);
        crate::util::run(
            Command::new(release.join("examples/gen_hf"))
                .arg("--out")
                .arg(&hf),
        )?;
    }
    let bytes = dir_bytes(&hf)?;
    let tool = release.join("nemo-tool");
    let (cp_out, nemo_out) = (dir.join("hf_copy"), dir.join("convert_out.nemo"));
    // Warm the page cache, then alternate runs with a global `sync` before each
    // (so one run's writeback does not land on the next); report medians. The
    // converter fsyncs its output (atomic, durable commit), so the fair baseline
    // is `cp` followed by `sync` of the copied files; plain `cp` is shown too.
    let sync = || Command::new("sync").status();
    let _ = std::fs::remove_dir_all(&cp_out);
    timed(Command::new("cp").arg("-r").arg(&hf).arg(&cp_out))?;
    let cp_sync = format!(
        "cp -r '{}' '{}' && sync '{}'/*",
        hf.display(),
        cp_out.display(),
        cp_out.display()
    );
    let (mut cps, mut cpss, mut convs, mut rss) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut nosync = Vec::new();
    for _ in 0..3 {
        let _ = std::fs::remove_dir_all(&cp_out);
        let _ = std::fs::remove_file(&nemo_out);
        sync()?;
        let (t, _) = timed(Command::new("cp").arg("-r").arg(&hf).arg(&cp_out))?;
        cps.push(t);
        let _ = std::fs::remove_dir_all(&cp_out);
        sync()?;
        let (t, _) = timed(Command::new("sh").arg("-c").arg(&cp_sync))?;
        cpss.push(t);
        let _ = std::fs::remove_dir_all(&cp_out);
        sync()?;
        let (t, r) = timed(
            Command::new(&tool)
                .args(["convert", "--from", "hf"])
                .arg(&hf)
                .arg(&nemo_out)
                .arg("--force"),
        )?;
        convs.push(t);
        rss.extend(r);
        let _ = std::fs::remove_file(&nemo_out);
        sync()?;
        let (t, r) = timed(
            Command::new(&tool)
                .args(["convert", "--from", "hf", "--no-sync"])
                .arg(&hf)
                .arg(&nemo_out)
                .arg("--force"),
        )?;
        nosync.push(t);
        rss.extend(r);
    }
    let out_bytes = std::fs::metadata(&nemo_out)?.len();
    let _ = std::fs::remove_file(&nemo_out);
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let (cp_min, cps_min, conv_min) = (min(&cps), min(&cpss), min(&convs));
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (cp, cps_med, conv) = (med(&mut cps), med(&mut cpss), med(&mut convs));
    let ratio = conv / cps_med;
    let nosync_med = med(&mut nosync);
    let ratio_nosync = nosync_med / cp;
    let peak_mib = rss.iter().max().map(|k| *k as f64 / 1024.0);
    crate::util::step("bench convert");
    let gb = |b: u64| b as f64 / 1e9;
    println!(
        "input              {} ({:.2} GB bf16 safetensors, 3 shards)",
        hf.display(),
        gb(bytes)
    );
    println!(
        "cp -r              median {cp:.2} s over 3 runs ({:.2} GB/s; not durable)",
        gb(bytes) / cp
    );
    println!(
        "cp -r && sync      median {cps_med:.2} s over 3 runs ({:.2} GB/s)",
        gb(bytes) / cps_med
    );
    println!(
        "convert --from hf  median {conv:.2} s over 3 runs ({:.2} GB/s, fsynced), output {:.2} GB   {ratio:.2}x cp+sync ({:.2}x plain cp)   target <= 1.3x: {}",
        gb(bytes) / conv,
        gb(out_bytes),
        conv / cp,
        crate::bench::verdict(ratio <= 1.3)
    );
    println!(
        "  with --no-sync   median {nosync_med:.2} s over 3 runs (atomic, not fsynced, like cp)   {ratio_nosync:.2}x plain cp   target <= 1.3x: {}",
        crate::bench::verdict(ratio_nosync <= 1.3)
    );
    println!(
        "fastest runs       cp {cp_min:.2} s, cp+sync {cps_min:.2} s, convert {conv_min:.2} s ({:.2}x cp+sync; the machine is shared, so medians and minima both shown)",
        conv_min / cps_min
    );
    match peak_mib {
        Some(m) => println!(
            "peak RSS           {m:.0} MiB (max of 3 runs, /usr/bin/time %M)   target <= 300 MiB: {}",
            crate::bench::verdict(m <= 300.0)
        ),
        None => println!("peak RSS           not measured (/usr/bin/time missing)"),
    }
    println!(
        "runs: cp {cps:?}  cp+sync {cpss:?}  convert {convs:?}  --no-sync {nosync:?}  rss_kib {rss:?}"
    );
    if ratio > 1.3 || ratio_nosync > 1.3 || peak_mib.is_some_and(|m| m > 300.0) {
        bail!("bench convert: a target was missed");
    }
    Ok(())
}
