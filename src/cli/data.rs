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
    /// Write a dataset from raw text with a tokenizer (as Megatron's preprocess_data.py), or
    /// from token ids (one document per input line or list).
    #[command(
        after_help = "With --tokenizer: JSON Lines (.jsonl/.json, optionally .gz) with the texts under\n\
--json-keys (one dataset {PREFIX}_{KEY}_document per key), or plain text (one document per\n\
line); tokenized without special tokens; --append-eod ends each document with the\n\
tokenizer's EOS id.\n\
Without: token ids, JSON Lines of lists (or objects with \"ids\", \"input_ids\" or\n\
\"tokens\"), or one JSON list of lists; writes {PREFIX}.bin/.idx.\n\n\
Examples:\n  \
nemo-tool data make --input corpus.jsonl --tokenizer Llama-3-8B/ --append-eod --workers 8 --output-prefix data/train\n  \
nemo-tool data make --input ids.jsonl --output-prefix data/train --vocab-size 32000 --append-eod 2"
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
    /// Input files, read in order (list several; quoted globs such as 'shards/*.jsonl.gz' are
    /// expanded, sorted): text with --tokenizer (.jsonl/.json or plain text, .gz or .zst),
    /// token ids without (one file; `-` reads stdin).
    #[arg(long, num_args = 1.., required = true)]
    pub input: Vec<PathBuf>,
    /// Writes `<PREFIX>_<KEY>_document.bin/.idx` per JSON key with --tokenizer, else
    /// `<PREFIX>.bin` and `<PREFIX>.idx`.
    #[arg(long)]
    pub output_prefix: PathBuf,
    /// A Hugging Face tokenizer.json or a SentencePiece BPE tokenizer.model, a model folder
    /// holding one, or a .nemo whose tokenizer artifact is used: the inputs are text.
    #[arg(long, value_name = "PATH")]
    pub tokenizer: Option<PathBuf>,
    /// JSON keys whose texts are tokenized, one dataset each (with --tokenizer).
    #[arg(long, num_args = 1.., default_value = "text")]
    pub json_keys: Vec<String>,
    /// Tokenizing threads (with --tokenizer; default: the available cores).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Skip lines that are not documents (bad JSON, a missing key, not UTF-8, blank JSON
    /// lines) and report how many, instead of stopping at the first.
    #[arg(long)]
    pub skip_bad: bool,
    /// Vocabulary size: picks the token type as Megatron does (u16 below 65500, else i32).
    #[arg(long, conflicts_with = "token_type")]
    pub vocab_size: Option<u64>,
    /// Token type, instead of `--vocab-size`.
    #[arg(long, value_parser = ["u8", "u16", "i16", "i32", "i64"])]
    pub token_type: Option<String>,
    /// End every document with this token id; with --tokenizer and no ID, its EOS token.
    #[arg(long, value_name = "ID", num_args = 0..=1)]
    pub append_eod: Option<Option<i64>>,
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

/// `data make --tokenizer`: text through the tokenizer into one dataset per JSON key.
fn make_text(a: &MakeArgs) -> anyhow::Result<()> {
    use nemo_tool::ops::data_make::{self, MakeText, Progress};
    use nemo_tool::text::tokenizer::Tokenizer;
    use std::io::IsTerminal;
    let Some(path) = &a.tokenizer else {
        bail!("--tokenizer is required for text");
    };
    let tok = Tokenizer::open(path)?;
    let inputs = expand_globs(&a.input)?;
    let eod = match a.append_eod {
        None => None,
        Some(Some(id)) => Some(u32::try_from(id).context("--append-eod: not a token id")?),
        Some(None) => Some(tok.eod().with_context(|| {
            format!(
                "--append-eod: {} names no EOS token (no eos_token in tokenizer_config.json or special_tokens_map.json beside it); give the id: --append-eod ID",
                tok.path().display()
            )
        })?),
    };
    let ty = match (a.vocab_size, a.token_type.as_deref()) {
        (Some(v), _) => TokenType::for_vocab(v),
        (None, Some(t)) => token_type(t)?,
        (None, None) => TokenType::for_vocab(tok.vocab_size()),
    };
    let workers = a.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let tty = std::io::stderr().is_terminal() && !a.json;
    let mut last = std::time::Instant::now();
    let mut bar = |p: &Progress| {
        if !tty || last.elapsed().as_millis() < 250 {
            return;
        }
        last = std::time::Instant::now();
        let s = p.seconds.max(1e-9);
        eprint!(
            "\rtokenizing: {} docs ({:.0} docs/s), {} tokens ({:.0} tokens/s), {:.1} MB",
            p.documents,
            p.documents as f64 / s,
            p.tokens,
            p.tokens as f64 / s,
            p.bytes as f64 / 1e6
        );
    };
    let m = MakeText {
        inputs: &inputs,
        keys: &a.json_keys,
        tokenizer: &tok,
        append_eod: eod,
        workers,
        prefix: &a.output_prefix,
        skip_bad: a.skip_bad,
        force: a.force,
        token_type: ty,
    };
    let r = data_make::make_text(&m, &mut bar)?;
    if tty {
        eprintln!();
    }
    if a.json {
        return super::print_json(&r);
    }
    if r.empty_documents > 0 {
        eprintln!(
            "warning: {} documents tokenized to nothing and are kept as empty documents, as megatron-core keeps them (first: {})",
            r.empty_documents,
            r.empty_examples.join(", ")
        );
    }
    let s = r.seconds.max(1e-9);
    for d in &r.datasets {
        eprintln!(
            "wrote {}.bin/.idx: {} documents, {} sequences, {} tokens ({})",
            d.prefix.display(),
            d.documents,
            d.sequences,
            d.tokens,
            r.token_type
        );
    }
    eprintln!(
        "{} documents in {:.1} s ({:.0} docs/s, {:.0} tokens/s, {} workers){}",
        r.documents,
        r.seconds,
        r.documents as f64 / s,
        r.tokens as f64 / s,
        r.workers,
        if r.skipped > 0 {
            format!(
                "; skipped {} bad lines, first: {}",
                r.skipped,
                r.skipped_examples.join("; ")
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Inputs with `*`, `?` or `[` expanded (sorted), as Megatron's script globs a quoted
/// pattern; a pattern matching nothing is an error.
fn expand_globs(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        let s = p.to_string_lossy();
        if !s.contains(['*', '?', '[']) {
            out.push(p.clone());
            continue;
        }
        let mut found: Vec<PathBuf> = glob::glob(&s)
            .with_context(|| format!("--input {s}: not a glob pattern"))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("--input {s}"))?;
        if found.is_empty() {
            bail!("--input {s}: no file matches");
        }
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

fn token_type(t: &str) -> anyhow::Result<TokenType> {
    Ok(match t {
        "u8" => TokenType::U8,
        "u16" => TokenType::U16,
        "i16" => TokenType::I16,
        "i32" => TokenType::I32,
        "i64" => TokenType::I64,
        other => bail!("unknown token type {other}"),
    })
}

/// Runs `data`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        DataCommand::Make(a) if a.tokenizer.is_some() => make_text(&a)?,
        DataCommand::Make(a) => {
            let [input] = a.input.as_slice() else {
                bail!("token ids come from one --input file (text needs --tokenizer)");
            };
            let eod: Option<i64> = a
                .append_eod
                .map(|e| e.context("--append-eod needs an ID without --tokenizer"))
                .transpose()?;
            let ty = match (a.vocab_size, a.token_type.as_deref()) {
                (Some(v), _) => TokenType::for_vocab(v),
                (None, Some(t)) => token_type(t)?,
                (None, None) => bail!("give --vocab-size or --token-type"),
            };
            let docs = read_docs(input)?;
            let mut b = Builder::create(&a.output_prefix, ty, a.force)
                .with_context(|| format!("creating {}", a.output_prefix.display()))?;
            for (i, mut d) in docs.into_iter().enumerate() {
                d.extend(eod);
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
