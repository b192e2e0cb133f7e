//! `cargo xtask bench data [--mb N] [--workers N]`: `nemo-tool data make --tokenizer` against
//! Megatron's preprocessing in Python (tests/bench/data_reference.py: preprocess_data.py's
//! Pool + megatron-core's HuggingFaceTokenizer + IndexedDatasetBuilder) on the same generated
//! corpus, tokenizer (a 32k byte-level BPE trained on it) and worker count, in one run: tokens/s
//! of each and their ratio (target >= 5x at 2 workers); the outputs must be byte-identical. Peak
//! RSS of ours on the corpus and on three copies of it shows memory does not grow with the
//! corpus.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// A deterministic corpus of about `mb` MB: JSON lines with documents from a few words to a few
/// thousand. Words follow a Zipf law over a 100k-word synthetic lexicon (so tokenizers' word
/// caches miss as they do on real text), mixed with Unicode (accents, CJK, Greek, emoji),
/// numbers, punctuation, contractions and whitespace runs.
fn corpus(path: &Path, mb: usize) -> Result<()> {
    const SYLLABLES: &[&str] = &[
        "ka", "to", "ri", "en", "mo", "ra", "the", "ing", "er", "al", "con", "ter", "pro", "de",
        "ma", "ti", "on", "ve", "sta", "lu", "tion", "ne", "gra", "di", "an", "ol", "is", "ber",
        "qu", "ex", "ph", "ly", "ment", "ous", "ch", "sh", "st", "ia", "or", "un",
    ];
    const SPECIAL: &[&str] = &[
        "café",
        "naïve",
        "日本語",
        "中文文本",
        "données",
        "über",
        "Straße",
        "λόγος",
        "🦀",
        "3.14",
        "—",
        "(x)",
        "a\tb",
        "  ",
        "\n",
        "GPU",
        "NeMo",
        "isn't",
        "we'll",
        "1,024",
        "«quoted»",
        "e\u{301}",
        "2026-12-04",
        "$5",
        "x^2",
        "#tag",
        "\n\n",
        "Ωmega",
        "ДАННЫЕ",
        "한국어",
    ];
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut rand = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let lexicon: Vec<String> = (0..100_000)
        .map(|i| {
            let n = 1 + (rand() % 4) as usize;
            let mut w: String = (0..n)
                .map(|_| SYLLABLES[(rand() % SYLLABLES.len() as u64) as usize])
                .collect();
            if i % 7 == 0 {
                w = w[..1].to_uppercase() + &w[1..];
            }
            w
        })
        .collect();
    let mut written = 0usize;
    let mut i = 0u64;
    while written < mb << 20 {
        let n = match rand() % 10 {
            0 => 2000 + (rand() % 3000) as usize,
            1 => 0,
            _ => 20 + (rand() % 300) as usize,
        };
        let mut text = String::new();
        for k in 0..n {
            if k > 0 {
                text.push(' ');
            }
            let r = rand();
            if r % 16 == 0 {
                text.push_str(SPECIAL[((r >> 8) % SPECIAL.len() as u64) as usize]);
            } else {
                // Zipf: rank = N^u - 1 for u uniform in [0, 1)
                let u = (r >> 11) as f64 / (1u64 << 53) as f64;
                let rank = ((lexicon.len() as f64).powf(u) - 1.0) as usize;
                text.push_str(&lexicon[rank.min(lexicon.len() - 1)]);
            }
            if r % 11 == 0 {
                text.push_str([",", ".", ";", ":", "!", "?"][((r >> 20) % 6) as usize]);
            }
        }
        let line = format!("{{\"id\": {i}, \"text\": \"{}\"}}", json_escape(&text));
        writeln!(f, "{line}")?;
        written += line.len() + 1;
        i += 1;
    }
    f.flush()?;
    Ok(())
}

/// `s` as the inside of a JSON string.
fn json_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o
}

fn arg(args: &[String], name: &str, default: usize) -> Result<usize> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} needs a number")),
        None => Ok(default),
    }
}

fn python() -> PathBuf {
    let venv = crate::test::venv_python(&crate::util::root().join(".venv"));
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// `cargo xtask bench data`.
pub fn data(args: &[String]) -> Result<()> {
    let mb = arg(args, "--mb", 20)?;
    let workers = arg(args, "--workers", 2)?;
    crate::util::run(crate::util::cargo().args(["build", "--release", "--bin", "nemo-tool"]))?;
    let tool = crate::util::target_dir().join("release").join("nemo-tool");
    let dir = crate::util::target_dir().join("bench").join("data");
    std::fs::create_dir_all(&dir)?;
    let input = dir.join("corpus.jsonl");
    corpus(&input, mb)?;
    let tok = dir.join("tokenizer");
    let py = python();
    let script = crate::util::root().join("tests/bench/data_reference.py");
    crate::util::run(
        Command::new(&py)
            .arg(&script)
            .arg("train")
            .arg(&input)
            .arg(&tok)
            .arg("32000"),
    )?;
    let ours = |input: &Path, prefix: &Path| -> Result<(f64, Option<u64>, String)> {
        crate::bench_convert::timed_output(
            Command::new(&tool)
                .args([
                    "data",
                    "make",
                    "--append-eod",
                    "--force",
                    "--json",
                    "--input",
                ])
                .arg(input)
                .arg("--tokenizer")
                .arg(&tok)
                .args(["--workers", &workers.to_string(), "--output-prefix"])
                .arg(prefix),
        )
    };
    let reference = |prefix: &Path| -> Result<(f64, Option<u64>, String)> {
        crate::bench_convert::timed_output(
            Command::new(&py)
                .arg(&script)
                .arg("--input")
                .arg(&input)
                .arg("--tokenizer")
                .arg(&tok)
                .args([
                    "--append-eod",
                    "--workers",
                    &workers.to_string(),
                    "--output-prefix",
                ])
                .arg(prefix),
        )
    };
    // best of 2 alternating rounds each
    let (mut best_ours, mut best_ref) = (f64::MAX, f64::MAX);
    let (mut report, mut rss_ours) = (String::new(), None);
    // the tokenizing loop alone: ours from its report, the reference's as it prints it (its
    // wall time also holds ~5 s of importing megatron-core, transformers and torch)
    let (mut loop_ours, mut loop_ref) = (f64::MAX, f64::MAX);
    for _ in 0..2 {
        let (s, rss, out) = ours(&input, &dir.join("ours"))?;
        if s < best_ours {
            best_ours = s;
            rss_ours = rss;
        }
        loop_ours = loop_ours.min(crate::bench::json_number(&out, "seconds").unwrap_or(s));
        report = out;
        let (s, _, out) = reference(&dir.join("ref"))?;
        best_ref = best_ref.min(s);
        let printed = out
            .split("seconds=")
            .nth(1)
            .and_then(|x| x.trim().parse::<f64>().ok());
        loop_ref = loop_ref.min(printed.unwrap_or(s));
    }
    for ext in ["bin", "idx"] {
        let a = std::fs::read(dir.join(format!("ours_text_document.{ext}")))?;
        let b = std::fs::read(dir.join(format!("ref_text_document.{ext}")))?;
        if a != b {
            bail!("ours and the reference differ in .{ext}");
        }
    }
    let tokens = crate::bench::json_number(&report, "tokens").unwrap_or(0.0);
    let docs = crate::bench::json_number(&report, "documents").unwrap_or(0.0);
    // memory against corpus size: three copies of the corpus
    let triple = dir.join("corpus3.jsonl");
    {
        let text = std::fs::read(&input)?;
        let mut f = std::fs::File::create(&triple)?;
        for _ in 0..3 {
            f.write_all(&text)?;
        }
    }
    let (_, rss3, _) = ours(&triple, &dir.join("ours3"))?;
    let _ = std::fs::remove_file(&triple);
    println!(
        "bench data: {mb} MB corpus, {docs} documents, {tokens} tokens, {workers} workers (32k byte-level BPE)"
    );
    println!(
        "  nemo-tool data make   wall {best_ours:6.2} s  {:>10.0} tokens/s   tokenizing loop {loop_ours:6.2} s  {:>10.0} tokens/s",
        tokens / best_ours,
        tokens / loop_ours
    );
    println!(
        "  Python reference      wall {best_ref:6.2} s  {:>10.0} tokens/s   tokenizing loop {loop_ref:6.2} s  {:>10.0} tokens/s",
        tokens / best_ref,
        tokens / loop_ref
    );
    let ratio = best_ref / best_ours;
    let loop_ratio = loop_ref / loop_ours;
    println!(
        "  ratio: wall {ratio:.2}x, tokenizing loop {loop_ratio:.2}x (target >= 5x: {}); outputs byte-identical",
        if ratio >= 5.0 && loop_ratio >= 5.0 {
            "PASS"
        } else {
            "FAIL"
        }
    );
    let kib =
        |r: Option<u64>| r.map_or("?".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    println!(
        "  peak RSS of nemo-tool: {} on the corpus, {} on three copies of it ({} MB)",
        kib(rss_ours),
        kib(rss3),
        3 * mb
    );
    Ok(())
}
