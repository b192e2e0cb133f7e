//! Crash safety: writers (`pack`, `reshard`) killed with SIGKILL at 20 pseudo-random points
//! never leave a partial archive at the destination path and never touch the
//! input. A leftover is allowed only as a recognisable temporary
//! (`.nemo-tool-tmp-*`, documented in docs/validate.md) beside it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use sha2::{Digest, Sha256};

fn sha(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

/// Runs `args` (writing `out`) to completion once, then 20 times killed at
/// points spread over the measured duration; checks the destination and the
/// input after each kill.
fn kill_at_random_points(input: &Path, out: &Path, args: &[&std::ffi::OsStr]) {
    let input_sha = sha(input);
    let dir = out.parent().unwrap();
    let t0 = Instant::now();
    let st = Command::new(env!("CARGO_BIN_EXE_nemo-tool"))
        .args(args)
        .status()
        .unwrap();
    let full = t0.elapsed();
    assert!(st.success());
    let reference = sha(out);
    std::fs::remove_file(out).unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut completed = 0;
    for i in 0..20 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Up to 120% of a full run, so some kills land after the rename too.
        let at = full.mul_f64((seed % 1200) as f64 / 1000.0);
        let mut child = Command::new(env!("CARGO_BIN_EXE_nemo-tool"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if out.exists() {
            assert_eq!(
                sha(out),
                reference,
                "kill {i} at {at:?}: a partial archive at the destination"
            );
            completed += status.success() as u32;
            std::fs::remove_file(out).unwrap();
        }
        assert_eq!(sha(input), input_sha, "kill {i}: the input changed");
        for e in std::fs::read_dir(dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let known = Path::new(&name) == input.file_name().unwrap();
            assert!(
                known || name.starts_with(".nemo-tool-tmp-"),
                "kill {i}: unexpected file {name} in the output folder"
            );
            if name.starts_with(".nemo-tool-tmp-") {
                let _ = std::fs::remove_file(dir.join(&name));
            }
        }
    }
    eprintln!("kill test: full run {full:?}, {completed} of 20 runs had finished");
}

/// A synthetic model big enough that a write takes a while.
fn input(dir: &Path) -> std::path::PathBuf {
    let mut spec = nemo_tool::synth::Spec::tiny();
    spec.layers = 4;
    spec.hidden = 256;
    spec.ffn = 512;
    spec.kv_channels = 32;
    let p = dir.join("in.nemo");
    nemo_tool::synth::write_nemo(&spec, 2, 1, nemo_tool::synth::Fill::Random(3), &p).unwrap();
    p
}

#[test]
fn pack_killed_at_20_points() {
    let d = tempfile::tempdir().unwrap();
    let inp = input(d.path());
    let out = d.path().join("out.nemo");
    kill_at_random_points(
        &inp,
        &out,
        &[
            "pack".as_ref(),
            inp.as_os_str(),
            out.as_os_str(),
            "--force".as_ref(),
        ],
    );
}

#[test]
fn reshard_killed_at_20_points() {
    let d = tempfile::tempdir().unwrap();
    let inp = input(d.path());
    let out = d.path().join("out.nemo");
    kill_at_random_points(
        &inp,
        &out,
        &[
            "reshard".as_ref(),
            inp.as_os_str(),
            out.as_os_str(),
            "--tp".as_ref(),
            "4".as_ref(),
            "--pp".as_ref(),
            "2".as_ref(),
            "--force".as_ref(),
        ],
    );
}
