//! The `nemo-tool` binary: parse, dispatch, print errors, exit codes
//! (0 ok, 1 differences found, 2 error; a closed stdout pipe is a success).

use std::io::ErrorKind;
use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let parsed = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // clap prints help/version to stdout (exit 0) and usage errors to stderr (exit 2).
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match parsed.run() {
        Ok(code) => code,
        Err(err) => {
            let broken_pipe = err
                .chain()
                .filter_map(|e| e.downcast_ref::<std::io::Error>())
                .any(|e| e.kind() == ErrorKind::BrokenPipe);
            if broken_pipe {
                return ExitCode::SUCCESS;
            }
            eprintln!("nemo-tool: {err:#}");
            ExitCode::from(2)
        }
    }
}
