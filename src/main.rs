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
            eprintln!("nemo-tool: {}", render(&err));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes joined by ": ", like `{:#}`, but leaving out a
/// cause whose text an outer message already holds: many error types put
/// their source in their own message and also return it from `source()`, and
/// `{:#}` would print it twice.
fn render(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let msg = cause.to_string();
        if text.contains(msg.as_str()) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&msg);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::render;

    #[derive(Debug, thiserror::Error)]
    #[error("reading x.nemo: {source}")]
    struct Reading {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let err = anyhow::Error::new(Reading { source: io }).context("opening x.nemo");
        assert_eq!(
            render(&err),
            format!(
                "opening x.nemo: reading x.nemo: {}",
                std::io::Error::from(std::io::ErrorKind::NotFound)
            )
        );
        // A cause the message does not hold is still printed.
        let err = anyhow::anyhow!("disk full").context("writing o.nemo");
        assert_eq!(render(&err), "writing o.nemo: disk full");
    }
}
