//! Intermediate-layer (hidden-state) distillation losses, as ModelOpt's Megatron plugin defines
//! them (`intermediate_layer_pairs`): a named module output of the student against one of the
//! teacher, per token, cosine (`HiddenStateCosineLoss`, the default) or MSE (`MSELoss`), the
//! student's side first mapped by one shared trained projection `Linear(h_student, h_teacher)`
//! when the hidden sizes differ (`ProjectionLayer`).
//!
//! The captured outputs are full-hidden tensors that every TP rank holds whole (norm outputs,
//! layer outputs, embeddings, the final norm), so each rank computes the same loss, as in
//! ModelOpt.

use tch::{Device, Kind, Tensor};

/// A module output that can be captured: megatron-core's module names (local spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// `embedding`: word (+ position) embeddings.
    Embedding,
    /// `decoder.layers.N.input_layernorm`.
    InputNorm(usize),
    /// `decoder.layers.N.pre_mlp_layernorm`.
    PreMlpNorm(usize),
    /// `decoder.layers.N`: the layer's output (the residual stream).
    Layer(usize),
    /// `decoder.final_layernorm`.
    FinalNorm,
}

impl Site {
    /// Parses a module name.
    ///
    /// # Errors
    /// A name that is not one of the capturable modules, with the list.
    pub fn parse(name: &str) -> Result<Site, String> {
        let n = name.strip_prefix("module.").unwrap_or(name);
        let n = n.strip_prefix("model.").unwrap_or(n);
        match n {
            "embedding" => return Ok(Site::Embedding),
            "decoder.final_layernorm" => return Ok(Site::FinalNorm),
            _ => {}
        }
        let bad = || {
            format!(
                "`{name}` is not a capturable module: use embedding, decoder.layers.N, \
                 decoder.layers.N.input_layernorm, decoder.layers.N.pre_mlp_layernorm or \
                 decoder.final_layernorm (full-hidden outputs, as ModelOpt recommends under TP)"
            )
        };
        let rest = n.strip_prefix("decoder.layers.").ok_or_else(bad)?;
        let (idx, module) = rest.split_once('.').unwrap_or((rest, ""));
        let i: usize = idx.parse().map_err(|_| bad())?;
        match module {
            "" => Ok(Site::Layer(i)),
            "input_layernorm" => Ok(Site::InputNorm(i)),
            "pre_mlp_layernorm" => Ok(Site::PreMlpNorm(i)),
            _ => Err(bad()),
        }
    }

    /// Whether this module is on the last of `stages` pipeline stages of a `layers`-layer
    /// model (where ModelOpt computes the intermediate losses).
    pub fn on_last_stage(&self, layers: usize, stages: usize) -> bool {
        let per = layers / stages.max(1);
        match self {
            Site::Embedding => stages <= 1,
            Site::FinalNorm => true,
            Site::InputNorm(i) | Site::PreMlpNorm(i) | Site::Layer(i) => {
                *i < layers && *i >= layers - per
            }
        }
    }

    /// The layer it belongs to, if any.
    pub fn layer(&self) -> Option<usize> {
        match self {
            Site::InputNorm(i) | Site::PreMlpNorm(i) | Site::Layer(i) => Some(*i),
            Site::Embedding | Site::FinalNorm => None,
        }
    }
}

/// The per-token loss of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenLoss {
    /// `1 - cos(student, teacher)` (torch's `cosine_embedding_loss` with target 1).
    Cosine,
    /// The mean over the hidden dim of the squared difference.
    Mse,
}

/// One `intermediate_layer_pairs` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    /// The student's module.
    pub student: Site,
    /// The teacher's module.
    pub teacher: Site,
    /// The loss.
    pub loss: HiddenLoss,
}

impl Pair {
    /// Parses `[student, teacher]` or `[student, teacher, cosine|mse]`.
    ///
    /// # Errors
    /// Another length, an unknown loss name or module.
    pub fn parse(entry: &[String]) -> Result<Pair, String> {
        let (s, t, loss) = match entry {
            [s, t] => (s, t, HiddenLoss::Cosine),
            [s, t, l] => (
                s,
                t,
                match l.as_str() {
                    "cosine" => HiddenLoss::Cosine,
                    "mse" => HiddenLoss::Mse,
                    other => {
                        return Err(format!(
                            "unknown intermediate loss `{other}` (cosine or mse)"
                        ))
                    }
                },
            ),
            _ => {
                return Err(format!(
                    "{entry:?}: expected [student_layer, teacher_layer] or [student_layer, teacher_layer, cosine|mse]"
                ))
            }
        };
        Ok(Pair {
            student: Site::parse(s)?,
            teacher: Site::parse(t)?,
            loss,
        })
    }
}

/// torch's `cosine_embedding_loss` epsilon.
const COS_EPS: f64 = 1e-12;

/// Per-token loss `[b, s]` (fp32) of `student` against `teacher` (detached), both `[b, s, h]`.
pub fn per_token(loss: HiddenLoss, student: &Tensor, teacher: &Tensor) -> Tensor {
    let p = student.to_kind(Kind::Float);
    let t = teacher.detach().to_kind(Kind::Float);
    match loss {
        HiddenLoss::Cosine => {
            let dot = (&p * &t).sum_dim_intlist(-1, false, Kind::Float);
            let m1 = p.square().sum_dim_intlist(-1, false, Kind::Float) + COS_EPS;
            let m2 = t.square().sum_dim_intlist(-1, false, Kind::Float) + COS_EPS;
            1.0 - dot / (m1 * m2).sqrt()
        }
        HiddenLoss::Mse => (p - t).square().mean_dim(-1, false, Kind::Float),
    }
}

/// ModelOpt's `ProjectionLayer`: `Linear(h_student, h_teacher)` with bias, the weight drawn from
/// N(0, `init_method_std`²) and the bias zero; shared by every pair.
#[derive(Debug)]
pub struct Projection {
    /// `[h_teacher, h_student]`.
    pub weight: Tensor,
    /// `[h_teacher]`.
    pub bias: Tensor,
}

impl Projection {
    /// A projection starting from `weight` `[h_teacher, h_student]` (fp32) and a zero bias,
    /// trainable.
    pub fn new(weight: Tensor, device: Device) -> Projection {
        let h_teacher = weight.size()[0];
        // a fresh leaf: `weight` itself is left untouched
        let weight = weight
            .detach()
            .to_kind(Kind::Float)
            .to_device(device)
            .copy()
            .set_requires_grad(true);
        let bias = Tensor::zeros([h_teacher], (Kind::Float, device)).set_requires_grad(true);
        Projection { weight, bias }
    }

    /// `x Wᵀ + b` (in fp32).
    pub fn apply(&self, x: &Tensor) -> Tensor {
        x.to_kind(Kind::Float)
            .linear(&self.weight, Some(&self.bias))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_modelopt_module_names_and_places_them_on_stages() {
        let p = |s: &str| Site::parse(s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p("decoder.final_layernorm"), Site::FinalNorm);
        assert_eq!(
            p("module.decoder.layers.7.input_layernorm"),
            Site::InputNorm(7)
        );
        assert_eq!(p("decoder.layers.3.pre_mlp_layernorm"), Site::PreMlpNorm(3));
        assert_eq!(p("decoder.layers.12"), Site::Layer(12));
        assert_eq!(p("embedding"), Site::Embedding);
        for bad in [
            "decoder.layers.x",
            "decoder.layers.1.mlp",
            "output_layer",
            "",
        ] {
            assert!(Site::parse(bad).is_err(), "{bad}");
        }
        let pair = |v: &[&str]| Pair::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(matches!(
            pair(&["embedding", "embedding"]),
            Ok(Pair {
                loss: HiddenLoss::Cosine,
                ..
            })
        ));
        assert!(pair(&["embedding", "embedding", "kl"]).is_err());
        assert!(pair(&["embedding"]).is_err());
        // 8 layers in 2 stages: layers 4..8 and the final norm are on the last
        assert!(Site::Layer(4).on_last_stage(8, 2) && !Site::Layer(3).on_last_stage(8, 2));
        assert!(Site::FinalNorm.on_last_stage(8, 4) && !Site::Embedding.on_last_stage(8, 2));
        assert!(Site::Embedding.on_last_stage(8, 1) && !Site::Layer(8).on_last_stage(8, 1));
    }

    #[test]
    fn losses_are_torchs_definitions() {
        let s = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 2.0]).view([1, 2, 2]);
        let t = Tensor::from_slice(&[1.0f32, 0.0, 2.0, 0.0]).view([1, 2, 2]);
        let cos = per_token(HiddenLoss::Cosine, &s, &t);
        assert!(cos.allclose(
            &Tensor::from_slice(&[0.0f32, 1.0]).view([1, 2]),
            1e-6,
            1e-6,
            false
        ));
        let mse = per_token(HiddenLoss::Mse, &s, &t);
        assert!(mse.allclose(
            &Tensor::from_slice(&[0.0f32, 4.0]).view([1, 2]),
            1e-6,
            1e-6,
            false
        ));
    }
}
