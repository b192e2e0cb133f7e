//! `inspect`: a metadata-only report of a checkpoint (layout, architecture,
//! vocabulary, parameter counts, artifacts, tensors) and its text rendering.
//! Building it reads pickles, zip directories and DCP metadata, never tensor
//! payloads (artifacts are hashed: they are small tokenizer files).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::model::checkpoint::{is_weights_member, Checkpoint, Weights};
use crate::model::config::ModelConfig;

/// Everything `inspect` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The path inspected.
    pub path: String,
    /// `tar`, `tar.gz` or `folder`.
    pub container: String,
    /// Weight layout.
    pub layout: LayoutReport,
    /// Model architecture from the config.
    pub architecture: Architecture,
    /// Vocabulary sizes.
    pub vocab: VocabReport,
    /// Parameter counts (global tensors, replicated ones counted once).
    pub params: ParamReport,
    /// Non-weight members (tokenizer files and the like).
    pub artifacts: Vec<ArtifactReport>,
    /// Every tensor (and opaque object such as `_extra_state`).
    pub tensors: Vec<TensorReport>,
    /// Problems worth a look that do not stop reading.
    pub warnings: Vec<String>,
    /// For a NeMo 2, Megatron-Bridge or Megatron-LM folder: the trainer, the weights' form,
    /// the iteration, whether optimizer state is present, where the config and the tokenizer
    /// were found (the architecture above is its NeMo 1 translation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<crate::model::foreign::Source>,
}

/// Where and how the weights are stored.
#[derive(Debug, Clone, Serialize)]
pub struct LayoutReport {
    /// `model_weights.ckpt`, `mp_rank_XX`, `tp_rank_XX_pp_rank_YYY`, `torch_dist` or `zarr`.
    pub variant: String,
    /// Tensor-parallel size on disk (1 for distributed checkpoints, which are global).
    pub tp_on_disk: u64,
    /// Pipeline-parallel size on disk.
    pub pp_on_disk: u64,
    /// `tensor_model_parallel_size` in the config.
    pub tp_in_config: u64,
    /// `pipeline_model_parallel_size` in the config.
    pub pp_in_config: u64,
    /// Partition-rule family used (`mcore-gpt`, `legacy-gpt`).
    pub family: String,
}

/// Architecture keys, with NeMo's defaults applied.
#[derive(Debug, Clone, Serialize)]
#[allow(missing_docs)]
pub struct Architecture {
    pub mcore_gpt: bool,
    pub num_layers: Option<u64>,
    pub hidden_size: Option<u64>,
    pub ffn_hidden_size: Option<u64>,
    pub num_attention_heads: Option<u64>,
    pub num_query_groups: Option<u64>,
    pub kv_channels: Option<u64>,
    pub normalization: Option<String>,
    pub activation: Option<String>,
    pub gated_mlp: bool,
    pub position_embedding_type: Option<String>,
    pub tied_embeddings: bool,
    pub bias: Option<bool>,
    /// Q/K/V biases without the other linear layers' (`qkv_bias`, Qwen2).
    pub qkv_bias: bool,
    /// Per-head query/key norms (`qk_layernorm`, Qwen3).
    pub qk_layernorm: bool,
    /// Sliding-window attention `[left, right]` (`window_size`, Mistral).
    pub window_size: Option<Vec<i64>>,
    /// Mixture-of-experts MLPs (`num_moe_experts`).
    pub moe: Option<MoeReport>,
    /// Gemma 2 / 3 features, when any is set.
    pub gemma: Option<GemmaReport>,
    pub precision: Option<String>,
}

/// Gemma's keys (docs/convert.md).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GemmaReport {
    /// `layernorm_zero_centered_gamma`: norms apply `1 + w`.
    pub zero_centered_norms: bool,
    /// `post_layernorm`: norms after attention and after the MLP.
    pub post_norms: bool,
    /// `scale_embedding`: embeddings times `sqrt(hidden_size)`.
    pub scale_embedding: bool,
    /// `query_pre_attn_scalar`.
    pub query_pre_attn_scalar: Option<f64>,
    /// `attn_logit_softcapping`.
    pub attn_logit_softcapping: Option<f64>,
    /// `final_logit_softcapping`.
    pub final_logit_softcapping: Option<f64>,
    /// Layers using the sliding window (1-based), from `window_attn_skip_freq`.
    pub windowed_layers: Option<Vec<u64>>,
    /// `rope_local_base_freq`.
    pub rope_local_base_freq: Option<f64>,
}

fn gemma_report(cfg: &ModelConfig) -> Option<GemmaReport> {
    let flag = |k: &str| cfg.get(k).and_then(|v| v.as_bool()) == Some(true);
    let num = |k: &str| {
        let v = cfg.get(k)?;
        v.as_f64().or_else(|| v.as_i64().map(|i| i as f64))
    };
    let windowed_layers = cfg.num_layers().ok().and_then(|n| {
        let w = cfg.window_attn_layers(n).ok()??;
        Some((1..=n).zip(w).filter(|(_, w)| *w).map(|(l, _)| l).collect())
    });
    let r = GemmaReport {
        zero_centered_norms: flag("layernorm_zero_centered_gamma"),
        post_norms: flag("post_layernorm"),
        scale_embedding: flag("scale_embedding"),
        query_pre_attn_scalar: num("query_pre_attn_scalar"),
        attn_logit_softcapping: num("attn_logit_softcapping"),
        final_logit_softcapping: num("final_logit_softcapping"),
        windowed_layers,
        rope_local_base_freq: num("rope_local_base_freq"),
    };
    let any = r.zero_centered_norms
        || r.post_norms
        || r.scale_embedding
        || r.query_pre_attn_scalar.is_some()
        || r.attn_logit_softcapping.is_some()
        || r.final_logit_softcapping.is_some()
        || r.windowed_layers.is_some()
        || r.rope_local_base_freq.is_some();
    any.then_some(r)
}

/// The MoE layers' settings.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MoeReport {
    /// `num_moe_experts`.
    pub experts: u64,
    /// `moe_router_topk`.
    pub topk: u64,
    /// `moe_ffn_hidden_size` (else `ffn_hidden_size`).
    pub ffn_hidden_size: Option<u64>,
    /// `expert_model_parallel_size` (default 1).
    pub expert_parallel: u64,
    /// `moe_shared_expert_intermediate_size`: the shared experts' MLP size, if any.
    pub shared_ffn_hidden_size: Option<u64>,
}

/// True and padded vocabulary.
#[derive(Debug, Clone, Serialize)]
pub struct VocabReport {
    /// Tokens in the tokenizer, when an artifact says.
    pub true_vocab: Option<u64>,
    /// Which artifact gave `true_vocab`.
    pub true_vocab_source: Option<String>,
    /// Rows of the embedding as stored (global).
    pub padded_vocab: Option<u64>,
    /// What Megatron's padding rule gives for the config's TP (`ceil(V/(m*T))*(m*T)`).
    pub expected_padded_vocab: Option<u64>,
    /// `make_vocab_size_divisible_by`.
    pub divisible_by: u64,
}

/// Parameter counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ParamReport {
    /// Total parameters.
    pub total: u64,
    /// Total bytes of tensor data (global, replicated tensors once).
    pub total_bytes: u64,
    /// Bytes the weight files occupy on disk (all ranks, replicas included).
    pub bytes_on_disk: u64,
    /// Per dtype.
    pub by_dtype: BTreeMap<String, DtypeCount>,
}

/// Parameters and bytes of one dtype.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DtypeCount {
    /// Parameters.
    pub params: u64,
    /// Bytes.
    pub bytes: u64,
}

/// One artifact.
#[derive(Debug, Clone, Serialize)]
pub struct ArtifactReport {
    /// Member name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lowercase hex sha256 of the bytes.
    pub sha256: String,
    /// Config keys referring to it (`tokenizer.model: nemo:<name>`).
    pub referenced_by: Vec<String>,
}

/// One tensor or opaque object.
#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    /// Logical key (global layer numbers; stacked keys for distributed checkpoints).
    pub name: String,
    /// dtype name (`bfloat16`), or `object` for opaque values.
    pub dtype: String,
    /// Global shape (TP=1, all layers).
    pub global_shape: Vec<u64>,
    /// Partition rule (`column`, `row`, ...), if known.
    pub rule: Option<String>,
    /// Per-rank (or per-chunk) local pieces.
    pub shards: Vec<ShardReport>,
}

/// One stored piece of a tensor.
#[derive(Debug, Clone, Serialize)]
pub struct ShardReport {
    /// TP rank (per-rank layouts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tp: Option<u64>,
    /// PP rank (per-rank layouts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pp: Option<u64>,
    /// Offsets in the global tensor (distributed checkpoints).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offsets: Option<Vec<u64>>,
    /// Local shape.
    pub shape: Vec<u64>,
}

/// Builds the report for an opened checkpoint. Reads artifact bytes (to hash
/// them) but no tensor payloads.
pub fn report(ckpt: &Checkpoint) -> Result<Report, crate::formats::archive::Error> {
    let cfg = &ckpt.config;
    let tensors = ckpt.tensors();
    let mut warnings = ckpt.warnings.clone();

    let tied = cfg.share_embeddings_and_output_weights();
    let mut params = ParamReport::default();
    for t in &tensors {
        let Some(dt) = t.dtype else { continue };
        // With tied embeddings a later PP stage may hold a copy of the embedding
        // as `output_layer.weight`: one parameter set, not two.
        if tied && t.name.ends_with("output_layer.weight") {
            continue;
        }
        let n = t.numel();
        let b = n.saturating_mul(dt.size() as u64);
        params.total += n;
        params.total_bytes += b;
        let e = params
            .by_dtype
            .entry(dt.torch_name().to_string())
            .or_default();
        e.params += n;
        e.bytes += b;
    }
    params.bytes_on_disk = ckpt
        .archive()
        .members()
        .iter()
        .filter(|m| is_weights_member(&m.name))
        .map(|m| m.size)
        .sum();

    let mut artifacts = Vec::new();
    let refs = cfg.artifact_refs();
    let mut true_vocab = None;
    let mut true_vocab_source = None;
    for name in &ckpt.artifacts {
        let bytes = ckpt.read_member(name)?;
        let sha = hex::encode(Sha256::digest(bytes.as_slice()));
        let referenced_by: Vec<String> = refs
            .iter()
            .filter(|r| &r.name == name)
            .map(|r| r.key.to_string())
            .collect();
        if true_vocab.is_none() && !referenced_by.is_empty() {
            match crate::model::tokenizer::vocab_size(name, bytes.as_slice()) {
                Ok(Some(v)) => {
                    true_vocab = Some(v);
                    true_vocab_source = Some(name.clone());
                }
                Ok(None) => {}
                Err(e) => warnings.push(e.to_string()),
            }
        }
        artifacts.push(ArtifactReport {
            name: name.clone(),
            size: bytes.len() as u64,
            sha256: sha,
            referenced_by,
        });
    }
    for r in &refs {
        if !ckpt.artifacts.iter().any(|a| a == &r.name) {
            warnings.push(format!(
                "config {} refers to nemo:{}, which is not in the archive",
                r.key, r.name
            ));
        }
    }

    let padded_vocab = tensors
        .iter()
        .find(|t| t.name.ends_with("embedding.word_embeddings.weight"))
        .and_then(|t| t.global_shape.first().copied());
    let divisible_by = cfg.make_vocab_size_divisible_by();
    let tp_cfg = cfg.tensor_model_parallel_size();
    let expected_padded_vocab = match cfg.override_vocab_size() {
        Some(v) => Some(v),
        None => true_vocab.and_then(|v| cfg.padded_vocab(v, tp_cfg).ok()),
    };
    if let (Some(p), Some(e)) = (padded_vocab, expected_padded_vocab) {
        if p != e {
            warnings.push(format!(
                "embedding has {p} rows but the padding rule gives {e} (vocab {}, divisible_by {divisible_by}, TP {tp_cfg})",
                true_vocab.map(|v| v.to_string()).unwrap_or_default()
            ));
        }
    }

    let l = &ckpt.layout;
    let layout = LayoutReport {
        variant: match (&ckpt.weights, l.variant) {
            (Weights::Dist(d), _) => match d.backend {
                crate::formats::dist::Backend::TorchDist => "torch_dist".to_string(),
                crate::formats::dist::Backend::Zarr => "zarr".to_string(),
            },
            (_, v) => v.name().to_string(),
        },
        tp_on_disk: l.tp,
        pp_on_disk: l.pp,
        tp_in_config: tp_cfg,
        pp_in_config: cfg.pipeline_model_parallel_size(),
        family: ckpt.family.family.clone(),
    };
    let architecture = Architecture {
        mcore_gpt: cfg.mcore_gpt(),
        num_layers: cfg.num_layers().ok(),
        hidden_size: cfg.hidden_size().ok(),
        ffn_hidden_size: cfg.ffn_hidden_size().ok(),
        num_attention_heads: cfg.num_attention_heads().ok(),
        num_query_groups: cfg.num_query_groups().ok(),
        kv_channels: cfg.kv_channels().ok(),
        normalization: Some(cfg.normalization().to_string()),
        activation: Some(cfg.activation().to_string()),
        gated_mlp: cfg.is_gated(),
        position_embedding_type: Some(cfg.position_embedding_type().to_string()),
        tied_embeddings: tied,
        bias: Some(cfg.bias()),
        qkv_bias: ["qkv_bias", "add_qkv_bias"]
            .iter()
            .any(|k| cfg.get(k).and_then(|v| v.as_bool()) == Some(true)),
        qk_layernorm: cfg.get("qk_layernorm").and_then(|v| v.as_bool()) == Some(true),
        window_size: cfg
            .get("window_size")
            .and_then(|v| v.as_sequence())
            .map(|s| s.iter().filter_map(|x| x.as_i64()).collect()),
        gemma: gemma_report(cfg),
        moe: cfg
            .get("num_moe_experts")
            .and_then(|v| v.as_u64())
            .filter(|&n| n > 0)
            .map(|experts| MoeReport {
                experts,
                topk: cfg
                    .get("moe_router_topk")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(2),
                ffn_hidden_size: cfg
                    .get("moe_ffn_hidden_size")
                    .and_then(|v| v.as_u64())
                    .or_else(|| cfg.ffn_hidden_size().ok()),
                expert_parallel: cfg
                    .get("expert_model_parallel_size")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(1),
                shared_ffn_hidden_size: cfg
                    .get("moe_shared_expert_intermediate_size")
                    .and_then(|v| v.as_u64()),
            }),
        precision: cfg.precision().map(str::to_string),
    };
    let tensors = tensors
        .iter()
        .map(|t| TensorReport {
            name: t.name.clone(),
            dtype: t
                .dtype
                .map(|d| d.torch_name().to_string())
                .unwrap_or_else(|| "object".to_string()),
            global_shape: t.global_shape.clone(),
            rule: t.rule.map(|r| r.name().to_string()),
            shards: t
                .shards
                .iter()
                .map(|s| ShardReport {
                    tp: s.tp,
                    pp: s.pp,
                    offsets: s.offsets.clone(),
                    shape: s.shape.clone(),
                })
                .collect(),
        })
        .collect();
    Ok(Report {
        path: ckpt.path().display().to_string(),
        container: ckpt.container().to_string(),
        layout,
        architecture,
        vocab: VocabReport {
            true_vocab,
            true_vocab_source,
            padded_vocab,
            expected_padded_vocab,
            divisible_by,
        },
        params,
        artifacts,
        tensors,
        warnings,
        source: ckpt.source.clone(),
    })
}

fn shape_str(s: &[u64]) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "-".to_string())
}

impl Report {
    /// Human-readable text; `with_tensors` adds the per-tensor table.
    pub fn render(&self, with_tensors: bool) -> String {
        let mut s = String::new();
        let l = &self.layout;
        let a = &self.architecture;
        let _ = writeln!(s, "{} ({})", self.path, self.container);
        if let Some(src) = &self.source {
            let _ = writeln!(
                s,
                "source:        {} ({}), iteration {}, optimizer state {}, config from {}, tokenizer {}",
                src.format.name(),
                src.weights,
                opt(&src.iteration),
                if src.optimizer { "present (not read)" } else { "absent" },
                src.config_from,
                src.tokenizer.as_deref().unwrap_or("none")
            );
        }
        let _ = writeln!(
            s,
            "layout:        {}  TP={} PP={} on disk; config TP={} PP={}; rules {}",
            l.variant, l.tp_on_disk, l.pp_on_disk, l.tp_in_config, l.pp_in_config, l.family
        );
        let _ = writeln!(
            s,
            "architecture:  {} layers, hidden {}, ffn {}, heads {}, query groups {}, kv_channels {}",
            opt(&a.num_layers),
            opt(&a.hidden_size),
            opt(&a.ffn_hidden_size),
            opt(&a.num_attention_heads),
            opt(&a.num_query_groups),
            opt(&a.kv_channels)
        );
        let _ = writeln!(
            s,
            "               norm {}, activation {}{}, position {}, tied embeddings {}, bias {}{}, precision {}, mcore {}",
            opt(&a.normalization),
            opt(&a.activation),
            if a.gated_mlp { " (gated)" } else { "" },
            opt(&a.position_embedding_type),
            a.tied_embeddings,
            opt(&a.bias),
            {
                let mut extra = String::new();
                if a.qkv_bias {
                    extra += ", qkv bias";
                }
                if a.qk_layernorm {
                    extra += ", qk layernorm";
                }
                if let Some(w) = &a.window_size {
                    extra += &format!(", sliding window {w:?}");
                }
                if let Some(g) = &a.gemma {
                    if let Some(l) = &g.windowed_layers {
                        extra += &format!(" on layers {l:?}");
                    }
                    for (on, what) in [
                        (g.zero_centered_norms, "zero-centred norms"),
                        (g.post_norms, "post-norms"),
                        (g.scale_embedding, "scaled embeddings"),
                    ] {
                        if on {
                            extra += &format!(", {what}");
                        }
                    }
                    if let Some(q) = g.query_pre_attn_scalar {
                        extra += &format!(", query_pre_attn_scalar {q}");
                    }
                    if let Some(c) = g.attn_logit_softcapping {
                        extra += &format!(", attention softcap {c}");
                    }
                    if let Some(c) = g.final_logit_softcapping {
                        extra += &format!(", logit softcap {c}");
                    }
                    if let Some(b) = g.rope_local_base_freq {
                        extra += &format!(", local rope base {b}");
                    }
                }
                if let Some(m) = &a.moe {
                    extra += &format!(
                        ", {} experts (top-{}, ffn {}, EP {}{})",
                        m.experts,
                        m.topk,
                        opt(&m.ffn_hidden_size),
                        m.expert_parallel,
                        m.shared_ffn_hidden_size
                            .map_or(String::new(), |f| format!(", shared experts ffn {f}"))
                    );
                }
                extra
            },
            opt(&a.precision),
            a.mcore_gpt
        );
        let v = &self.vocab;
        let _ = writeln!(
            s,
            "vocab:         true {}{}, padded {} (expected {} for divisible_by {} x TP)",
            opt(&v.true_vocab),
            v.true_vocab_source
                .as_ref()
                .map(|x| format!(" from {x}"))
                .unwrap_or_default(),
            opt(&v.padded_vocab),
            opt(&v.expected_padded_vocab),
            v.divisible_by
        );
        let p = &self.params;
        let _ = writeln!(
            s,
            "parameters:    {} ({}), {} on disk",
            p.total,
            human_bytes(p.total_bytes),
            human_bytes(p.bytes_on_disk)
        );
        for (dt, c) in &p.by_dtype {
            let _ = writeln!(
                s,
                "               {dt}: {} params, {}",
                c.params,
                human_bytes(c.bytes)
            );
        }
        let _ = writeln!(s, "artifacts:     {}", self.artifacts.len());
        for art in &self.artifacts {
            let refs = if art.referenced_by.is_empty() {
                String::new()
            } else {
                format!("  <- {}", art.referenced_by.join(", "))
            };
            let _ = writeln!(
                s,
                "  {}  {}  sha256:{}{}",
                art.name,
                human_bytes(art.size),
                art.sha256,
                refs
            );
        }
        let _ = writeln!(s, "tensors:       {}", self.tensors.len());
        if with_tensors {
            for t in &self.tensors {
                let locals: Vec<String> = t
                    .shards
                    .iter()
                    .map(|sh| match (&sh.offsets, sh.tp, sh.pp) {
                        (Some(off), _, _) => format!("{}@{}", shape_str(&sh.shape), shape_str(off)),
                        (None, Some(tp), Some(pp)) => {
                            format!("tp{tp}/pp{pp}:{}", shape_str(&sh.shape))
                        }
                        _ => shape_str(&sh.shape),
                    })
                    .collect();
                let _ = writeln!(
                    s,
                    "  {}  {}  {}  {}  local {}",
                    t.name,
                    t.dtype,
                    shape_str(&t.global_shape),
                    t.rule.as_deref().unwrap_or("-"),
                    locals.join(" ")
                );
            }
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(2048), "2.00 KiB");
        assert_eq!(human_bytes(3 << 30), "3.00 GiB");
    }
}
