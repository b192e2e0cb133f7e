//! Megatron-Core GPT (decoder-only transformer) on tch, tensor-parallel over a
//! [`ProcessGroup`]: vocab-parallel embedding, learned or rotary positions, RMSNorm/LayerNorm,
//! fused column-parallel QKV with grouped-query attention (mcore's per-group interleaved rows),
//! causal SDPA, row-parallel projection, gated or plain MLP, final norm, vocab-parallel output
//! layer (tied or untied). Activations are `[batch, seq, hidden]` (mcore uses `[seq, batch]`;
//! the math is the same). Weights come from a checkpoint through [`weights::Source`] or are
//! initialised as Megatron does.
//!
//! Shapes are validated when the model is built; the tensor ops afterwards use tch's
//! panicking forms, because a failure there is a bug in this module, not bad input.

use std::ops::Range;

use tch::{Device, Kind, Tensor};

use crate::model::layout::Rule;

use super::hidden_loss::Site;
use super::parallel::{self, ProcessGroup};
use super::rope;
use super::spec::{Activation, GptSpec, Norm, Positions};
use super::weights::{self, Param, Source};

/// Errors building or running the model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading weights.
    #[error(transparent)]
    Weights(#[from] weights::Error),
    /// A collective.
    #[error(transparent)]
    Parallel(#[from] parallel::Error),
    /// Inputs that do not fit.
    #[error("{what}: {why}")]
    Input {
        /// Which input.
        what: &'static str,
        /// Why.
        why: String,
    },
}

/// One named parameter shard.
#[derive(Debug)]
pub struct NamedParam {
    /// Canonical name (no `model.` prefix; local-spec norm names).
    pub name: String,
    /// How it is split over TP ranks.
    pub rule: Rule,
    /// This rank's shard.
    pub tensor: Tensor,
}

#[derive(Debug)]
struct NormW {
    w: Tensor,
    b: Option<Tensor>,
}

#[derive(Debug)]
struct Layer {
    /// Uses the sliding window (and, with `rope_local_base_freq`, the local RoPE).
    windowed: bool,
    ln1: NormW,
    qkv_w: Tensor,
    qkv_b: Option<Tensor>,
    /// Per-head query and key norms (`qk_layernorm`).
    q_ln: Option<NormW>,
    k_ln: Option<NormW>,
    proj_w: Tensor,
    proj_b: Option<Tensor>,
    /// Gemma's norms of the attention and MLP outputs, before their residual adds.
    post_attn: Option<NormW>,
    post_mlp: Option<NormW>,
    ln2: NormW,
    mlp: Mlp,
}

/// The rotary tables of one sequence length: the model's, and the windowed layers' own when
/// they have a different base (Gemma 3's `rope_local_base_freq`).
#[derive(Debug)]
struct Ropes {
    global: Option<rope::Rope>,
    local: Option<rope::Rope>,
}

impl Ropes {
    fn shallow_clone(&self) -> Ropes {
        Ropes {
            global: self.global.as_ref().map(rope::Rope::shallow_clone),
            local: self.local.as_ref().map(rope::Rope::shallow_clone),
        }
    }

    fn of(&self, l: &Layer) -> Option<&rope::Rope> {
        match (&self.local, l.windowed) {
            (Some(r), true) => Some(r),
            _ => self.global.as_ref(),
        }
    }
}

/// A layer's MLP: dense, or megatron-core's MoELayer with SequentialMLP experts.
#[derive(Debug)]
enum Mlp {
    Dense {
        fc1_w: Tensor,
        fc1_b: Option<Tensor>,
        fc2_w: Tensor,
        fc2_b: Option<Tensor>,
    },
    Moe {
        /// `[E, H]`, replicated.
        router: Tensor,
        /// Each expert's fc1 (this rank's `[gate_r; up_r]` rows) and fc2 (its columns).
        experts: Vec<(Tensor, Tensor)>,
    },
}

/// How a parameter is initialised when there is no checkpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    Normal(f64),
    Zeros,
    Ones,
}

/// The pipeline stage a [`Gpt`] holds: stage `index` of `count` owns global layers
/// `index·L/count .. (index+1)·L/count`; the first stage also the embeddings, the last the
/// final norm and the output layer (for tied embeddings a copy of the word embeddings, as
/// megatron-core keeps on the last stage at PP > 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stage {
    /// This stage.
    pub index: usize,
    /// Pipeline stages.
    pub count: usize,
}

impl Stage {
    /// The whole model (no pipeline).
    pub const WHOLE: Stage = Stage { index: 0, count: 1 };

    /// Holds the embeddings.
    pub fn is_first(&self) -> bool {
        self.index == 0
    }

    /// Holds the final norm and output layer.
    pub fn is_last(&self) -> bool {
        self.index + 1 == self.count
    }

    /// This stage's global layers of a `layers`-layer model.
    ///
    /// # Errors
    /// [`Error::Input`] when the layers do not split evenly into the stages.
    pub fn layers(&self, layers: usize) -> Result<Range<usize>, Error> {
        if self.count == 0 || layers % self.count != 0 || self.index >= self.count {
            return Err(Error::Input {
                what: "pipeline stages",
                why: format!(
                    "num_layers {layers} is not divisible by pipeline_model_parallel_size {}",
                    self.count
                ),
            });
        }
        let per = layers / self.count;
        Ok(self.index * per..(self.index + 1) * per)
    }
}

/// Where a forward pass hands captured module outputs (with the layer's global index).
type Capture<'a> = &'a mut dyn FnMut(Site, &Tensor);

/// A GPT shard on this rank: its TP slice of its pipeline stage.
#[derive(Debug)]
pub struct Gpt {
    /// The architecture.
    pub spec: GptSpec,
    /// The pipeline stage held.
    pub stage: Stage,
    pg: ProcessGroup,
    device: Device,
    kind: Kind,
    params: Vec<NamedParam>,
    /// First stage.
    emb: Option<Tensor>,
    pos: Option<Tensor>,
    layers: Vec<Layer>,
    /// Last stage.
    final_norm: Option<NormW>,
    output: Option<Tensor>,
    /// The rotary tables of the last sequence length (training repeats one length).
    rope: std::sync::Mutex<Option<(i64, Ropes)>>,
    /// Sum and count of the MoE layers' load-balancing losses since the last
    /// [`Gpt::take_moe_balance`].
    moe_balance: std::sync::Mutex<(f64, u64)>,
}

/// Where weights come from.
#[derive(Debug)]
pub enum InitFrom<'a> {
    /// A checkpoint.
    Checkpoint(&'a Source<'a>),
    /// Megatron-style random init from `init_method_std`, seeded (the same full tensors on
    /// every rank, then sliced, so any TP size starts from the same model).
    Random {
        /// Seed.
        seed: i64,
    },
}

struct Builder<'a> {
    spec: &'a GptSpec,
    from: &'a InitFrom<'a>,
    rank: i64,
    kind: Kind,
    device: Device,
    params: Vec<NamedParam>,
}

/// FNV-1a of a parameter name: its random-init seed, so a parameter starts the same at any
/// TP, PP and rank.
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A `[shape]` fp32 tensor of N(0, std²) samples from a seeded splitmix64 + Box-Muller
/// stream: deterministic across processes and threads.
fn normal(shape: &[i64], std: f64, seed: u64) -> Tensor {
    let n: i64 = shape.iter().product();
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // (0, 1]: never 0, so ln is finite
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let mut v = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    while (v.len() as i64) < n {
        let (u1, u2) = (next(), next());
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        v.push((r * th.cos() * std) as f32);
        v.push((r * th.sin() * std) as f32);
    }
    v.truncate(usize::try_from(n).unwrap_or(0));
    Tensor::from_slice(&v).view(shape)
}

/// [`normal`] for other modules' seeded inits (the KD projection layer).
pub fn seeded_normal(shape: &[i64], std: f64, seed: u64) -> Tensor {
    normal(shape, std, seed)
}

/// Slices a canonical (TP=1) tensor to rank `rank` of `tp` per `rule`.
fn slice_canonical(full: &Tensor, rule: Rule, rank: i64, tp: i64) -> Tensor {
    let nd = full.dim();
    match rule.split_dim(nd) {
        None => full.shallow_clone(),
        Some(d) => {
            let n = full.size()[d];
            if rule == Rule::GatedFc1 {
                let f = n / 2;
                let h = f / tp;
                Tensor::cat(
                    &[
                        full.narrow(d as i64, rank * h, h),
                        full.narrow(d as i64, f + rank * h, h),
                    ],
                    d as i64,
                )
            } else {
                let k = n / tp;
                full.narrow(d as i64, rank * k, k)
            }
        }
    }
}

impl Builder<'_> {
    /// One parameter: `names[0]` is canonical, the rest are alternative stored names.
    fn param(
        &mut self,
        names: &[String],
        rule: Rule,
        global: &[i64],
        init: Init,
    ) -> Result<Tensor, Error> {
        let name = names.first().cloned().unwrap_or_default();
        self.param_as(name, names, rule, global, init)
    }

    /// A parameter called `name` whose weights are those of `names` (read from the
    /// checkpoint, or initialised from `names[0]`'s seed).
    fn param_as(
        &mut self,
        name: String,
        names: &[String],
        rule: Rule,
        global: &[i64],
        init: Init,
    ) -> Result<Tensor, Error> {
        let tp = self.spec.tp;
        let mut local: Vec<i64> = global.to_vec();
        if let Some(d) = rule.split_dim(local.len()) {
            local[d] /= tp;
        }
        let t = match self.from {
            InitFrom::Checkpoint(src) => {
                let p = Param {
                    names: names.to_vec(),
                    rule,
                    local_shape: &local,
                    padded_rows: (rule == Rule::Vocab).then_some(self.spec.padded_vocab),
                };
                src.read(&p, self.rank, tp, self.kind)?
                    .to_device(self.device)
            }
            InitFrom::Random { seed } => tch::no_grad(|| {
                let opts = (Kind::Float, Device::Cpu);
                let full = match init {
                    Init::Zeros => Tensor::zeros(global, opts),
                    Init::Ones => Tensor::ones(global, opts),
                    Init::Normal(std) => {
                        // per-parameter seed: independent of TP, PP, of the rank that asks,
                        // and of libtorch's global RNG (which other threads may reseed)
                        let key = names.first().map_or(0, |n| name_seed(n));
                        normal(global, std, (*seed as u64).wrapping_mul(1_000_003) ^ key)
                    }
                };
                slice_canonical(&full, rule, self.rank, tp)
                    .contiguous()
                    .to_kind(self.kind)
                    .to_device(self.device)
            }),
        };
        self.params.push(NamedParam {
            name,
            rule,
            tensor: t.shallow_clone(),
        });
        Ok(t)
    }

    fn norm(&mut self, names: &[(&str, &str)]) -> Result<NormW, Error> {
        self.norm_of(names, self.spec.hidden)
    }

    /// A norm over `h` features (the hidden size, or the head dim of the q/k norms).
    fn norm_of(&mut self, names: &[(&str, &str)], h: i64) -> Result<NormW, Error> {
        let one = if matches!(self.spec.norm, Norm::LayerNorm1p | Norm::Rms1p) {
            Init::Zeros
        } else {
            Init::Ones
        };
        let wn: Vec<String> = names.iter().map(|(w, _)| w.to_string()).collect();
        let w = self.param(&wn, Rule::Replicated, &[h], one)?;
        let b = if matches!(self.spec.norm, Norm::Rms | Norm::Rms1p) {
            None
        } else {
            let bn: Vec<String> = names.iter().map(|(_, b)| b.to_string()).collect();
            Some(self.param(&bn, Rule::Replicated, &[h], Init::Zeros)?)
        };
        Ok(NormW { w, b })
    }
}

impl Gpt {
    /// Builds this rank's shard of the model described by `spec` (whose `tp` must equal the
    /// group's world size), with parameters of `kind` on `device`.
    /// `trainable` sets `requires_grad` on every parameter (the teacher passes false).
    ///
    /// # Errors
    /// A TP size different from the group's, or weight-reading errors.
    pub fn new(
        spec: GptSpec,
        from: &InitFrom,
        pg: &ProcessGroup,
        kind: Kind,
        device: Device,
        trainable: bool,
    ) -> Result<Gpt, Error> {
        Self::new_stage(spec, from, pg, kind, device, trainable, Stage::WHOLE)
    }

    /// [`Gpt::new`] for one pipeline stage. Parameters keep their global names (layer `i` of
    /// the model is `decoder.layers.{i}` on whichever stage holds it).
    ///
    /// # Errors
    /// As [`Gpt::new`]; [`Error::Input`] when the layers do not split into the stages.
    pub fn new_stage(
        spec: GptSpec,
        from: &InitFrom,
        pg: &ProcessGroup,
        kind: Kind,
        device: Device,
        trainable: bool,
        stage: Stage,
    ) -> Result<Gpt, Error> {
        let own = stage.layers(spec.num_layers)?;
        if spec.tp != i64::from(pg.world()) {
            return Err(Error::Input {
                what: "tensor parallel size",
                why: format!(
                    "spec TP {} but the process group has {} ranks",
                    spec.tp,
                    pg.world()
                ),
            });
        }
        let s = spec.clone();
        let std = s.init_std;
        let out_std = if s.scaled_init {
            std / (2.0 * s.num_layers as f64).sqrt()
        } else {
            std
        };
        let mut b = Builder {
            spec: &s,
            from,
            rank: i64::from(pg.rank()),
            kind,
            device,
            params: Vec::new(),
        };
        let n = |x: &str| vec![x.to_string()];
        let emb_names = n("embedding.word_embeddings.weight");
        let emb_shape = [s.padded_vocab, s.hidden];
        let emb = match stage.is_first() {
            true => Some(b.param(&emb_names, Rule::Vocab, &emb_shape, Init::Normal(std))?),
            false => None,
        };
        let pos = match s.positions {
            Positions::Learned { max } if stage.is_first() => Some(b.param(
                &n("embedding.position_embeddings.weight"),
                Rule::Replicated,
                &[max as i64, s.hidden],
                Init::Normal(std),
            )?),
            _ => None,
        };
        let fc1_rows = if s.gated { 2 * s.ffn } else { s.ffn };
        let fc1_rule = if s.gated {
            Rule::GatedFc1
        } else {
            Rule::Column
        };
        let mut layers = Vec::with_capacity(own.len());
        for i in own {
            let p = |x: &str| format!("decoder.layers.{i}.{x}");
            let ln1 = b.norm(&[
                (&p("input_layernorm.weight"), &p("input_layernorm.bias")),
                (
                    &p("self_attention.linear_qkv.layer_norm_weight"),
                    &p("self_attention.linear_qkv.layer_norm_bias"),
                ),
            ])?;
            let qkv_w = b.param(
                &[p("self_attention.linear_qkv.weight")],
                Rule::Qkv,
                &[s.qkv_rows(), s.hidden],
                Init::Normal(std),
            )?;
            let qkv_b = match s.qkv_bias {
                true => Some(b.param(
                    &[p("self_attention.linear_qkv.bias")],
                    Rule::Qkv,
                    &[s.qkv_rows()],
                    Init::Zeros,
                )?),
                false => None,
            };
            let (q_ln, k_ln) = if s.qk_layernorm {
                let qk = |b: &mut Builder, m: &str| {
                    b.norm_of(
                        &[(
                            &p(&format!("self_attention.{m}.weight")),
                            &p(&format!("self_attention.{m}.bias")),
                        )],
                        s.head_dim,
                    )
                };
                (
                    Some(qk(&mut b, "q_layernorm")?),
                    Some(qk(&mut b, "k_layernorm")?),
                )
            } else {
                (None, None)
            };
            let proj_w = b.param(
                &[p("self_attention.linear_proj.weight")],
                Rule::Row,
                &[s.hidden, s.heads * s.head_dim],
                Init::Normal(out_std),
            )?;
            let proj_b = match s.bias {
                true => Some(b.param(
                    &[p("self_attention.linear_proj.bias")],
                    Rule::Replicated,
                    &[s.hidden],
                    Init::Zeros,
                )?),
                false => None,
            };
            // Gemma's post-norms, under NeMo 2's names (TERowParallelLinearLayerNorm)
            let post_norm = |b: &mut Builder, linear: &str| match s.gemma.post_norms {
                true => b
                    .norm(&[(
                        &p(&format!("{linear}.post_layernorm.weight")),
                        &p(&format!("{linear}.post_layernorm.bias")),
                    )])
                    .map(Some),
                false => Ok(None),
            };
            let post_attn = post_norm(&mut b, "self_attention.linear_proj")?;
            let ln2 = b.norm(&[
                (&p("pre_mlp_layernorm.weight"), &p("pre_mlp_layernorm.bias")),
                (
                    &p("mlp.linear_fc1.layer_norm_weight"),
                    &p("mlp.linear_fc1.layer_norm_bias"),
                ),
            ])?;
            let mlp = match &s.moe {
                Some(moe) => {
                    let router = b.param(
                        &[p("mlp.router.weight")],
                        Rule::Replicated,
                        &[moe.experts, s.hidden],
                        Init::Normal(std),
                    )?;
                    let rows = if s.gated { 2 * moe.ffn } else { moe.ffn };
                    let mut experts = Vec::with_capacity(moe.experts as usize);
                    for e in 0..moe.experts {
                        let x = |m: &str| p(&format!("mlp.experts.local_experts.{e}.{m}"));
                        let fc1 = b.param(
                            &[x("linear_fc1.weight")],
                            fc1_rule,
                            &[rows, s.hidden],
                            Init::Normal(std),
                        )?;
                        let fc2 = b.param(
                            &[x("linear_fc2.weight")],
                            Rule::Row,
                            &[s.hidden, moe.ffn],
                            Init::Normal(out_std),
                        )?;
                        experts.push((fc1, fc2));
                    }
                    Mlp::Moe { router, experts }
                }
                None => {
                    let fc1_w = b.param(
                        &[p("mlp.linear_fc1.weight")],
                        fc1_rule,
                        &[fc1_rows, s.hidden],
                        Init::Normal(std),
                    )?;
                    let fc1_b = match s.bias {
                        true => Some(b.param(
                            &[p("mlp.linear_fc1.bias")],
                            fc1_rule,
                            &[fc1_rows],
                            Init::Zeros,
                        )?),
                        false => None,
                    };
                    let fc2_w = b.param(
                        &[p("mlp.linear_fc2.weight")],
                        Rule::Row,
                        &[s.hidden, s.ffn],
                        Init::Normal(out_std),
                    )?;
                    let fc2_b = match s.bias {
                        true => Some(b.param(
                            &[p("mlp.linear_fc2.bias")],
                            Rule::Replicated,
                            &[s.hidden],
                            Init::Zeros,
                        )?),
                        false => None,
                    };
                    Mlp::Dense {
                        fc1_w,
                        fc1_b,
                        fc2_w,
                        fc2_b,
                    }
                }
            };
            let post_mlp = post_norm(&mut b, "mlp.linear_fc2")?;
            let windowed = s.window.is_some() && s.window_layers.get(i).copied().unwrap_or(true);
            layers.push(Layer {
                windowed,
                ln1,
                qkv_w,
                qkv_b,
                q_ln,
                k_ln,
                proj_w,
                proj_b,
                post_attn,
                post_mlp,
                ln2,
                mlp,
            });
        }
        let (final_norm, output) = if stage.is_last() {
            let norm = b.norm(&[(
                "decoder.final_layernorm.weight",
                "decoder.final_layernorm.bias",
            )])?;
            let out_name = "output_layer.weight".to_string();
            let output = match (s.tied, &emb) {
                (true, Some(e)) => e.shallow_clone(),
                // the last stage's copy of the tied embeddings starts as they do and
                // receives the same summed gradient ([`Gpt::tied_copy`])
                (true, None) => b.param_as(
                    out_name,
                    &emb_names,
                    Rule::Vocab,
                    &emb_shape,
                    Init::Normal(std),
                )?,
                (false, _) => b.param(&[out_name], Rule::Vocab, &emb_shape, Init::Normal(std))?,
            };
            (Some(norm), Some(output))
        } else {
            (None, None)
        };
        let params = b.params;
        for p in &params {
            // a fresh leaf either way: loaded and initialised tensors carry no history
            let _ = p.tensor.set_requires_grad(trainable);
        }
        Ok(Gpt {
            spec,
            stage,
            pg: pg.clone(),
            device,
            kind,
            params,
            emb,
            pos,
            layers,
            final_norm,
            output,
            rope: std::sync::Mutex::new(None),
            moe_balance: std::sync::Mutex::new((0.0, 0)),
        })
    }

    /// The rotary tables for sequence length `s` (cached), or None without rotary positions.
    fn rope(&self, s: i64) -> Ropes {
        let mut cache = self.rope.lock().unwrap_or_else(|p| p.into_inner());
        match &*cache {
            Some((len, r)) if *len == s => r.shallow_clone(),
            _ => {
                let positions = &self.spec.positions;
                let local = match (positions, self.spec.gemma.local_rope_base) {
                    // Gemma 3's windowed layers: their own base, without the global scaling
                    (
                        Positions::Rope {
                            rot_dim,
                            interleaved,
                            ..
                        },
                        Some(base),
                    ) => Positions::Rope {
                        rot_dim: *rot_dim,
                        base,
                        interleaved: *interleaved,
                        interpolation: None,
                        scaling: None,
                    },
                    _ => Positions::None,
                };
                let r = Ropes {
                    global: rope::Rope::new(positions, s, self.device, self.kind),
                    local: rope::Rope::new(&local, s, self.device, self.kind),
                };
                let out = r.shallow_clone();
                *cache = Some((s, r));
                out
            }
        }
    }

    /// The MoE layers' load-balancing losses recorded since the last call: their sum and
    /// count (a recomputed forward records its layer again, with the same value, so the mean
    /// is unchanged).
    pub fn take_moe_balance(&self) -> (f64, u64) {
        let mut g = self.moe_balance.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *g, (0.0, 0))
    }

    /// The parameter shards, in construction order (the tied output layer is not repeated).
    pub fn params(&self) -> &[NamedParam] {
        &self.params
    }

    /// The process group.
    pub fn group(&self) -> &ProcessGroup {
        &self.pg
    }

    /// Parameter dtype.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Device.
    pub fn device(&self) -> Device {
        self.device
    }

    fn norm(&self, x: &Tensor, n: &NormW) -> Tensor {
        let h = *n.w.size().first().unwrap_or(&self.spec.hidden);
        match self.spec.norm {
            Norm::Rms => x.rms_norm([h], Some(&n.w), self.spec.eps),
            Norm::Rms1p => {
                let w = &n.w + 1.0;
                x.rms_norm([h], Some(&w), self.spec.eps)
            }
            Norm::LayerNorm => x.layer_norm([h], Some(&n.w), n.b.as_ref(), self.spec.eps, false),
            Norm::LayerNorm1p => {
                let w = &n.w + 1.0;
                x.layer_norm([h], Some(&w), n.b.as_ref(), self.spec.eps, false)
            }
        }
    }

    fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
        let y = x.matmul(&w.tr());
        match b {
            Some(b) => y + b,
            None => y,
        }
    }

    fn act(&self, x: &Tensor) -> Tensor {
        match self.spec.activation {
            Activation::Silu => x.silu(),
            Activation::Gelu => x.gelu("none"),
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::Relu => x.relu(),
            Activation::SquaredRelu => x.relu().square(),
        }
    }

    /// Final hidden states `[b, s, H]` (after the final norm) for token ids `[b, s]`.
    ///
    /// # Errors
    /// [`Error::Input`] for a non-2-D or non-integer token tensor or a sequence longer than
    /// the learned position table; collective errors.
    pub fn hidden(&self, tokens: &Tensor) -> Result<Tensor, Error> {
        let x = self.embed(tokens)?;
        let x = self.layers_on(0..self.layers.len(), x)?;
        self.final_norm_of(&x)
    }

    /// [`Gpt::hidden`] that also returns the outputs of `sites` (in order), with their graph.
    ///
    /// # Errors
    /// As [`Gpt::hidden`]; [`Error::Input`] for a site this model does not have.
    pub fn hidden_captured(
        &self,
        tokens: &Tensor,
        sites: &[Site],
    ) -> Result<(Tensor, Vec<Tensor>), Error> {
        self.stage_captured(StageInput::Tokens(tokens), sites)
    }

    /// [`Gpt::stage_output`] that also returns the outputs of `sites` (in order), with their
    /// graph; every site must be on this stage.
    ///
    /// # Errors
    /// As [`Gpt::stage_output`]; [`Error::Input`] for a site this stage does not hold.
    pub fn stage_captured(
        &self,
        input: StageInput,
        sites: &[Site],
    ) -> Result<(Tensor, Vec<Tensor>), Error> {
        let mut caps: Vec<Option<Tensor>> = sites.iter().map(|_| None).collect();
        let mut put = |site: Site, t: &Tensor| {
            for (slot, want) in caps.iter_mut().zip(sites) {
                if *want == site {
                    *slot = Some(t.shallow_clone());
                }
            }
        };
        let mut x = self.stage_input(input)?;
        if self.stage.is_first() {
            put(Site::Embedding, &x);
        }
        let offset = self.stage.layers(self.spec.num_layers)?.start;
        let (b, s) = (x.size()[0], x.size()[1]);
        let rope = self.rope(s);
        for (li, l) in self.layers.iter().enumerate() {
            let i = offset + li;
            x = self.layer_captured(l, x, b, s, &rope, Some((i, &mut put)))?;
            put(Site::Layer(i), &x);
        }
        let h = match self.stage.is_last() {
            true => {
                let h = self.final_norm_of(&x)?;
                put(Site::FinalNorm, &h);
                h
            }
            false => x,
        };
        let mut out = Vec::with_capacity(sites.len());
        for (c, site) in caps.into_iter().zip(sites) {
            out.push(c.ok_or_else(|| Error::Input {
                what: "intermediate layer",
                why: format!(
                    "{site:?} is not in this {}-layer model{}",
                    self.spec.num_layers,
                    if self.stage.count > 1 {
                        format!(
                            "'s stage {} of {} (pairs must be on the last pipeline stage, as in ModelOpt)",
                            self.stage.index, self.stage.count
                        )
                    } else {
                        String::new()
                    }
                ),
            })?);
        }
        Ok((h, out))
    }

    /// This stage's output for `input`: the next stage's input, or on the last stage the
    /// final hidden states (no activations are kept apart from autograd's own).
    ///
    /// # Errors
    /// As [`Gpt::hidden`]; [`Error::Input`] for tokens given to a later stage or hidden
    /// states given to the first.
    pub fn stage_output(&self, input: StageInput) -> Result<Tensor, Error> {
        let x = self.stage_input(input)?;
        let x = self.layers_on(0..self.layers.len(), x)?;
        match self.stage.is_last() {
            true => self.final_norm_of(&x),
            false => Ok(x),
        }
    }

    fn stage_input(&self, input: StageInput) -> Result<Tensor, Error> {
        match (input, self.stage.is_first()) {
            (StageInput::Tokens(t), true) => self.embed(t),
            (StageInput::Hidden(h), false) => Ok(h.to_device(self.device)),
            (_, first) => Err(Error::Input {
                what: "pipeline stage",
                why: format!(
                    "stage {} of {} takes {}",
                    self.stage.index,
                    self.stage.count,
                    if first {
                        "token ids"
                    } else {
                        "the previous stage's hidden states"
                    }
                ),
            }),
        }
    }

    fn final_norm_of(&self, x: &Tensor) -> Result<Tensor, Error> {
        match &self.final_norm {
            Some(n) => Ok(self.norm(x, n)),
            None => Err(self.not_here("the final norm")),
        }
    }

    fn not_here(&self, what: &str) -> Error {
        Error::Input {
            what: "pipeline stage",
            why: format!(
                "stage {} of {} does not hold {what}",
                self.stage.index, self.stage.count
            ),
        }
    }

    /// The embedding output `[b, s, H]` (word plus learned positions) of token ids `[b, s]`.
    fn embed(&self, tokens: &Tensor) -> Result<Tensor, Error> {
        let emb = self
            .emb
            .as_ref()
            .ok_or_else(|| self.not_here("the embeddings"))?;
        let size = tokens.size();
        let [_, s] = size[..] else {
            return Err(Error::Input {
                what: "tokens",
                why: format!("expected [batch, seq], got {size:?}"),
            });
        };
        if !matches!(tokens.kind(), Kind::Int64 | Kind::Int) {
            return Err(Error::Input {
                what: "tokens",
                why: format!("expected integer ids, got {:?}", tokens.kind()),
            });
        }
        let spec = &self.spec;
        if tokens.numel() > 0 {
            // out-of-range ids would make the embedding lookup fail inside libtorch
            let (lo, hi) = (tokens.min().int64_value(&[]), tokens.max().int64_value(&[]));
            if lo < 0 || hi >= spec.padded_vocab {
                return Err(Error::Input {
                    what: "tokens",
                    why: format!(
                        "ids span [{lo}, {hi}] but the vocabulary has {} rows",
                        spec.padded_vocab
                    ),
                });
            }
        }
        let tokens = tokens.to_device(self.device).to_kind(Kind::Int64);
        let tp = spec.tp;
        // vocab-parallel embedding: each rank looks up its rows, zeros elsewhere, then sum
        let vp = spec.padded_vocab / tp;
        let start = i64::from(self.pg.rank()) * vp;
        let mut x = if tp == 1 {
            Tensor::embedding(emb, &tokens, -1, false, false)
        } else {
            let outside = tokens.lt(start).logical_or(&tokens.ge(start + vp));
            let idx = (&tokens - start).masked_fill(&outside, 0);
            let part = Tensor::embedding(emb, &idx, -1, false, false)
                .masked_fill(&outside.unsqueeze(-1), 0.0);
            self.pg.reduce_from_tp(&part)?
        };
        if let Some(pos) = &self.pos {
            let max = pos.size()[0];
            if s > max {
                return Err(Error::Input {
                    what: "tokens",
                    why: format!("sequence {s} exceeds max_position_embeddings {max}"),
                });
            }
            x += pos.narrow(0, 0, s).unsqueeze(0);
        }
        if spec.gemma.scale_embedding {
            // sqrt(H) rounded to the model dtype first, as transformers' Gemma does
            let scale = Tensor::from((spec.hidden as f64).sqrt())
                .to_kind(x.kind())
                .to_device(x.device());
            x = &x * scale;
        }
        Ok(x)
    }

    /// One transformer layer on `x` `[b, s, H]`.
    fn layer(&self, l: &Layer, x: Tensor, b: i64, s: i64, rope: &Ropes) -> Result<Tensor, Error> {
        self.layer_captured(l, x, b, s, rope, None)
    }

    /// [`Gpt::layer`], handing its two norm outputs to `cap` (with the layer's global index).
    fn layer_captured(
        &self,
        l: &Layer,
        mut x: Tensor,
        b: i64,
        s: i64,
        rope: &Ropes,
        mut cap: Option<(usize, Capture)>,
    ) -> Result<Tensor, Error> {
        let spec = &self.spec;
        let tp = spec.tp;
        let hpg = spec.heads_per_group();
        let gl = spec.groups / tp;
        let d = spec.head_dim;
        // attention
        let n1 = self.norm(&x, &l.ln1);
        if let Some((i, f)) = cap.as_mut() {
            f(Site::InputNorm(*i), &n1);
        }
        let h = self.pg.copy_to_tp(&n1)?;
        let qkv = Self::linear(&h, &l.qkv_w, l.qkv_b.as_ref()).view([b, s, gl, hpg + 2, d]);
        let mut q = qkv.narrow(3, 0, hpg).reshape([b, s, gl * hpg, d]);
        let mut k = qkv.narrow(3, hpg, 1).reshape([b, s, gl, d]);
        let v = qkv.narrow(3, hpg + 1, 1).reshape([b, s, gl, d]);
        // mcore's q_layernorm / k_layernorm: per head, before the rotary embedding. Each rank
        // normalises its own heads with the shared weights, so their gradient is the sum of
        // the ranks' (copy_to_tp: identity forward, all-reduce backward)
        if let (Some(qn), Some(kn)) = (&l.q_ln, &l.k_ln) {
            let shared = |n: &NormW| -> Result<NormW, Error> {
                Ok(NormW {
                    w: self.pg.copy_to_tp(&n.w)?,
                    b: n.b.as_ref().map(|b| self.pg.copy_to_tp(b)).transpose()?,
                })
            };
            q = self.norm(&q, &shared(qn)?);
            k = self.norm(&k, &shared(kn)?);
        }
        if let Some(r) = rope.of(l) {
            q = r.apply(&q);
            k = r.apply(&k);
        }
        // [b, heads, s, d] and [b, groups, s, d]: each group's k/v serves its hpg
        // consecutive query heads (SDPA's enable_gqa, which is repeat_interleave's
        // grouping without materialising the copies)
        let q = q.transpose(1, 2);
        let k = k.transpose(1, 2);
        let v = v.transpose(1, 2);
        // a sliding window narrower than the sequence: causal and at most `left` keys back
        // (megatron-core's get_sliding_window_causal_mask), as an explicit mask
        let window = spec.window.filter(|&(left, _)| l.windowed && left < s - 1);
        let gemma = &spec.gemma;
        let causal_or_window = |left: Option<i64>| {
            let i = Tensor::arange(s, (Kind::Int64, q.device())).unsqueeze(1);
            let j = Tensor::arange(s, (Kind::Int64, q.device())).unsqueeze(0);
            let causal = j.le_tensor(&i);
            match left {
                Some(left) => causal.logical_and(&j.ge_tensor(&(&i - left))),
                None => causal,
            }
        };
        let ctx = match gemma.attn_softcap {
            // Gemma 2's soft-capped scores (`cap * tanh(scores / cap)`, then the mask) have
            // no fused kernel: eager attention, softmax in fp32 as transformers does
            Some(cap) => {
                let scale = gemma.softmax_scale.unwrap_or(1.0 / (d as f64).sqrt());
                let k = k.repeat_interleave_self_int(hpg, Some(1), None);
                let v = v.repeat_interleave_self_int(hpg, Some(1), None);
                let scores = q.matmul(&k.transpose(-2, -1)) * scale;
                let scores = (scores / cap).tanh() * cap;
                let allowed = causal_or_window(window.map(|(left, _)| left));
                let scores = scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
                scores.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(&v)
            }
            None => {
                let mask = window.map(|(left, _)| causal_or_window(Some(left)));
                Tensor::scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    mask.as_ref(),
                    0.0,
                    mask.is_none(),
                    gemma.softmax_scale,
                    hpg > 1,
                )
            }
        };
        let ctx = ctx.transpose(1, 2).reshape([b, s, gl * hpg * d]);
        let mut o = self
            .pg
            .reduce_from_tp(&Self::linear(&ctx, &l.proj_w, None))?;
        if let Some(bias) = &l.proj_b {
            o = &o + bias;
        }
        if let Some(n) = &l.post_attn {
            o = self.norm(&o, n);
        }
        x = &x + o;
        // MLP
        let n2 = self.norm(&x, &l.ln2);
        if let Some((i, f)) = cap.as_mut() {
            f(Site::PreMlpNorm(*i), &n2);
        }
        let h = self.pg.copy_to_tp(&n2)?;
        match &l.mlp {
            Mlp::Dense {
                fc1_w,
                fc1_b,
                fc2_w,
                fc2_b,
            } => {
                let a = self.glu(&Self::linear(&h, fc1_w, fc1_b.as_ref()));
                let mut o = self.pg.reduce_from_tp(&Self::linear(&a, fc2_w, None))?;
                if let Some(bias) = fc2_b {
                    o = &o + bias;
                }
                if let Some(n) = &l.post_mlp {
                    o = self.norm(&o, n);
                }
                x = &x + o;
            }
            Mlp::Moe { router, experts } => {
                let mut o = self.moe(&h, router, experts)?;
                if let Some(n) = &l.post_mlp {
                    o = self.norm(&o, n);
                }
                // not `+=`: the norm above keeps `x` for its backward
                x = &x + o;
            }
        }
        Ok(x)
    }

    /// The activation of fc1's output (gated: `act(gate) * up`).
    fn glu(&self, f: &Tensor) -> Tensor {
        if self.spec.gated {
            let gu = f.chunk(2, -1);
            self.act(&gu[0]) * &gu[1]
        } else {
            self.act(f)
        }
    }

    /// megatron-core's MoELayer on `h` `[b, s, H]` (every rank holds every token): the router
    /// picks each token's top-k experts — softmax over all experts then top-k
    /// (`moe_router_pre_softmax`), or top-k of the logits then a softmax over those k — and
    /// each expert's MLP (its TP shard) runs on its tokens; the outputs, weighted by the
    /// routing probabilities, are summed per token and over TP ranks.
    fn moe(
        &self,
        h: &Tensor,
        router: &Tensor,
        experts: &[(Tensor, Tensor)],
    ) -> Result<Tensor, Error> {
        let Some(moe) = &self.spec.moe else {
            return Err(Error::Input {
                what: "num_moe_experts",
                why: "an MoE layer without the MoE settings".to_string(),
            });
        };
        let size = h.size();
        let hidden = *size.last().unwrap_or(&0);
        let flat = h.reshape([-1, hidden]);
        // each rank's expert outputs are partial sums, so the routing weights' gradient is
        // too: the router's weight gets the ranks' sum (copy_to_tp: all-reduce backward), as
        // megatron-core's gather of the probabilities over TP gives it
        let logits = flat.matmul(&self.pg.copy_to_tp(router)?.tr());
        let (probs, top) = if moe.pre_softmax {
            let scores = logits.softmax(-1, Kind::Float);
            scores.topk(moe.topk, -1, true, true)
        } else {
            let (v, i) = logits.topk(moe.topk, -1, true, true);
            (v.softmax(-1, Kind::Float), i)
        };
        let probs = probs.to_kind(flat.kind());
        // megatron-core's switch load-balancing loss, unscaled: E · Σ_i f_i · P_i with f_i the
        // share of the T·k assignments that go to expert i and P_i its mean router probability
        let lb = tch::no_grad(|| {
            let t = flat.size()[0] as f64;
            let all = logits.softmax(-1, Kind::Float);
            let counts = Tensor::zeros([moe.experts], (Kind::Float, all.device())).scatter_add(
                0,
                &top.reshape([-1]),
                &Tensor::ones([top.numel() as i64], (Kind::Float, all.device())),
            );
            let p = all.sum_dim_intlist(0, false, Kind::Float) / t;
            let f = counts / (t * moe.topk as f64);
            (f * p).sum(Kind::Double).double_value(&[]) * moe.experts as f64
        });
        {
            let mut g = self.moe_balance.lock().unwrap_or_else(|p| p.into_inner());
            g.0 += lb;
            g.1 += 1;
        }
        let mut out = flat.zeros_like();
        for (e, (fc1, fc2)) in experts.iter().enumerate() {
            // the tokens routed to expert e, and their weight for it
            let hit = top.eq(e as i64);
            let rows = hit.any_dim(-1, false).nonzero().squeeze_dim(-1);
            if rows.size()[0] == 0 {
                continue;
            }
            let w = (probs.index_select(0, &rows)
                * hit.index_select(0, &rows).to_kind(probs.kind()))
            .sum_dim_intlist(-1, true, probs.kind());
            let y = Self::linear(
                &self.glu(&Self::linear(&flat.index_select(0, &rows), fc1, None)),
                fc2,
                None,
            );
            out = out.index_add(0, &rows, &(y * w));
        }
        Ok(self.pg.reduce_from_tp(&out)?.reshape(size.as_slice()))
    }

    /// Layers `range` on `x`.
    fn layers_on(&self, range: Range<usize>, mut x: Tensor) -> Result<Tensor, Error> {
        let (b, s) = (x.size()[0], x.size()[1]);
        let rope = self.rope(s);
        for l in &self.layers[range] {
            x = self.layer(l, x, b, s, &rope)?;
        }
        Ok(x)
    }

    /// [`Gpt::hidden`] keeping only what `recompute` says: the inputs of checkpointed layer
    /// groups instead of their activations. [`Checkpointed::backward`] re-runs those groups
    /// one at a time, last first, so at most one group's activations are alive.
    ///
    /// # Errors
    /// As [`Gpt::hidden`].
    pub fn hidden_checkpointed(
        &self,
        tokens: &Tensor,
        recompute: Recompute,
    ) -> Result<Checkpointed, Error> {
        self.stage_checkpointed(StageInput::Tokens(tokens), recompute)
    }

    /// [`Gpt::stage_output`] keeping activations as `recompute` says, for
    /// [`Checkpointed::backward`] (which returns the gradient of a hidden-state input).
    ///
    /// # Errors
    /// As [`Gpt::stage_output`].
    pub fn stage_checkpointed(
        &self,
        input: StageInput,
        recompute: Recompute,
    ) -> Result<Checkpointed, Error> {
        let first = self.stage.is_first();
        let x0 = self.stage_input(input)?;
        let embedded = first.then(|| x0.shallow_clone());
        let mut x = x0;
        let mut segments = Vec::new();
        for (range, checkpoint) in recompute.segments(self.layers.len()) {
            let input = x.detach().set_requires_grad(true);
            let (next, output) = if checkpoint {
                let out = tch::no_grad(|| self.layers_on(range.clone(), input.shallow_clone()))?;
                (out, None)
            } else {
                let out = self.layers_on(range.clone(), input.shallow_clone())?;
                (out.shallow_clone(), Some(out))
            };
            segments.push(Segment {
                layers: range,
                input,
                output,
            });
            x = next;
        }
        let final_input = x.detach().set_requires_grad(true);
        let hidden = match self.stage.is_last() {
            true => self.final_norm_of(&final_input)?,
            false => final_input.shallow_clone(),
        };
        Ok(Checkpointed {
            embedded,
            segments,
            final_input,
            hidden,
        })
    }

    /// This rank's vocab slice of the logits, `[.., V/TP]`, for hidden states `[.., H]`.
    ///
    /// # Errors
    /// Collective errors.
    pub fn logits_from_hidden(&self, h: &Tensor) -> Result<Tensor, Error> {
        let out = self
            .output
            .as_ref()
            .ok_or_else(|| self.not_here("the output layer"))?;
        let logits = self.pg.copy_to_tp(h)?.matmul(&out.tr());
        Ok(match self.spec.gemma.final_softcap {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        })
    }

    /// The last stage's copy of tied word embeddings at PP > 1 (the first stage holds the
    /// embeddings themselves): the two get the sum of their gradients each step.
    pub fn tied_copy(&self) -> Option<&NamedParam> {
        if !(self.spec.tied && self.stage.is_last() && !self.stage.is_first()) {
            return None;
        }
        self.params.iter().find(|p| p.name == "output_layer.weight")
    }

    /// The word embeddings, on the first stage.
    pub fn word_embeddings(&self) -> Option<&NamedParam> {
        if !self.stage.is_first() {
            return None;
        }
        self.params
            .iter()
            .find(|p| p.name == "embedding.word_embeddings.weight")
    }

    /// Local logits `[b, s, V/TP]` (mcore `parallel_output=True`).
    ///
    /// # Errors
    /// As [`Gpt::hidden`].
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor, Error> {
        let h = self.hidden(tokens)?;
        self.logits_from_hidden(&h)
    }

    /// Full logits `[b, s, V]` gathered over TP (differentiable).
    ///
    /// # Errors
    /// As [`Gpt::hidden`].
    pub fn forward_gathered(&self, tokens: &Tensor) -> Result<Tensor, Error> {
        let local = self.forward(tokens)?;
        Ok(self.pg.gather_from_tp(&local)?)
    }

    /// The canonical (TP=1) form of a per-rank tensor shaped like parameter `p` (its value
    /// or its gradient), gathered from every rank: the inverse of the TP split.
    ///
    /// # Errors
    /// Collective errors.
    pub fn gather_canonical(&self, p: &NamedParam, t: &Tensor) -> Result<Tensor, Error> {
        let parts = self.pg.all_gather(t)?;
        let nd = t.dim();
        Ok(match p.rule.split_dim(nd) {
            None => parts
                .into_iter()
                .next()
                .unwrap_or_else(|| t.shallow_clone()),
            Some(d) if p.rule == Rule::GatedFc1 => {
                let halves: Vec<Vec<Tensor>> = parts.iter().map(|x| x.chunk(2, d as i64)).collect();
                let gates: Vec<&Tensor> = halves.iter().filter_map(|h| h.first()).collect();
                let ups: Vec<&Tensor> = halves.iter().filter_map(|h| h.get(1)).collect();
                Tensor::cat(
                    &[Tensor::cat(&gates, d as i64), Tensor::cat(&ups, d as i64)],
                    d as i64,
                )
            }
            Some(d) => Tensor::cat(&parts, d as i64),
        })
    }
}

/// Activation recompute (NeMo's `activations_checkpoint_granularity` / `_method` /
/// `_num_layers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recompute {
    /// Every activation is kept for the backward pass.
    None,
    /// `selective`: recompute the attention core. Our attention is one fused
    /// scaled-dot-product kernel whose backward recomputes the attention probabilities (the
    /// `s × s` tensors selective recompute exists to drop), so nothing more is stored.
    Selective,
    /// `full` + `uniform`: layers in groups of `n`; each group keeps only its input and is
    /// recomputed in the backward pass.
    Uniform(usize),
    /// `full` + `block`: the first `n` layers each keep only their input and are recomputed;
    /// the other layers keep their activations.
    Block(usize),
}

impl Recompute {
    /// `(layers, checkpointed)` groups covering `0..layers` in order.
    pub fn segments(self, layers: usize) -> Vec<(Range<usize>, bool)> {
        match self {
            Recompute::None | Recompute::Selective => vec![(0..layers, false)],
            Recompute::Uniform(n) => {
                let n = n.max(1);
                (0..layers)
                    .step_by(n)
                    .map(|a| (a..(a + n).min(layers), true))
                    .collect()
            }
            Recompute::Block(n) => {
                let n = n.min(layers);
                let mut v: Vec<_> = (0..n).map(|a| (a..a + 1, true)).collect();
                if n < layers {
                    v.push((n..layers, false));
                }
                v
            }
        }
    }
}

/// One group of layers of a [`Checkpointed`] forward.
#[derive(Debug)]
struct Segment {
    layers: Range<usize>,
    /// The group's input (a leaf that collects its gradient).
    input: Tensor,
    /// Its output with the autograd graph, when its activations were kept.
    output: Option<Tensor>,
}

/// A forward pass that kept only some activations (see [`Gpt::hidden_checkpointed`]).
#[derive(Debug)]
pub struct Checkpointed {
    /// The first stage's embedding output (with its graph).
    embedded: Option<Tensor>,
    segments: Vec<Segment>,
    final_input: Tensor,
    /// The stage's output `[b, s, H]`: final hidden states (with the final norm's graph) on
    /// the last stage, the last layer's output elsewhere.
    pub hidden: Tensor,
}

/// What a pipeline stage starts from.
#[derive(Debug, Clone, Copy)]
pub enum StageInput<'a> {
    /// Token ids `[b, s]` (the first stage).
    Tokens(&'a Tensor),
    /// The previous stage's output `[b, s, H]`.
    Hidden(&'a Tensor),
}

impl Checkpointed {
    /// Backpropagates `grad` (of [`Checkpointed::hidden`]) into the parameters of `model`
    /// (the model that made it): the final norm, then each layer group from the last,
    /// recomputing the checkpointed ones, then the embedding. Returns the gradient of a
    /// hidden-state input (what a pipeline stage sends back), None on the first stage.
    ///
    /// # Errors
    /// Collective and autograd errors.
    pub fn backward(self, model: &Gpt, grad: &Tensor) -> Result<Option<Tensor>, Error> {
        let push = |out: &Tensor, g: &Tensor| -> Result<(), Error> {
            (out * g.detach())
                .sum(Kind::Float)
                .f_backward()
                .map_err(|e| Error::Input {
                    what: "backward",
                    why: e.to_string(),
                })
        };
        let mut g = if model.stage.is_last() {
            push(&self.hidden, grad)?;
            self.final_input.grad()
        } else {
            grad.shallow_clone()
        };
        for seg in self.segments.into_iter().rev() {
            if !g.defined() {
                break;
            }
            let out = match seg.output {
                Some(o) => o,
                None => model.layers_on(seg.layers.clone(), seg.input.shallow_clone())?,
            };
            push(&out, &g)?;
            g = seg.input.grad();
        }
        match self.embedded {
            Some(e) => {
                if g.defined() && e.requires_grad() {
                    push(&e, &g)?;
                }
                Ok(None)
            }
            None => Ok(g.defined().then_some(g)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;

    fn tiny(cfg: &str, tp: u64) -> GptSpec {
        let base = "num_layers: 1\nhidden_size: 16\nffn_hidden_size: 24\nnum_attention_heads: 4\n\
                    max_position_embeddings: 8\n";
        let c = ModelConfig::parse(&format!("{base}{cfg}")).unwrap_or_else(|e| panic!("{e}"));
        GptSpec::from_config(&c, tp, 32).unwrap_or_else(|e| panic!("{e}"))
    }

    fn build(spec: GptSpec) -> Gpt {
        random(&spec, Kind::Float, 3, true)
    }

    /// A single-rank CPU model of `spec` with random weights.
    fn random(spec: &GptSpec, kind: Kind, seed: i64, train: bool) -> Gpt {
        Gpt::new(
            spec.clone(),
            &InitFrom::Random { seed },
            &ProcessGroup::single(),
            kind,
            Device::Cpu,
            train,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn gpt_variant_runs_and_ties_embeddings() {
        let m = build(tiny(
            "normalization: layernorm\nactivation: gelu\nbias: true\n",
            1,
        ));
        // tied: no separate output layer parameter; learned positions present
        let names: Vec<&str> = m.params().iter().map(|p| p.name.as_str()).collect();
        assert!(!names.contains(&"output_layer.weight"));
        assert!(names.contains(&"embedding.position_embeddings.weight"));
        let tokens = Tensor::from_slice(&[1i64, 5, 7, 31]).view([1, 4]);
        let logits = m.forward(&tokens).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(logits.size(), vec![1, 4, 32]);
        logits.sum(Kind::Float).backward();
        assert!(m.params().iter().all(|p| p.tensor.grad().defined()));
    }

    #[test]
    fn causal_logits_ignore_the_future() {
        let m = build(tiny("normalization: rmsnorm\nactivation: fast-swiglu\nbias: false\nposition_embedding_type: rope\n", 1));
        let a = Tensor::from_slice(&[1i64, 2, 3, 4]).view([1, 4]);
        let b = Tensor::from_slice(&[1i64, 2, 3, 9]).view([1, 4]);
        let (la, lb) = tch::no_grad(|| (m.forward(&a), m.forward(&b)));
        let (la, lb) = (
            la.unwrap_or_else(|e| panic!("{e}")),
            lb.unwrap_or_else(|e| panic!("{e}")),
        );
        assert!(la
            .narrow(1, 0, 3)
            .allclose(&lb.narrow(1, 0, 3), 1e-6, 1e-6, false));
        assert!(!la
            .narrow(1, 3, 1)
            .allclose(&lb.narrow(1, 3, 1), 1e-6, 1e-6, false));
    }

    #[test]
    fn bad_tokens_are_input_errors() {
        let m = build(tiny("position_embedding_type: learned_absolute\n", 1));
        let too_big = Tensor::from_slice(&[0i64, 32]).view([1, 2]);
        assert!(matches!(
            m.forward(&too_big),
            Err(Error::Input { what: "tokens", .. })
        ));
        let too_long = Tensor::zeros([1, 9], (Kind::Int64, Device::Cpu));
        assert!(matches!(m.forward(&too_long), Err(Error::Input { .. })));
        let flat = Tensor::zeros([4], (Kind::Int64, Device::Cpu));
        assert!(matches!(m.forward(&flat), Err(Error::Input { .. })));
    }

    #[test]
    fn recompute_gives_the_same_loss_and_gradients() {
        let c = ModelConfig::parse(
            "num_layers: 5\nhidden_size: 16\nffn_hidden_size: 24\nnum_attention_heads: 4\n\
             normalization: rmsnorm\nactivation: fast-swiglu\nbias: false\nposition_embedding_type: rope\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let spec = GptSpec::from_config(&c, 1, 32).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spec.num_layers, 5);
        let mk = |seed, train| random(&spec, Kind::Float, seed, train);
        let teacher = mk(2, false);
        let tokens = Tensor::from_slice(&[3i64, 1, 4, 1, 5, 9, 2, 6]).view([2, 4]);
        let mask = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
        let k = crate::distill::loss::KdLoss::new(crate::distill::loss::LossKind::ForwardKl, 1.0)
            .unwrap_or_else(|e| panic!("{e}"));
        let run = |rc: Recompute| {
            let student = mk(1, true);
            let l = k
                .chunked_backward_with(&student, &teacher, &tokens, &mask, 3, rc)
                .unwrap_or_else(|e| panic!("{e}"));
            let grads: Vec<Tensor> = student
                .params()
                .iter()
                .map(|p| p.tensor.grad().copy())
                .collect();
            (l, grads)
        };
        let (l0, g0) = run(Recompute::None);
        for rc in [
            Recompute::Selective,
            Recompute::Uniform(1),
            Recompute::Uniform(2),
            Recompute::Block(2),
            Recompute::Block(9),
        ] {
            let (l, g) = run(rc);
            assert!((l - l0).abs() <= 1e-6, "{rc:?}: loss {l} vs {l0}");
            assert_eq!(g.len(), g0.len());
            for (a, b) in g.iter().zip(&g0) {
                assert!(a.defined() && b.defined(), "{rc:?}: a gradient is missing");
                let d = (a - b).abs().max().double_value(&[]);
                assert!(d <= 1e-6, "{rc:?}: gradient differs by {d}");
            }
        }
        assert_eq!(
            Recompute::Uniform(2).segments(5),
            vec![(0..2, true), (2..4, true), (4..5, true)]
        );
        assert_eq!(
            Recompute::Block(2).segments(5),
            vec![(0..1, true), (1..2, true), (2..5, false)]
        );
    }

    #[test]
    fn bf16_model_trains_through_the_chunked_loss() {
        let spec = tiny("normalization: rmsnorm\nactivation: fast-swiglu\nbias: false\nposition_embedding_type: rope\n", 1);
        let mk = |seed, train| random(&spec, Kind::BFloat16, seed, train);
        let (student, teacher) = (mk(1, true), mk(2, false));
        let tokens = Tensor::from_slice(&[3i64, 1, 4, 1, 5, 9, 2, 6]).view([2, 4]);
        let mask = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
        let k = crate::distill::loss::KdLoss::new(crate::distill::loss::LossKind::ForwardKl, 1.0)
            .unwrap_or_else(|e| panic!("{e}"));
        let l = k
            .chunked_backward(&student, &teacher, &tokens, &mask, 3)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(l.is_finite() && l > 0.0, "{l}");
        for p in student.params() {
            let g = p.tensor.grad();
            assert_eq!(g.kind(), Kind::BFloat16, "{}", p.name);
            assert!(f64::try_from(g.to_kind(Kind::Float).abs().sum(Kind::Float))
                .unwrap_or(f64::NAN)
                .is_finite());
        }
    }

    #[test]
    fn tp_mismatch_is_refused() {
        let pg = ProcessGroup::single();
        let r = Gpt::new(
            tiny("", 2),
            &InitFrom::Random { seed: 1 },
            &pg,
            Kind::Float,
            Device::Cpu,
            false,
        );
        assert!(matches!(
            r,
            Err(Error::Input {
                what: "tensor parallel size",
                ..
            })
        ));
    }

    #[test]
    fn random_init_is_the_same_at_any_tp() {
        // TP2 rank shards sliced from the same seeded canonical tensors as TP1
        let full = normal(&[6, 2], 1.0, 9);
        let again = normal(&[6, 2], 1.0, 9);
        assert!(full.equal(&again));
        let g = slice_canonical(&full, Rule::GatedFc1, 1, 2);
        assert!(g.equal(&Tensor::cat(
            &[full.narrow(0, 1, 1), full.narrow(0, 4, 1)],
            0
        )));
        let std = f64::try_from(normal(&[4096], 0.5, 1).std(true)).unwrap_or(0.0);
        assert!((std - 0.5).abs() < 0.03, "{std}");
    }
}
