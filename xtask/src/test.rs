//! `cargo xtask test`: Rust tests, then the Python interop tests against the built binary.
//!
//! The Python side runs in `<root>/.venv`, built from `tests/interop/requirements.txt`. A stamp
//! file holding that file's sha256 says whether the venv matches the pins; any change rebuilds it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::sha256;
use crate::util::{self, root, step};

const REQUIREMENTS: &str = "tests/interop/requirements.txt";
const INTEROP_DIR: &str = "tests/interop";
const STAMP: &str = ".requirements.sha256";
/// pytest's exit code for "no tests were collected".
const PYTEST_NO_TESTS: i32 = 5;

#[derive(Debug, Default, PartialEq)]
struct Options {
    no_python: bool,
    python_only: bool,
    no_distill: bool,
    pytest_args: Vec<String>,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--no-python" => o.no_python = true,
            "--python-only" => o.python_only = true,
            "--no-distill" => o.no_distill = true,
            "--" => o.pytest_args.extend(it.by_ref().cloned()),
            other => bail!("test: unknown option {other:?} (see `cargo xtask --help`)"),
        }
    }
    if o.no_python && o.python_only {
        bail!("test: --no-python and --python-only exclude each other");
    }
    if o.no_python && !o.pytest_args.is_empty() {
        bail!("test: pytest arguments given with --no-python");
    }
    Ok(o)
}

/// Entry point for `cargo xtask test`.
pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let root = root();
    let venv = if o.no_python {
        root.join(".venv")
    } else {
        pinned_venv()?
    };

    step("cargo build --workspace --bins");
    util::run(util::cargo().args(["build", "--workspace", "--bins"]))?;

    // Files the Rust tests write for the Python checks; strict mode turns the
    // tests' "nothing to check" skips into failures, so a broken hand-off
    // cannot pass silently.
    let interop = util::target_dir().join("interop");
    let env = [
        ("NEMO_TOOL_INTEROP_OUT", interop.join("torch_files")),
        ("NEMO_TOOL_DCP_ROUNDTRIP", interop.join("dcp_roundtrip")),
        ("NEMO_TOOL_DISTILL_OUT", interop.join("distill_loss")),
    ];
    if !o.python_only {
        step("cargo test --workspace");
        let mut cmd = util::cargo();
        cmd.args(["test", "--workspace"])
            .envs(env.iter().map(|(k, v)| (*k, v)));
        if !o.no_python {
            cmd.env("NEMO_TOOL_STRICT", "1")
                .env("NEMO_TOOL_PYTHON", venv_python(&venv));
        }
        util::run(&mut cmd)?;
        if !o.no_distill {
            distill_tests(&venv, &env, !o.no_python)?;
        }
    }

    if !o.no_python {
        step("python interop tests");
        run_pytest(&root, &venv, &o.pytest_args, &env, o.no_distill)?;
    }
    println!("\nxtask test: all passed");
    Ok(())
}

pub fn venv_python(venv: &Path) -> PathBuf {
    if cfg!(windows) {
        venv.join("Scripts").join("python.exe")
    } else {
        venv.join("bin").join("python")
    }
}

/// The repository's `.venv`, created or refreshed first unless it matches the pins: the one
/// set-up step of both `cargo xtask test` and `cargo xtask demo`.
pub fn pinned_venv() -> Result<PathBuf> {
    let root = root();
    let venv = root.join(".venv");
    step("python venv");
    ensure_venv(&root, &venv)?;
    Ok(venv)
}

/// Builds the `nemo-tool` binary with `--features distill` against the venv's libtorch (or
/// `$LIBTORCH`) and returns its path. The build script sets an rpath to libtorch, so the
/// binary runs directly, without cargo.
pub fn build_distill_tool(venv: &Path, release: bool) -> Result<PathBuf> {
    let libtorch = libtorch_dir(venv)?.with_context(|| {
        format!(
            "no {} with torch and no LIBTORCH (`cargo xtask test` or `cargo xtask demo` creates the venv)",
            venv_python(venv).display()
        )
    })?;
    let mut build = util::cargo();
    build.args(["build", "--features", "distill", "--bin", "nemo-tool"]);
    if release {
        build.arg("--release");
    }
    with_libtorch(&mut build, &libtorch);
    util::run(&mut build)?;
    Ok(util::target_dir()
        .join(if release { "release" } else { "debug" })
        .join(format!("nemo-tool{}", std::env::consts::EXE_SUFFIX)))
}

/// Creates or refreshes `.venv` unless its stamp matches the requirements file.
fn ensure_venv(root: &Path, venv: &Path) -> Result<()> {
    let req = root.join(REQUIREMENTS);
    let bytes = fs::read(&req).with_context(|| format!("reading {}", req.display()))?;
    let want = sha256::hex_digest(&bytes);
    let python = venv_python(venv);
    let stamp = venv.join(STAMP);
    let have = fs::read_to_string(&stamp).ok();
    if python.exists() && have.as_deref().map(str::trim) == Some(want.as_str()) {
        println!(
            "{} is up to date with {REQUIREMENTS} (sha256 {})",
            venv.display(),
            &want[..12]
        );
        return Ok(());
    }
    if !python.exists() {
        println!(
            "creating {} (first run: downloads torch etc., several GB)",
            venv.display()
        );
        let sys_python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
        util::run(
            Command::new(&sys_python)
                .args(["-m", "venv", "--clear"])
                .arg(venv)
                .current_dir(root),
        )
        .with_context(|| format!("creating the venv with {sys_python} (is python3 with its venv module installed? on Debian/Ubuntu: python3-venv)"))?;
    } else if have.is_none() {
        println!(
            "{} has no stamp: installing the pinned requirements",
            venv.display()
        );
    } else {
        println!(
            "{REQUIREMENTS} changed since {} was built: updating it",
            venv.display()
        );
    }
    check_free_disk(venv)?;
    // Drop the stamp first, so an interrupted install is redone next time.
    let _ = fs::remove_file(&stamp);
    // --no-cache-dir: pip's wheel cache would hold a second copy of the CUDA wheels (~3 GB)
    // that a one-time install never reads again.
    util::run(
        Command::new(&python)
            .args(["-m", "pip", "install", "--no-cache-dir", "-r"])
            .arg(&req)
            .current_dir(root),
    )
    .with_context(|| {
        format!(
            "installing the interop requirements (needs network access to PyPI and about \
             {VENV_NEED_GIB} GiB free under {})",
            venv.display()
        )
    })?;
    fs::write(&stamp, format!("{want}\n"))
        .with_context(|| format!("writing {}", stamp.display()))?;
    println!("wrote {}", stamp.display());
    Ok(())
}

/// What installing the pinned venv needs on disk at its peak: 5.2 GiB installed (torch's cu130
/// wheel pulls the CUDA libraries) while pip still holds the ~3 GiB of downloaded wheels.
const VENV_NEED_GIB: u64 = 9;

/// Refuses to start a multi-GB install that would end in "No space left on device" halfway,
/// leaving a broken venv. `df` is POSIX; where it is missing or unreadable the install just runs.
fn check_free_disk(venv: &Path) -> Result<()> {
    let dir = venv.parent().unwrap_or(venv);
    let Ok(out) = Command::new("df").arg("-Pk").arg(dir).output() else {
        return Ok(());
    };
    let text = String::from_utf8_lossy(&out.stdout);
    // POSIX format: a header line, then `fs blocks used available capacity mount`.
    let avail_kib = text
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok());
    let Some(avail_kib) = avail_kib else {
        return Ok(());
    };
    let avail_gib = avail_kib as f64 / (1024.0 * 1024.0);
    println!("free disk under {}: {avail_gib:.1} GiB", dir.display());
    if avail_kib < VENV_NEED_GIB * 1024 * 1024 {
        bail!(
            "only {avail_gib:.1} GiB free under {}: the pinned venv (torch 2.11.0 with its CUDA \
             libraries) needs about {VENV_NEED_GIB} GiB; free some space and run again",
            dir.display()
        );
    }
    Ok(())
}

/// The libtorch-backed engine (`--features distill`): its unit tests, `tests/distill.rs`,
/// `tests/eval.rs` and the `nemo-tool distill` acceptance tests (`tests/distill_train.rs`),
/// built against the torch of the venv (the PyPI torch==2.11.0 wheel that tch 0.24 expects).
/// Without a venv (`--no-python` on a fresh checkout) it runs only if LIBTORCH is set.
fn distill_tests(venv: &Path, env: &[(&str, PathBuf)], strict: bool) -> Result<()> {
    step("cargo test --features distill (libtorch from the venv)");
    let python = venv_python(venv);
    let Some(libtorch) = libtorch_dir(venv)? else {
        println!(
            "skipped: no {} and no LIBTORCH (run without --no-python)",
            python.display()
        );
        return Ok(());
    };
    println!("LIBTORCH={}", libtorch.display());
    let mut cmd = util::cargo();
    // --lib: the engine's unit tests (the other lib tests are fast); the default-feature
    // integration tests already ran above.
    cmd.args([
        "test",
        "-p",
        "nemo-tool",
        "--features",
        "distill",
        "--lib",
        "--test",
        "distill",
        "--test",
        "distill_train",
        "--test",
        "eval",
    ])
    .envs(env.iter().map(|(k, v)| (*k, v)));
    with_libtorch(&mut cmd, &libtorch);
    if python.exists() {
        cmd.env("NEMO_TOOL_PYTHON", &python);
    }
    if strict {
        cmd.env("NEMO_TOOL_STRICT", "1");
    }
    util::run(&mut cmd)
}

/// The libtorch that `--features distill` builds against: the venv's torch (the PyPI
/// torch==2.11.0 wheel tch 0.24 expects), else `$LIBTORCH`; `None` when neither exists.
pub fn libtorch_dir(venv: &Path) -> Result<Option<PathBuf>> {
    let python = venv_python(venv);
    if python.exists() {
        let out = Command::new(&python)
            .args([
                "-c",
                "import torch,os;print(os.path.dirname(torch.__file__))",
            ])
            .output()
            .with_context(|| format!("running {}", python.display()))?;
        if !out.status.success() {
            bail!(
                "{} cannot import torch: {}",
                python.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        return Ok(Some(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim(),
        )));
    }
    Ok(std::env::var_os("LIBTORCH").map(PathBuf::from))
}

/// Points a cargo command at `libtorch` (cxx11 ABI, as the PyPI wheels are).
pub fn with_libtorch(cmd: &mut Command, libtorch: &Path) {
    cmd.env("LIBTORCH", libtorch)
        .env("LIBTORCH_CXX11_ABI", "1")
        .env_remove("LIBTORCH_USE_PYTORCH");
}

fn run_pytest(
    root: &Path,
    venv: &Path,
    extra: &[String],
    env: &[(&str, PathBuf)],
    no_distill: bool,
) -> Result<()> {
    let bin = util::debug_bin("nemo-tool");
    if !bin.exists() {
        bail!("{} was not built", bin.display());
    }
    let mut cmd = Command::new(venv_python(venv));
    cmd.args(["-m", "pytest", INTEROP_DIR, "-q", "-ra"])
        .args(extra)
        .env("NEMO_TOOL_BIN", &bin)
        .env("NEMO_TOOL_ROOT", root)
        .env("NEMO_TOOL_STRICT", "1")
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .current_dir(root);
    if no_distill {
        // the distill hand-off was not written on purpose: its interop test skips
        cmd.env("NEMO_TOOL_NO_DISTILL", "1");
    }
    println!("NEMO_TOOL_BIN={}", bin.display());
    println!("NEMO_TOOL_ROOT={}", root.display());
    match util::status(&mut cmd)? {
        0 => Ok(()),
        PYTEST_NO_TESTS if extra.is_empty() && count_test_files(&root.join(INTEROP_DIR))? == 0 => {
            println!("no interop test files in {INTEROP_DIR}: nothing to run");
            Ok(())
        }
        PYTEST_NO_TESTS => bail!(
            "pytest collected no tests, but {INTEROP_DIR} has test files (or a filter matched none)"
        ),
        code => bail!("interop tests failed (pytest exit code {code})"),
    }
}

/// Files pytest would collect by its default patterns (`test_*.py`, `*_test.py`), recursively.
fn count_test_files(dir: &Path) -> Result<usize> {
    let mut n = 0;
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            n += count_test_files(&path)?;
        } else {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".py") && (name.starts_with("test_") || name.ends_with("_test.py")) {
                n += 1;
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_options() {
        assert_eq!(parse(&[]).unwrap(), Options::default());
        let o = parse(&s(&["--python-only", "--", "-k", "env"])).unwrap();
        assert!(o.python_only && !o.no_python);
        assert_eq!(o.pytest_args, s(&["-k", "env"]));
        assert!(parse(&s(&["--no-python", "--python-only"])).is_err());
        assert!(parse(&s(&["--bogus"])).is_err());
        assert!(parse(&s(&["--no-distill"])).unwrap().no_distill);
        assert!(parse(&s(&["--no-python", "--", "-x"])).is_err());
    }

    #[test]
    fn counts_test_files() {
        let dir = std::env::temp_dir().join(format!("xtask-count-{}", std::process::id()));
        let sub = dir.join("sub");
        fs::create_dir_all(&sub).unwrap();
        for f in ["conftest.py", "requirements.txt", "helpers.py"] {
            fs::write(dir.join(f), "").unwrap();
        }
        assert_eq!(count_test_files(&dir).unwrap(), 0);
        fs::write(dir.join("test_a.py"), "").unwrap();
        fs::write(sub.join("b_test.py"), "").unwrap();
        assert_eq!(count_test_files(&dir).unwrap(), 2);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(count_test_files(&dir).unwrap(), 0);
    }
}
