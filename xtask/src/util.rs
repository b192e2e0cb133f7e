//! Shared helpers: repository paths and running child processes with a visible command line.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The repository root (the parent of `xtask/`).
pub fn root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The cargo that runs us (`$CARGO` under `cargo run`), else `cargo` from `PATH`.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root());
    cmd
}

/// Prints a step header.
pub fn step(title: &str) {
    println!("\n==> {title}");
}

/// Renders a command line for the log.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&quote(a));
    }
    s
}

fn quote(a: &OsStr) -> String {
    let a = a.to_string_lossy();
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@".contains(c))
    {
        a.into_owned()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

/// Runs `cmd` with inherited stdio and fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let code = status(cmd)?;
    if code != 0 {
        bail!("`{}` failed with exit code {code}", show(cmd));
    }
    Ok(())
}

/// Runs `cmd` with inherited stdio and returns its exit code (-1 if killed by a signal).
pub fn status(cmd: &mut Command) -> Result<i32> {
    println!("$ {}", show(cmd));
    status_quiet(cmd)
}

/// Like [`status`] without echoing the command line (the caller shows its own).
pub fn status_quiet(cmd: &mut Command) -> Result<i32> {
    let st = cmd
        .status()
        .with_context(|| format!("starting `{}`", show(cmd)))?;
    Ok(st.code().unwrap_or(-1))
}

/// Cargo's target directory: asks `cargo metadata` (which honours `CARGO_TARGET_DIR` and
/// `build.target-dir`), falling back to `$CARGO_TARGET_DIR` or `<root>/target`.
pub fn target_dir() -> PathBuf {
    let from_metadata = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| json_string_field(&String::from_utf8_lossy(&o.stdout), "target_directory"));
    if let Some(dir) = from_metadata {
        return PathBuf::from(dir);
    }
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => root().join(d),
        None => root().join("target"),
    }
}

/// The value of the first `"field":"..."` string in a JSON text (enough for cargo metadata).
fn json_string_field(json: &str, field: &str) -> Option<String> {
    let key = format!("\"{field}\":\"");
    let start = json.find(&key)? + key.len();
    let mut out = String::new();
    let mut chars = json.get(start..)?.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// Path of a binary built by cargo in the debug profile.
pub fn debug_bin(name: &str) -> PathBuf {
    target_dir()
        .join("debug")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_json_string_field() {
        let j = r#"{"packages":[],"target_directory":"/a/b\\c \"d\"","version":1}"#;
        assert_eq!(
            json_string_field(j, "target_directory").as_deref(),
            Some("/a/b\\c \"d\"")
        );
        assert_eq!(json_string_field(j, "nope"), None);
    }

    #[test]
    fn quotes_only_when_needed() {
        assert_eq!(quote(OsStr::new("fixtures/a.nemo")), "fixtures/a.nemo");
        assert_eq!(quote(OsStr::new("a b")), "'a b'");
        assert_eq!(quote(OsStr::new("it's")), "'it'\\''s'");
    }
}
