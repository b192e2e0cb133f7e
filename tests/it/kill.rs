//! Crash safety: writers (`pack`, `reshard`) killed with SIGKILL at 20 pseudo-random points
//! never leave a partial archive at the destination path and never touch the
//! input. A leftover is allowed only as a recognisable temporary
//! (`.nemo-tool-tmp-*`, documented in docs/validate.md) beside it, and the next
//! run writing into that folder removes it, but never a live writer's.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const TEMP_PREFIX: &str = ".nemo-tool-tmp-";

/// The temporaries in `dir`.
fn temps(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with(TEMP_PREFIX))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

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
                known || name.starts_with(TEMP_PREFIX),
                "kill {i}: unexpected file {name} in the output folder"
            );
        }
    }
    // The temporaries the kills left are removed by the next run.
    let st = Command::new(env!("CARGO_BIN_EXE_nemo-tool"))
        .args(args)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(temps(dir), Vec::<PathBuf>::new(), "left after a full run");
    eprintln!("kill test: full run {full:?}, {completed} of 20 runs had finished");
}

/// A synthetic model big enough that a write takes a while.
fn input(dir: &Path) -> std::path::PathBuf {
    let mut spec = nemo_tool::testkit::synth::Spec::tiny();
    spec.layers = 4;
    spec.hidden = 256;
    spec.ffn = 512;
    spec.kv_channels = 32;
    let p = dir.join("in.nemo");
    nemo_tool::testkit::synth::write_nemo(
        &spec,
        2,
        1,
        nemo_tool::testkit::synth::Fill::Random(3),
        &p,
    )
    .unwrap();
    p
}

/// `nemo-tool COMMAND in.nemo out.nemo EXTRA... --force`, killed at 20 points.
fn killed_at_20_points(command: &str, extra: &[&str]) {
    let d = tempfile::tempdir().unwrap();
    let inp = input(d.path());
    let out = d.path().join("out.nemo");
    let mut args: Vec<&std::ffi::OsStr> = vec![command.as_ref(), inp.as_os_str(), out.as_os_str()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    args.push("--force".as_ref());
    kill_at_random_points(&inp, &out, &args);
}

#[test]
fn pack_killed_at_20_points() {
    killed_at_20_points("pack", &[]);
}

#[test]
fn reshard_killed_at_20_points() {
    killed_at_20_points("reshard", &["--tp", "4", "--pp", "2"]);
}

/// A live writer for [`a_killed_writers_temporary_is_removed_by_the_next_run`], run as a
/// separate process (this test binary again): with `NEMO_TOOL_HOLD_OUTPUT=PATH` it starts
/// writing PATH through the library, prints its temporary's path and holds it until its stdin
/// closes. Without that variable it does nothing.
#[test]
fn hold_an_output_helper() {
    let Some(target) = std::env::var_os("NEMO_TOOL_HOLD_OUTPUT") else {
        return;
    };
    let out = nemo_tool::io::output::OutputFile::create(&target, false).unwrap();
    println!("holding {}", out.temp_path().display());
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
}

#[test]
fn a_killed_writers_temporary_is_removed_by_the_next_run() {
    let d = tempfile::tempdir().unwrap();
    let inp = input(d.path());
    let dir = d.path().join("out");
    std::fs::create_dir(&dir).unwrap();
    let out = dir.join("out.nemo");
    let reshard = |tp: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nemo-tool"));
        c.args(["reshard".as_ref(), inp.as_os_str(), out.as_os_str()])
            .args(["--tp", tp, "--force"]);
        c
    };

    // A live writer in another process, holding its temporary's lock (started first: starting
    // an output removes stale temporaries, so it would clean up the killed one itself).
    let mut live_writer = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "kill::hold_an_output_helper", "--nocapture"])
        .env("NEMO_TOOL_HOLD_OUTPUT", dir.join("live.nemo"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = BufReader::new(live_writer.stdout.take().unwrap()).lines();
    let live = said
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("holding ").map(PathBuf::from))
        .expect("the live writer names its temporary");
    assert!(live.exists());

    // A writer killed with SIGKILL while its temporary exists leaves it.
    let mut stale = None;
    for _ in 0..20 {
        let mut child = reshard("4")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        while stale.is_none() && child.try_wait().unwrap().is_none() {
            stale = temps(&dir).into_iter().find(|t| *t != live);
        }
        let _ = child.kill();
        child.wait().unwrap();
        if stale.is_some() {
            break;
        }
        let _ = std::fs::remove_file(&out); // it finished first: again
    }
    let stale = stale.expect("never saw the writer's temporary in 20 runs");
    assert!(
        stale.exists(),
        "{} vanished with its writer",
        stale.display()
    );

    // The next run into the folder removes the dead writer's temporary, and says so.
    let o = reshard("2").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!("removed {}", stale.display())),
        "no note naming the removed temporary in: {err}"
    );
    assert!(!stale.exists(), "the stale temporary is still there");
    assert!(live.exists(), "the live writer's temporary was removed");
    assert_eq!(temps(&dir), std::slice::from_ref(&live));

    // The live writer ends normally and removes its own.
    drop(live_writer.stdin.take());
    said.for_each(drop); // its test harness still reports to this pipe
    assert!(live_writer.wait().unwrap().success());
    assert_eq!(temps(&dir), Vec::<PathBuf>::new());
    assert!(out.exists());
}
