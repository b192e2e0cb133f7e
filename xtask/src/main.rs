//! `cargo xtask <test|demo|bench>`: project automation, std + anyhow only (see README).
//!
//! * `test`: the whole suite: Rust unit/integration tests, then the Python interop tests in a
//!   pinned `.venv` (created or refreshed from `tests/interop/requirements.txt` as needed).
//! * `demo`: runs the main commands on the built-in tiny fixtures, distillation included (it sets
//!   up the same `.venv` as `test` first).
//! * `bench <name>`: benchmarks (see `bench.rs`).

mod bench;
mod bench_cache;
mod bench_convert;
mod bench_data;
mod bench_recompute;
mod bench_reshard;
mod demo;
mod sha256;
mod test;
mod util;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  test [--no-python | --python-only] [--no-distill] [-- <pytest args>]
        build, run `cargo test --workspace`, then `cargo test --features distill` against
        the venv's libtorch (skip with --no-distill), then the Python interop tests in .venv
  demo  run nemo-tool on the built-in tiny fixtures (sets up .venv as `test` does, builds
        with --features distill, distills a tiny student)
  bench <name> [args]
        run a benchmark (`cargo xtask bench list` shows them)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test::run(args.get(1..).unwrap_or_default()),
        Some("demo") => demo::run(args.get(1..).unwrap_or_default()),
        Some("bench") => bench::run(args.get(1..).unwrap_or_default()),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(anyhow::anyhow!("unknown xtask {other:?}\n\n{USAGE}")),
        None => Err(anyhow::anyhow!("no xtask given\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
