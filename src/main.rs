//! The `nemo-tool` command line: parse, dispatch to the library, print.
fn main() {
    eprintln!("nemo-tool: not yet implemented");
    std::process::exit(2);
}
