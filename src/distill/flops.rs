//! Model FLOPs utilisation (MFU): the matmul FLOPs a distillation step needs, divided by the
//! time it took and the devices' peak. Counted like Megatron's `num_floating_point_operations`
//! (2 FLOPs per multiply-add; only the matmuls: linear layers, attention scores and values,
//! the output layer), with causal attention counted for the positions actually attended
//! (`(s + 1) / 2` on average). A step is one forward of the teacher plus forward and backward
//! (twice the forward) of the student.

use tch::{Device, Kind};

use super::spec::GptSpec;

/// Forward FLOPs per token of the whole model (all TP ranks together) at sequence length `seq`.
pub fn forward_flops_per_token(spec: &GptSpec, seq: i64) -> f64 {
    let h = spec.hidden as f64;
    let q = (spec.heads * spec.head_dim) as f64;
    let kv = (spec.groups * spec.head_dim) as f64;
    let mlp = |ffn: i64| {
        let fc1_rows = if spec.gated { 2 * ffn } else { ffn } as f64;
        h * fc1_rows + ffn as f64 * h
    };
    // an MoE layer: the router, and each token's top-k experts
    let mlp = match &spec.moe {
        Some(m) => h * m.experts as f64 + m.topk as f64 * mlp(m.ffn),
        None => mlp(spec.ffn),
    };
    let linear = h * (q + 2.0 * kv) + q * h + mlp;
    // QKᵀ and AV: q·(s+1)/2 multiply-adds each for an average causal row
    let attention = q * (seq as f64 + 1.0);
    let per_layer = linear + attention;
    2.0 * (spec.num_layers as f64 * per_layer + h * spec.padded_vocab as f64)
}

/// FLOPs of one distillation step over `tokens` tokens: teacher forward (none when a teacher
/// cache stands in for it), student forward and backward.
pub fn step_flops(student: &GptSpec, teacher: Option<&GptSpec>, seq: i64, tokens: f64) -> f64 {
    let t = teacher.map_or(0.0, |t| forward_flops_per_token(t, seq));
    tokens * (3.0 * forward_flops_per_token(student, seq) + t)
}

/// The environment variable that gives the peak TFLOP/s of one device (it overrides the
/// table below, and enables MFU on devices the table does not know, the CPU included).
pub const PEAK_ENV: &str = "NEMO_TOOL_PEAK_TFLOPS";

/// Dense peak FLOP/s of one GPU for the compute dtype, from its name (NVIDIA's data sheets;
/// fp32 without TF32, which libtorch leaves off for matmuls by default).
pub fn table_peak(device_name: &str, kind: Kind) -> Option<f64> {
    let half = matches!(kind, Kind::BFloat16 | Kind::Half);
    let n = device_name.to_ascii_uppercase();
    // (name part, bf16/fp16 dense TFLOP/s, fp32 TFLOP/s); more specific names first
    const TABLE: &[(&str, f64, f64)] = &[
        ("GB200", 2500.0, 80.0),
        ("B200", 2250.0, 80.0),
        ("H100 PCIE", 756.0, 51.0),
        ("H100 NVL", 835.0, 60.0),
        ("H200 NVL", 835.0, 60.0),
        ("H200", 989.0, 67.0),
        ("H100", 989.0, 67.0),
        ("H800", 989.0, 67.0),
        ("GH200", 989.0, 67.0),
        ("A100", 312.0, 19.5),
        ("A800", 312.0, 19.5),
        ("L40S", 362.0, 91.6),
        ("A10G", 70.0, 31.2),
    ];
    TABLE
        .iter()
        .find(|(part, _, _)| n.contains(part))
        .map(|&(_, h, f)| if half { h } else { f } * 1e12)
}

/// Peak FLOP/s of one device of this run: [`PEAK_ENV`] when set, else the table for a CUDA
/// device's name; None (no MFU) otherwise.
///
/// # Errors
/// A [`PEAK_ENV`] value that is not a positive number.
pub fn device_peak(device: Device, kind: Kind) -> Result<Option<f64>, String> {
    if let Ok(v) = std::env::var(PEAK_ENV) {
        return match v.trim().parse::<f64>() {
            Ok(t) if t > 0.0 && t.is_finite() => Ok(Some(t * 1e12)),
            _ => Err(format!(
                "{PEAK_ENV}={v:?}: expected the peak TFLOP/s, a positive number"
            )),
        };
    }
    Ok(match device {
        Device::Cuda(i) => cuda_name(i).and_then(|n| table_peak(&n, kind)),
        _ => None,
    })
}

#[cfg(feature = "cuda")]
fn cuda_name(idx: usize) -> Option<String> {
    super::ffi::cuda_device_name(idx as i32).ok()
}

#[cfg(not(feature = "cuda"))]
fn cuda_name(_: usize) -> Option<String> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::spec::{Activation, Norm, Positions};

    fn spec(gated: bool) -> GptSpec {
        GptSpec {
            num_layers: 2,
            hidden: 64,
            ffn: 96,
            heads: 8,
            groups: 2,
            head_dim: 8,
            norm: Norm::Rms,
            eps: 1e-5,
            gated,
            activation: Activation::Silu,
            bias: false,
            qkv_bias: false,
            qk_layernorm: false,
            window: None,
            window_layers: Vec::new(),
            gemma: Default::default(),
            moe: None,
            positions: Positions::None,
            tied: false,
            padded_vocab: 128,
            init_std: 0.02,
            scaled_init: false,
            tp: 1,
        }
    }

    /// The tiny mcore fixture counted by hand: per layer qkv 64·96, proj 64·64, fc1 64·192,
    /// fc2 96·64 multiply-adds per token, attention 64·(s+1), output layer 64·128.
    #[test]
    fn counts_the_fixture_by_hand() {
        let per_layer = 64.0 * 96.0 + 64.0 * 64.0 + 64.0 * 192.0 + 96.0 * 64.0 + 64.0 * 129.0;
        let want = 2.0 * (2.0 * per_layer + 64.0 * 128.0);
        assert_eq!(forward_flops_per_token(&spec(true), 128), want);
        // plain MLP: fc1 has F rows
        let plain = want - 2.0 * 2.0 * 64.0 * 96.0;
        assert_eq!(forward_flops_per_token(&spec(false), 128), plain);
        let s = spec(true);
        assert_eq!(step_flops(&s, Some(&s), 128, 10.0), 10.0 * 4.0 * want);
        assert_eq!(step_flops(&s, None, 128, 10.0), 10.0 * 3.0 * want);
    }

    #[test]
    fn peaks_by_name_and_dtype() {
        assert_eq!(table_peak("NVIDIA H200", Kind::BFloat16), Some(989e12));
        assert_eq!(table_peak("NVIDIA H100 PCIe", Kind::Float), Some(51e12));
        assert_eq!(
            table_peak("NVIDIA A100-SXM4-80GB", Kind::Half),
            Some(312e12)
        );
        assert_eq!(table_peak("NVIDIA GB200", Kind::BFloat16), Some(2500e12));
        assert_eq!(table_peak("Some GPU", Kind::Float), None);
    }
}
