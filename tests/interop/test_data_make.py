"""`nemo-tool data make` from raw text (issue 16) against Megatron's pipeline, run here: each
document tokenized by megatron-core 0.16.1's own `HuggingFaceTokenizer` (transformers'
AutoTokenizer over the tokenizer.json; no special tokens, its EOD = the EOS token) or
`SentencePieceTokenizer` (the `sentencepiece` library's `encode_as_ids`; EOD = `eos_id`) with the
semantics of Megatron-LM's `tools/preprocess_data.py` (a list value is pre-split sentences, each
non-empty one a sequence; the EOD ends the last; a document without tokens is still a document),
written by megatron-core's `IndexedDatasetBuilder` with `DType.optimal_dtype`. Our `.bin`/`.idx`
must be byte-identical, for a byte-fallback BPE (Llama style: `▁` for spaces, unknown characters as
`<0xXX>` bytes) and a byte-level BPE (GPT-2 / Qwen style: a regex pre-tokenizer) tokenizer.json, the
fixtures' SentencePiece BPE model (unknown characters as `<unk>`, extra spaces removed) and a
SentencePiece BPE trained here Llama-2 style (byte fallback, spaces kept, a user-defined piece),
over a corpus
with accents, CJK, emoji, combining marks, empty texts, whitespace runs, tabs, newlines and a
very long document, read from a gzip file and a plain one, at 1 and 2 workers.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import HuggingFaceTokenizer
from megatron.core.tokenizers.text.libraries.sentencepiece_tokenizer import SentencePieceTokenizer

ROOT = Path(__file__).resolve().parents[2]
SPM_FIXTURE = ROOT / "fixtures" / "mcore" / "tokenizer" / "tokenizer.model"

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "whitespace   runs\t\ttabs \t mixed\n\nand blank lines\n",
    "Ünïcödé àccents: café, naïve, façade, Ångström",
    "日本語のテキストと中文文本，还有한국어",
    "emoji 🦀🐍 and symbols ∑∫√ ≠ ≤",
    "combining: e\u0301 a\u0308 — zero\u200bwidth",
    "",
    " ",
    "numbers 1234567890 3.14159 -42",
    "line one\r\nline two",
    "a user-defined piece: call <tool> then<tool>again",
    "contractions: it's, ISN'T, we'LL, they'Re, you've, I'm, he'd, the 'ſ and ''s",
    "an added token <|endoftext|> inside a document, and <|end alone",
    "NFC: the Kelvin sign K, the Ohm sign Ω, Å and digits 12345678 ٣٤٥٦",
    "crlf runs\r\n\r\n  \r\n\tend \u3000wide space\u00a0nbsp",
]


def _corpus(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    words = " ".join(TEXTS).split()
    docs = []
    for i in range(n):
        text = TEXTS[i % len(TEXTS)] if i < 2 * len(TEXTS) else " ".join(rng.choices(words, k=rng.randint(0, 40)))
        title = [rng.choice(TEXTS), "", rng.choice(TEXTS)] if i % 3 == 0 else rng.choice(TEXTS)
        docs.append({"id": i, "text": text, "title": title})
    # a very long document
    docs.append({"id": n, "text": " ".join(rng.choices(words, k=60000)), "title": "long"})
    return docs


def _byte_fallback_bpe(out: Path) -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials)
    tok.train_from_iterator(TEXTS[:5] * 20, trainer)
    return _save(tok, out, "</s>")


def _byte_level_bpe(out: Path) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer)
    return _save(tok, out, "<|endoftext|>")


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")


def _split_byte_level_bpe(out: Path, pattern: str, nfc: bool, ignore_merges: bool) -> str:
    """Llama 3 (ignore_merges, digits in threes) or Qwen 2 (NFC, single digits) style: a Split
    regex, then ByteLevel without its own regex."""
    from tokenizers import Regex

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer)
    return _save(tok, out, "<|endoftext|>")


def _spm_llama2_style(out: Path) -> Path:
    """A SentencePiece BPE trained as Llama 2's was: identity normalization, spaces kept,
    byte fallback, digits split; plus a user-defined piece."""
    out.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS[:6] * 30), model_prefix=str(out / "sp"), vocab_size=400,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, user_defined_symbols=["<tool>"],
        character_coverage=1.0, minloglevel=2)
    return out / "sp.model"


def _save(tok: Tokenizer, out: Path, eos: str) -> str:
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "model_max_length": 1 << 30}))
    return eos


def _reference(tok_path: Path, files: list[Path], keys: list[str], prefix: Path) -> None:
    """Megatron's preprocess_data.py, one process: Encoder.encode per line, one builder per key."""
    if tok_path.is_dir():
        tok = HuggingFaceTokenizer(str(tok_path))
        eod = tok.eod
    else:
        tok = SentencePieceTokenizer(str(tok_path))
        eod = tok.eos_id
    builders = {k: IndexedDatasetBuilder(f"{prefix}_{k}_document.bin", dtype=DType.optimal_dtype(tok.vocab_size))
                for k in keys}
    for f in files:
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt", encoding="utf-8") as fin:
            for line in fin:
                data = json.loads(line)
                for key in keys:
                    text = data[key]
                    sentences = text if isinstance(text, list) else [text]
                    doc_ids, lens = [], []
                    for s in sentences:
                        ids = tok.text_to_ids(s)
                        if len(ids) > 0:
                            doc_ids.extend(ids)
                            lens.append(len(ids))
                    if len(doc_ids) > 0:
                        doc_ids.append(eod)
                        lens[-1] += 1
                    builders[key].add_document(doc_ids, lens)
    for k, b in builders.items():
        b.finalize(f"{prefix}_{k}_document.idx")


ENCODER = {"byte_fallback_bpe": "tokenizers", "byte_level_bpe": "bytelevel-bpe",
           "llama3_style_bpe": "bytelevel-bpe", "qwen2_style_bpe": "bytelevel-bpe",
           "spm_fixture": "sentencepiece-bpe", "spm_llama2_style": "sentencepiece-bpe"}


@pytest.mark.parametrize("kind", list(ENCODER))
def test_text_datasets_equal_megatrons(tmp_path, run_tool, kind):
    tok_dir = tmp_path / "tok"
    if kind == "byte_fallback_bpe":
        _byte_fallback_bpe(tok_dir)
    elif kind == "byte_level_bpe":
        _byte_level_bpe(tok_dir)
    elif kind == "llama3_style_bpe":
        _split_byte_level_bpe(tok_dir, LLAMA3_PATTERN, nfc=False, ignore_merges=True)
    elif kind == "qwen2_style_bpe":
        _split_byte_level_bpe(tok_dir, QWEN2_PATTERN, nfc=True, ignore_merges=False)
    elif kind == "spm_fixture":
        tok_dir = SPM_FIXTURE
    else:
        tok_dir = _spm_llama2_style(tok_dir)
    docs = _corpus(1, 300)
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl"
    with gzip.open(a, "wt", encoding="utf-8") as f:
        for d in docs[:150]:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(b, "w", encoding="utf-8") as f:
        for d in docs[150:]:
            f.write(json.dumps(d) + "\n")  # ASCII escapes here, raw UTF-8 above
    keys = ["text", "title"]
    _reference(tok_dir, [a, b], keys, tmp_path / "ref")
    for workers in (1, 2):
        out = tmp_path / f"ours{workers}"
        p = run_tool("data", "make", "--input", a, b, "--tokenizer", tok_dir, "--json-keys", *keys,
                     "--append-eod", "--workers", workers, "--output-prefix", out, "--json")
        report = json.loads(p.stdout)
        assert report["documents"] == len(docs) and report["skipped"] == 0, report
        assert report["encoder"] == ENCODER[kind], report
        for k in keys:
            for ext in ("bin", "idx"):
                ours = Path(f"{out}_{k}_document.{ext}").read_bytes()
                ref = Path(f"{tmp_path}/ref_{k}_document.{ext}").read_bytes()
                assert ours == ref, f"{kind} {k}.{ext} workers={workers}"
    print(f"{kind}: {report['tokens']} tokens, byte-identical to megatron-core's builder at 1 and 2 workers")


def test_globs_zstd_and_a_nemo_tokenizer(tmp_path, run_tool):
    """A quoted glob reads its files sorted, a .zst corpus (written by the zstd tool when it is
    installed) reads as its plain copy, and a .nemo's tokenizer artifact is the tokenizer."""
    import shutil
    import subprocess

    docs = _corpus(2, 40)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        (shards / f"part{i}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[i::3]))
    nemo = ROOT / "fixtures" / "mcore" / "llama" / "nemo" / "tiny_llama_tp1.nemo"

    def make(out, *inputs, tok=SPM_FIXTURE):
        run_tool("data", "make", "--input", *inputs, "--tokenizer", tok, "--append-eod", "--output-prefix", out)
        return Path(f"{out}_text_document.bin").read_bytes(), Path(f"{out}_text_document.idx").read_bytes()

    listed = make(tmp_path / "listed", *(shards / f"part{i}.jsonl" for i in range(3)))
    assert make(tmp_path / "globbed", str(shards / "part*.jsonl")) == listed
    assert make(tmp_path / "from_nemo", *(shards / f"part{i}.jsonl" for i in range(3)), tok=nemo) == listed
    p = run_tool("data", "make", "--input", str(shards / "none*.jsonl"), "--tokenizer", SPM_FIXTURE,
                 "--output-prefix", tmp_path / "x", check=False)
    assert p.returncode == 2 and "no file matches" in p.stderr, p.stderr
    if shutil.which("zstd"):
        for i in range(3):
            subprocess.run(["zstd", "-q", str(shards / f"part{i}.jsonl")], check=True)
        assert make(tmp_path / "zst", *(shards / f"part{i}.jsonl.zst" for i in range(3))) == listed


def test_bad_lines_name_file_and_line(tmp_path, run_tool):
    tok_dir = tmp_path / "tok"
    _byte_level_bpe(tok_dir)
    good = json.dumps({"text": "fine"})
    cases = {
        "json": (good + "\n{not json\n", "bad.jsonl:2: not a JSON object"),
        "key": (good + "\n" + json.dumps({"txt": "x"}) + "\n", "bad.jsonl:2: key `text` is missing"),
        "utf8": (None, "bad.jsonl:2: not UTF-8"),
        "blank": (good + "\n\n" + good + "\n", "bad.jsonl:2: blank line"),
    }
    for name, (text, message) in cases.items():
        src = tmp_path / name
        src.mkdir()
        f = src / "bad.jsonl"
        if text is None:
            f.write_bytes(good.encode() + b'\n{"text": "\xff\xfe"}\n')
        else:
            f.write_text(text)
        out = src / "out"
        p = run_tool("data", "make", "--input", f, "--tokenizer", tok_dir, "--output-prefix", out, check=False)
        assert p.returncode == 2 and message in p.stderr, (name, p.stderr)
        assert not list(src.glob("out*")), f"{name}: partial output left"
        p = run_tool("data", "make", "--input", f, "--tokenizer", tok_dir, "--output-prefix", out, "--skip-bad",
                     "--json")
        r = json.loads(p.stdout)
        assert r["skipped"] == 1 and r["documents"] == (2 if name == "blank" else 1), (name, r)
    # plain text: one document per line, empty lines are empty documents
    plain = tmp_path / "plain.txt"
    plain.write_text("first line\n\nthird  line\n")
    p = run_tool("data", "make", "--input", plain, "--tokenizer", tok_dir, "--output-prefix", tmp_path / "plain",
                 "--append-eod", "--json")
    r = json.loads(p.stdout)
    assert r["documents"] == 3 and r["datasets"][0]["sequences"] == 2, r
    assert r["empty_documents"] == 1 and r["empty_examples"] == [f"{plain}:2"], r
    # no EOS known and none given
    (tok_dir / "tokenizer_config.json").write_text("{}")
    p = run_tool("data", "make", "--input", plain, "--tokenizer", tok_dir, "--output-prefix", tmp_path / "x",
                 "--append-eod", check=False)
    assert p.returncode == 2 and "names no EOS token" in p.stderr, p.stderr
