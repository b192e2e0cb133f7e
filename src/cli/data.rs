//! `nemo-tool data`: write and describe Megatron indexed datasets.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use nemo_tool::formats::indexed::{Builder, IndexedDataset, TokenType};

/// Megatron indexed datasets (`<prefix>.bin` + `<prefix>.idx`), as `distill` and `eval` read them.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub command: DataCommand,
}

/// `data` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DataCommand {
    /// Write a dataset from token ids (one document per input line or list).
    #[command(
        after_help = "Input: JSON Lines, each line a list of token ids or an object with \"ids\",\n\
\"input_ids\" or \"tokens\"; or one JSON list of lists.\n\n\
Example:\n  nemo-tool data make --input docs.jsonl --output-prefix data/train --vocab-size 32000 --append-eod 2"
    )]
    Make(MakeArgs),
    /// Print a dataset's size: sequences, documents, tokens, token type.
    #[command(after_help = "Example:\n  nemo-tool data info data/train --json")]
    Info(InfoArgs),
    /// Print every sequence as a JSON list of token ids, one per line.
    #[command(after_help = "Example:\n  nemo-tool data dump data/train | head -3")]
    Dump(DumpArgs),
}

/// `data dump`.
#[derive(Debug, clap::Args)]
pub struct DumpArgs {
    /// Dataset prefix (without `.bin`/`.idx`).
    pub prefix: PathBuf,
}

/// `data make`.
#[derive(Debug, clap::Args)]
pub struct MakeArgs {
    /// Token ids (JSON Lines, or one JSON list of lists); `-` reads stdin.
    #[arg(long)]
    pub input: PathBuf,
    /// Writes `<PREFIX>.bin` and `<PREFIX>.idx`.
    #[arg(long)]
    pub output_prefix: PathBuf,
    /// Vocabulary size: picks the token type as Megatron does (u16 below 65500, else i32).
    #[arg(long, conflicts_with = "token_type")]
    pub vocab_size: Option<u64>,
    /// Token type, instead of `--vocab-size`.
    #[arg(long, value_parser = ["u8", "u16", "i16", "i32", "i64"])]
    pub token_type: Option<String>,
    /// Append this token id (end of document) to every document.
    #[arg(long)]
    pub append_eod: Option<i64>,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `data info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Dataset prefix (without `.bin`/`.idx`).
    pub prefix: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct Summary {
    prefix: String,
    sequences: usize,
    documents: usize,
    tokens: u64,
    token_type: String,
}

fn parse_doc(v: &serde_json::Value) -> Option<Vec<i64>> {
    let list = match v {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(o) => ["ids", "input_ids", "tokens"]
            .iter()
            .find_map(|k| o.get(*k))?
            .as_array()?,
        _ => return None,
    };
    list.iter().map(|x| x.as_i64()).collect()
}

fn read_docs(path: &PathBuf) -> anyhow::Result<Vec<Vec<i64>>> {
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        Box::new(BufReader::new(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        ))
    };
    let mut docs = Vec::new();
    let mut lines = reader.lines().enumerate().peekable();
    // One JSON list of lists?
    if let Some((_, Ok(first))) = lines.peek() {
        if first.trim_start().starts_with("[[") || first.trim() == "[" {
            let text: String = lines
                .map(|(_, l)| l.unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n");
            let v: serde_json::Value =
                serde_json::from_str(&text).context("parsing the JSON list of lists")?;
            let arr = v
                .as_array()
                .context("expected a JSON list of token-id lists")?;
            for (i, d) in arr.iter().enumerate() {
                docs.push(
                    parse_doc(d)
                        .with_context(|| format!("document {i}: not a list of integers"))?,
                );
            }
            return Ok(docs);
        }
    }
    for (i, line) in lines {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        docs.push(
            parse_doc(&v)
                .with_context(|| format!("{}:{}: not a list of integers", path.display(), i + 1))?,
        );
    }
    Ok(docs)
}

fn summary(ds: &IndexedDataset) -> Summary {
    Summary {
        prefix: ds.prefix().display().to_string(),
        sequences: ds.len(),
        documents: ds.documents().len().saturating_sub(1),
        tokens: ds.lengths().iter().map(|l| u64::from(*l)).sum(),
        token_type: format!("{:?}", ds.token_type()).to_lowercase(),
    }
}

fn print(s: &Summary, json: bool) -> anyhow::Result<()> {
    if json {
        return super::print_json(s);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: {} sequences, {} documents, {} tokens ({})",
        s.prefix, s.sequences, s.documents, s.tokens, s.token_type
    )?;
    Ok(())
}

/// Runs `data`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        DataCommand::Make(a) => {
            let ty = match (a.vocab_size, a.token_type.as_deref()) {
                (Some(v), _) => TokenType::for_vocab(v),
                (None, Some("u8")) => TokenType::U8,
                (None, Some("u16")) => TokenType::U16,
                (None, Some("i16")) => TokenType::I16,
                (None, Some("i32")) => TokenType::I32,
                (None, Some("i64")) => TokenType::I64,
                _ => bail!("give --vocab-size or --token-type"),
            };
            let docs = read_docs(&a.input)?;
            let mut b = Builder::create(&a.output_prefix, ty, a.force)
                .with_context(|| format!("creating {}", a.output_prefix.display()))?;
            for (i, mut d) in docs.into_iter().enumerate() {
                d.extend(a.append_eod);
                b.add_document(&d)
                    .with_context(|| format!("document {i}"))?;
            }
            b.finish()?;
            let ds = IndexedDataset::open(&a.output_prefix)?;
            print(&summary(&ds), a.json)?;
        }
        DataCommand::Dump(a) => {
            let ds = IndexedDataset::open(&a.prefix)
                .with_context(|| format!("opening {}", a.prefix.display()))?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for i in 0..ds.len() {
                serde_json::to_writer(&mut out, &ds.sequence(i)).map_err(std::io::Error::from)?;
                writeln!(out)?;
            }
            out.flush()?;
        }
        DataCommand::Info(a) => {
            let ds = IndexedDataset::open(&a.prefix)
                .with_context(|| format!("opening {}", a.prefix.display()))?;
            print(&summary(&ds), a.json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_document_shapes() {
        let j = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert_eq!(parse_doc(&j("[1,2,3]")), Some(vec![1, 2, 3]));
        assert_eq!(parse_doc(&j(r#"{"input_ids":[4]}"#)), Some(vec![4]));
        assert_eq!(parse_doc(&j(r#"{"text":"hi"}"#)), None);
        assert_eq!(parse_doc(&j("[1.5]")), None);
    }
}
