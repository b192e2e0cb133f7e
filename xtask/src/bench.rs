//! `cargo xtask bench <name>`: benchmarks that time nemo-tool against its baseline in the same
//! run (see docs/ and style.md "Benchmarks"). Each bench is one entry of [`BENCHES`].

use anyhow::{bail, Result};

/// A bench: its name, a one-line description, and its entry point (gets the remaining args).
type Bench = (&'static str, &'static str, fn(&[String]) -> Result<()>);

/// Registered benches. None yet.
const BENCHES: &[Bench] = &[];

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
