//! `validate`: a CI verdict on a checkpoint. Every problem is a typed
//! [`Finding`] with a stable code and the place it is about (member, key,
//! config key); nothing stops at the first one unless the archive cannot be
//! read further.
//!
//! Metadata checks (no payload read): the rank grid the config implies is on
//! disk, config T/P match the layout, TP ranks of a stage hold the same keys
//! and dtypes, every local shape equals what the config, T and the partition
//! rules give, the tensors the architecture needs are there, the layer count,
//! the vocab padding, and the artifacts the config references. `--deep` reads
//! every byte: zip record CRCs of every rank file, NaN/Inf counts and the
//! canonical checksums; a manifest (from `checksum --json`) is compared tensor
//! by tensor.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;

use crate::formats::archive::Archive;
use crate::formats::torch::Value;
use crate::model::canonical::{Canonical, EntryValue};
use crate::model::checkpoint::{detect, Checkpoint, Variant, Weights};
use crate::ops::checksum::{CanonicalOptions, Manifest};

mod shapes;

/// What a finding is about. The codes are stable (CI scripts match them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// The path could not be read as a checkpoint at all.
    Unreadable,
    /// A member's bytes end early (tar data, a rank file's zip).
    TruncatedMember,
    /// A member could not be parsed (bad zip, refused pickle, bad metadata).
    BadMember,
    /// `model_config.yaml` is unusable.
    BadConfig,
    /// No weights in the archive.
    NoWeights,
    /// A rank file the config's T x P (or the grid on disk) needs is absent.
    MissingRankFile,
    /// Config T/P do not match the per-rank layout on disk.
    ConfigLayoutMismatch,
    /// A TP rank lacks a key that another rank of its stage has (or has more).
    KeySetMismatch,
    /// Shards of one tensor differ in dtype or in their unsplit dims.
    ShardMismatch,
    /// A tensor the config's architecture needs is missing.
    MissingTensor,
    /// A tensor the architecture does not explain.
    UnexpectedTensor,
    /// A local or global shape differs from what config, T and the rules give.
    ShapeMismatch,
    /// Layers stored differ from `num_layers`.
    LayerCount,
    /// Vocab-parallel rows differ from the padding rule.
    VocabPadding,
    /// An artifact the config references (`nemo:<name>`) is not in the archive.
    MissingArtifact,
    /// A zip record's CRC-32 does not match its bytes (`--deep`).
    CrcMismatch,
    /// A float tensor holds NaN or Inf (`--deep`).
    NanInf,
    /// A replicated tensor differs between the TP ranks of a stage (`--deep`).
    ReplicaMismatch,
    /// A tensor's bytes could not be read (`--deep`).
    UnreadableTensor,
    /// A tensor's canonical checksum differs from the manifest.
    ChecksumMismatch,
    /// A manifest tensor is absent here.
    ManifestMissingTensor,
    /// A tensor here is absent from the manifest.
    ManifestExtraTensor,
    /// The model digest differs from the manifest's.
    DigestMismatch,
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Makes the checkpoint invalid (exit 1).
    Error,
    /// Worth a look; does not fail validation.
    Warning,
}

/// One problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable code.
    pub code: Code,
    /// Error or warning.
    pub severity: Severity,
    /// Where: a member, `member:key`, a canonical tensor name, a config key.
    pub place: String,
    /// What exactly.
    pub message: String,
}

/// Options for [`validate`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Read every byte: CRCs, NaN/Inf counts, checksums.
    pub deep: bool,
    /// Compare canonical checksums with this manifest (reads every tensor).
    pub manifest: Option<Manifest>,
    /// The true vocabulary size, when no tokenizer artifact says it.
    pub vocab_size: Option<u64>,
}

/// NaN / Inf counts of one tensor (deep mode, tensors with any).
#[derive(Debug, Clone, Serialize)]
pub struct SpecialReport {
    /// Canonical name.
    pub name: String,
    /// NaN elements.
    pub nan: u64,
    /// Inf elements.
    pub inf: u64,
}

/// The verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The path validated.
    pub path: String,
    /// No error findings (and readable).
    pub valid: bool,
    /// True when the path could not be read as a checkpoint at all (exit 2).
    pub unreadable: bool,
    /// Layout variant on disk, if known.
    pub layout: Option<String>,
    /// TP / PP on disk.
    pub tp_pp_on_disk: Option<(u64, u64)>,
    /// Canonical tensors per dtype.
    pub dtypes: BTreeMap<String, u64>,
    /// Canonical tensors.
    pub tensors: u64,
    /// Whether every byte was read.
    pub deep: bool,
    /// Model digest (deep or manifest mode).
    pub model_digest: Option<String>,
    /// Tensors with NaN or Inf (deep mode).
    pub special: Vec<SpecialReport>,
    /// Every finding, errors first.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Process exit status: 0 valid, 1 invalid, 2 unreadable.
    pub fn exit_code(&self) -> u8 {
        if self.unreadable {
            2
        } else if self.valid {
            0
        } else {
            1
        }
    }

    /// Findings with this code.
    pub fn with_code(&self, code: Code) -> Vec<&Finding> {
        self.findings.iter().filter(|f| f.code == code).collect()
    }

    /// Human-readable text.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let verdict = match self.exit_code() {
            0 => "valid",
            1 => "INVALID",
            _ => "UNREADABLE",
        };
        let _ = writeln!(s, "{}: {verdict}", self.path);
        if let (Some(l), Some((t, p))) = (&self.layout, self.tp_pp_on_disk) {
            let _ = writeln!(s, "layout: {l} (TP={t} PP={p})");
        }
        if self.tensors > 0 {
            let d: Vec<String> = self
                .dtypes
                .iter()
                .map(|(k, v)| format!("{k} x{v}"))
                .collect();
            let _ = writeln!(s, "tensors: {} ({})", self.tensors, d.join(", "));
        }
        if let Some(d) = &self.model_digest {
            let _ = writeln!(s, "model digest: {d}");
        }
        for f in &self.findings {
            let sev = match f.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            let _ = writeln!(
                s,
                "{sev}[{}]: {}: {}",
                code_name(f.code),
                f.place,
                f.message
            );
        }
        s
    }
}

/// The snake_case name of a code.
pub fn code_name(c: Code) -> String {
    serde_json::to_value(c)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

struct Acc {
    findings: Vec<Finding>,
}

impl Acc {
    fn error(&mut self, code: Code, place: impl Into<String>, message: impl Into<String>) {
        self.push(code, Severity::Error, place, message);
    }
    fn push(
        &mut self,
        code: Code,
        severity: Severity,
        place: impl Into<String>,
        m: impl Into<String>,
    ) {
        self.findings.push(Finding {
            code,
            severity,
            place: place.into(),
            message: m.into(),
        });
    }
}

fn empty_report(path: &Path, opts: &Options) -> Report {
    Report {
        path: path.display().to_string(),
        valid: true,
        unreadable: false,
        layout: None,
        tp_pp_on_disk: None,
        dtypes: BTreeMap::new(),
        tensors: 0,
        deep: opts.deep,
        model_digest: None,
        special: Vec::new(),
        findings: Vec::new(),
    }
}

fn finish(mut r: Report, acc: Acc) -> Report {
    r.findings = acc.findings;
    r.findings.sort_by_key(|f| f.severity);
    r.valid = !r.unreadable && !r.findings.iter().any(|f| f.severity == Severity::Error);
    r
}

/// Opens and validates `path`. Never fails: problems opening it are findings
/// ([`Code::Unreadable`] when it is not a checkpoint container at all).
pub fn validate_path(path: &Path, opts: &Options) -> Report {
    let mut r = empty_report(path, opts);
    let mut acc = Acc { findings: vec![] };
    // NeMo 2, Megatron-Bridge and Megatron-LM folders, through NeMo 1 names
    match crate::model::foreign::open(path) {
        Ok(None) => {}
        Ok(Some(o)) => match Checkpoint::from_foreign(o, true) {
            Ok(ckpt) => {
                let mut v = validate(&ckpt, opts);
                v.path = path.display().to_string();
                return v;
            }
            Err(e) => {
                open_error(&mut acc, &[], e);
                return finish(r, acc);
            }
        },
        Err(e) => {
            acc.error(Code::BadMember, path.display().to_string(), e.to_string());
            return finish(r, acc);
        }
    }
    let archive = match Archive::open(path) {
        Ok(a) => a,
        Err(e) => {
            use crate::formats::archive::Error as A;
            match &e {
                A::TruncatedData { member, .. } => {
                    acc.error(Code::TruncatedMember, clean(member), e.to_string())
                }
                A::TruncatedHeader { after, offset, .. } if *offset > 0 => {
                    acc.error(Code::TruncatedMember, clean(after), e.to_string())
                }
                A::Gzip { .. } => acc.error(
                    Code::TruncatedMember,
                    path.display().to_string(),
                    e.to_string(),
                ),
                _ => {
                    r.unreadable = true;
                    acc.error(Code::Unreadable, path.display().to_string(), e.to_string());
                }
            }
            return finish(r, acc);
        }
    };
    let names = crate::formats::members::Members::member_names(&archive);
    match Checkpoint::from_archive(archive, true) {
        Ok(ckpt) => {
            let v = validate(&ckpt, opts);
            r = v;
            r.path = path.display().to_string();
            return r;
        }
        Err(e) => open_error(&mut acc, &names, e),
    }
    finish(r, acc)
}

/// A tar member name as the archive index spells it (no leading `./`).
fn clean(name: &str) -> String {
    let mut n = name;
    while let Some(rest) = n.strip_prefix("./") {
        n = rest;
    }
    n.to_string()
}

/// Maps an error opening the checkpoint model to a finding.
fn open_error(acc: &mut Acc, _names: &[String], e: crate::model::checkpoint::Error) {
    use crate::formats::torch::file::Error as T;
    use crate::formats::torch::zip::Error as Z;
    use crate::model::checkpoint::Error as C;
    let msg = e.to_string();
    match e {
        C::Layout(detect::Error::MissingRank { missing, .. }) => {
            acc.error(Code::MissingRankFile, missing, msg)
        }
        C::Layout(detect::Error::NoWeights) => acc.error(Code::NoWeights, "", msg),
        C::Torch { member, source } => {
            let truncated = matches!(
                source,
                T::Zip(Z::NoEndRecord { .. })
                    | T::Zip(Z::Truncated { .. })
                    | T::Zip(Z::RecordOutOfBounds { .. })
                    | T::StorageTooSmall { .. }
            ) || matches!(&source, T::Pickle { source: p, .. } if matches!(p, crate::formats::torch::pickle::Error::Truncated { .. }));
            let code = if truncated {
                Code::TruncatedMember
            } else {
                Code::BadMember
            };
            acc.error(code, member, msg)
        }
        C::NotStateDict { member, .. } => acc.error(Code::BadMember, member, msg),
        C::Config(_) | C::ConfigNotUtf8 => acc.error(
            Code::BadConfig,
            crate::model::checkpoint::CONFIG_MEMBER,
            msg,
        ),
        C::Dist(_) => acc.error(Code::BadMember, "model_weights/", msg),
        C::Archive(e) => acc.error(Code::BadMember, "", e.to_string()),
        C::Rules(_) => acc.error(Code::BadMember, "formats/", msg),
        C::Foreign(_) => acc.error(Code::BadMember, "", msg),
    }
}

/// Validates an opened checkpoint.
pub fn validate(ckpt: &Checkpoint, opts: &Options) -> Report {
    let mut r = empty_report(ckpt.path(), opts);
    let mut acc = Acc { findings: vec![] };
    let has_config = !ckpt
        .warnings
        .iter()
        .any(|w| w.starts_with("no model_config.yaml"));
    r.layout = Some(match &ckpt.weights {
        Weights::Dist(d) => match d.backend {
            crate::formats::dist::Backend::TorchDist => "torch_dist".to_string(),
            crate::formats::dist::Backend::Zarr => "zarr".to_string(),
        },
        Weights::PerRank(_) => ckpt.layout.variant.name().to_string(),
        Weights::Global(_) => "whole tensors (mapped from another format)".to_string(),
    });
    r.tp_pp_on_disk = Some((ckpt.layout.tp, ckpt.layout.pp));
    if !has_config {
        acc.error(
            Code::BadConfig,
            crate::model::checkpoint::CONFIG_MEMBER,
            "missing: not a complete .nemo",
        );
    }
    if has_config {
        check_grid(ckpt, &mut acc);
        check_artifacts(ckpt, &mut acc);
    }
    check_key_sets(ckpt, &mut acc);
    let mut sink = |c, sev, p, m| acc.push(c, sev, p, m);
    let flagged = if has_config {
        shapes::check_local(ckpt, opts.vocab_size, &mut sink)
    } else {
        Default::default()
    };
    let canon = match Canonical::new(ckpt) {
        Ok(c) => c,
        Err(e) => {
            canonical_error(&mut acc, e);
            return finish(r, acc);
        }
    };
    for e in &canon.entries {
        if let EntryValue::Tensor(t) = &e.value {
            r.tensors += 1;
            *r.dtypes
                .entry(t.dtype.torch_name().to_string())
                .or_default() += 1;
        }
    }
    if has_config {
        let mut sink = |c, sev, p, m| acc.push(c, sev, p, m);
        shapes::check_global(ckpt, &canon, opts.vocab_size, &flagged, &mut sink);
    }
    if opts.deep {
        check_crcs(ckpt, &mut acc);
        if let Err(e) = canon.verify_replicas() {
            canonical_error(&mut acc, e);
        }
    }
    if opts.deep || opts.manifest.is_some() {
        let copts = CanonicalOptions {
            vocab_size: opts
                .manifest
                .as_ref()
                .and_then(|m| m.vocab.as_ref())
                .map(|v| v.hashed)
                .or(opts.vocab_size),
            count_special: opts.deep,
        };
        match crate::ops::checksum::canonical(&canon, &copts) {
            Ok(m) => {
                for t in &m.tensors {
                    if let Some(s) = t.special.filter(|s| s.nan + s.inf > 0) {
                        acc.error(
                            Code::NanInf,
                            t.name.clone(),
                            format!("{} NaN and {} Inf elements", s.nan, s.inf),
                        );
                        r.special.push(SpecialReport {
                            name: t.name.clone(),
                            nan: s.nan,
                            inf: s.inf,
                        });
                    }
                }
                if let Some(want) = &opts.manifest {
                    compare_manifest(&m, want, &mut acc);
                }
                r.model_digest = Some(m.model_digest);
            }
            Err(e) => acc.error(Code::UnreadableTensor, "", e.to_string()),
        }
    }
    finish(r, acc)
}

fn canonical_error(acc: &mut Acc, e: crate::model::canonical::Error) {
    use crate::model::canonical::Error as E;
    let msg = e.to_string();
    match e {
        E::MissingShard { key, member } => {
            acc.error(Code::KeySetMismatch, format!("{member}:{key}"), msg)
        }
        E::ShardMismatch { key, member, .. } | E::OddGatedShard { key, member, .. } => {
            acc.error(Code::ShardMismatch, format!("{member}:{key}"), msg)
        }
        E::LayerCount { key, .. } | E::TooManyLayers { key, .. } => {
            acc.error(Code::LayerCount, key, msg)
        }
        E::ReplicaMismatch { key, member } => {
            acc.error(Code::ReplicaMismatch, format!("{member}:{key}"), msg)
        }
        E::Config(_) | E::Layout(_) => acc.error(
            Code::BadConfig,
            crate::model::checkpoint::CONFIG_MEMBER,
            msg,
        ),
        E::Tensor { key, .. }
        | E::Dist { key, .. }
        | E::BadSlice { key, .. }
        | E::Indivisible { key, .. } => acc.error(Code::UnreadableTensor, key, msg),
    }
}

/// The rank grid the config implies, and config T/P against the layout.
fn check_grid(ckpt: &Checkpoint, acc: &mut Acc) {
    if ckpt.layout.variant == Variant::Distributed {
        return; // global tensors: any T/P loads them
    }
    let cfg = &ckpt.config;
    let (ct, cp) = (
        cfg.tensor_model_parallel_size(),
        cfg.pipeline_model_parallel_size(),
    );
    let (dt, dp) = (ckpt.layout.tp, ckpt.layout.pp);
    if (ct, cp) == (dt, dp) {
        return;
    }
    let want = Variant::for_sizes(ct, cp);
    let present: BTreeSet<&str> = ckpt
        .layout
        .ranks
        .iter()
        .map(|(_, _, m)| m.as_str())
        .collect();
    let expected: Vec<String> = (0..cp)
        .flat_map(|p| (0..ct).map(move |t| want.rank_member(t, p)))
        .collect();
    let subset = want == ckpt.layout.variant
        && present.iter().all(|m| expected.iter().any(|e| e == m))
        && ct.saturating_mul(cp) <= 4096;
    if subset {
        for m in expected.iter().filter(|m| !present.contains(m.as_str())) {
            acc.error(
                Code::MissingRankFile,
                m.clone(),
                format!("config says TP={ct} PP={cp}, this rank file is absent"),
            );
        }
    } else {
        acc.error(
            Code::ConfigLayoutMismatch,
            "tensor_model_parallel_size",
            format!(
                "config says TP={ct} PP={cp} but the weights on disk are {} (TP={dt} PP={dp}); NeMo will refuse to restore this",
                ckpt.layout.variant.name()
            ),
        );
    }
}

/// Artifacts the config references are present.
fn check_artifacts(ckpt: &Checkpoint, acc: &mut Acc) {
    for r in ckpt.config.artifact_refs() {
        if !ckpt.artifacts.iter().any(|a| a == &r.name) {
            acc.error(
                Code::MissingArtifact,
                r.key,
                format!("refers to nemo:{}, which is not in the archive", r.name),
            );
        }
    }
}

/// TP ranks of a stage hold the same keys, with tensors in the same places.
fn check_key_sets(ckpt: &Checkpoint, acc: &mut Acc) {
    let mut stages: BTreeMap<u64, Vec<&crate::model::checkpoint::RankFile>> = BTreeMap::new();
    for r in ckpt.rank_files() {
        stages.entry(r.pp).or_default().push(r);
    }
    for ranks in stages.values() {
        let Some(first) = ranks.first() else { continue };
        let keys0: BTreeMap<&str, bool> = first
            .entries()
            .map(|(k, v)| (k, matches!(v, Value::Tensor(_))))
            .collect();
        for r in ranks.iter().skip(1) {
            let keys: BTreeMap<&str, bool> = r
                .entries()
                .map(|(k, v)| (k, matches!(v, Value::Tensor(_))))
                .collect();
            for k in keys0.keys().filter(|k| !keys.contains_key(*k)) {
                acc.error(
                    Code::KeySetMismatch,
                    format!("{}:{k}", r.member),
                    format!("missing here, present in {}", first.member),
                );
            }
            for k in keys.keys().filter(|k| !keys0.contains_key(*k)) {
                acc.error(
                    Code::KeySetMismatch,
                    format!("{}:{k}", r.member),
                    format!("present here, missing in {}", first.member),
                );
            }
        }
    }
}

/// Zip record CRCs of every rank file (`--deep`).
fn check_crcs(ckpt: &Checkpoint, acc: &mut Acc) {
    for r in ckpt.rank_files() {
        let Ok(bytes) = ckpt.read_member(&r.member) else {
            acc.error(Code::TruncatedMember, r.member.clone(), "cannot be read");
            continue;
        };
        let Ok(z) = crate::formats::torch::zip::ZipArchive::open(bytes) else {
            continue; // legacy (non-zip) files have no CRCs
        };
        for e in z.entries() {
            match z.payload(e) {
                Ok(p) => {
                    let crc = crc32fast::hash(p.as_slice());
                    if crc != e.crc32 {
                        acc.error(
                            Code::CrcMismatch,
                            format!("{}:{}", r.member, e.name),
                            format!(
                                "zip record CRC-32 is {:08x}, the bytes give {crc:08x}",
                                e.crc32
                            ),
                        );
                    }
                }
                Err(err) => acc.error(
                    Code::TruncatedMember,
                    format!("{}:{}", r.member, e.name),
                    err.to_string(),
                ),
            }
        }
    }
}

/// Tensor-by-tensor comparison with a manifest.
fn compare_manifest(got: &Manifest, want: &Manifest, acc: &mut Acc) {
    let have: BTreeMap<&str, &crate::ops::checksum::TensorSum> =
        got.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let wanted: BTreeMap<&str, &crate::ops::checksum::TensorSum> =
        want.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    for (name, w) in &wanted {
        match have.get(name) {
            None => acc.error(
                Code::ManifestMissingTensor,
                name.to_string(),
                "in the manifest, not in this checkpoint",
            ),
            Some(h) if h.sha256 != w.sha256 || h.dtype != w.dtype || h.shape != w.shape => acc
                .error(
                    Code::ChecksumMismatch,
                    name.to_string(),
                    format!(
                        "{} {:?} sha256 {} here, manifest has {} {:?} sha256 {}",
                        h.dtype, h.shape, h.sha256, w.dtype, w.shape, w.sha256
                    ),
                ),
            Some(_) => {}
        }
    }
    for name in have.keys().filter(|n| !wanted.contains_key(*n)) {
        acc.error(
            Code::ManifestExtraTensor,
            name.to_string(),
            "in this checkpoint, not in the manifest",
        );
    }
    if got.model_digest != want.model_digest {
        acc.error(
            Code::DigestMismatch,
            "model",
            format!(
                "model digest {} here, manifest has {}",
                got.model_digest, want.model_digest
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    #[test]
    fn fixtures_are_valid() {
        for f in [
            "fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo",
            "fixtures/mcore/llama/nemo/tiny_llama_tp2.nemo",
            "fixtures/mcore/llama/nemo/tiny_llama_dist_tp1.nemo",
        ] {
            let r = validate_path(
                &fixture(f),
                &Options {
                    deep: true,
                    ..Options::default()
                },
            );
            assert!(r.valid, "{f}: {}", r.render());
            assert_eq!(r.exit_code(), 0);
            assert!(r.model_digest.is_some());
        }
    }

    #[test]
    fn not_a_checkpoint_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.nemo");
        std::fs::write(&p, b"hello").unwrap();
        let r = validate_path(&p, &Options::default());
        assert_eq!(r.exit_code(), 2, "{}", r.render());
        assert_eq!(r.findings[0].code, Code::Unreadable);
    }

    #[test]
    fn manifest_comparison_names_each_difference() {
        let t = |n: &str, s: &str| crate::ops::checksum::TensorSum {
            name: n.into(),
            dtype: "float32".into(),
            shape: vec![2],
            sha256: s.into(),
            special: None,
        };
        let mk = |v: Vec<crate::ops::checksum::TensorSum>| Manifest {
            format: crate::ops::checksum::MANIFEST_FORMAT.into(),
            model_digest: crate::ops::checksum::model_digest(&v),
            vocab: None,
            tensors: v,
            skipped: vec![],
        };
        let got = mk(vec![t("a", "1"), t("b", "2"), t("x", "3")]);
        let want = mk(vec![t("a", "1"), t("b", "9"), t("y", "3")]);
        let mut acc = Acc { findings: vec![] };
        compare_manifest(&got, &want, &mut acc);
        let codes: Vec<(Code, &str)> = acc
            .findings
            .iter()
            .map(|f| (f.code, f.place.as_str()))
            .collect();
        assert_eq!(
            codes,
            vec![
                (Code::ChecksumMismatch, "b"),
                (Code::ManifestMissingTensor, "y"),
                (Code::ManifestExtraTensor, "x"),
                (Code::DigestMismatch, "model"),
            ]
        );
    }
}
