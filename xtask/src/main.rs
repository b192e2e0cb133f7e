//! `cargo xtask <demo|test|bench>`: project automation (see README).
fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::bail!("unknown xtask {:?}", args)
}
