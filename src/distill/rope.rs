//! Rotary position embeddings exactly as megatron-core's `RotaryEmbedding` and
//! `_apply_rotary_pos_emb_bshd` compute them: inverse frequencies in fp32, optional Llama-3
//! frequency scaling and position interpolation, rotate-half or interleaved, applied to the
//! first `rot_dim` channels of each head (the rest pass through).

use tch::{Device, Kind, Tensor};

use super::spec::Positions;

/// cos/sin tables for one sequence length.
#[derive(Debug)]
pub struct Rope {
    /// `[seq, 1, rot_dim]`, broadcast against `[b, seq, heads, head_dim]`.
    cos: Tensor,
    sin: Tensor,
    rot: i64,
    interleaved: bool,
}

impl Rope {
    /// Another handle to the same tables.
    pub fn shallow_clone(&self) -> Rope {
        Rope {
            cos: self.cos.shallow_clone(),
            sin: self.sin.shallow_clone(),
            rot: self.rot,
            interleaved: self.interleaved,
        }
    }

    /// Tables for positions `0..seq`, or None when the model has no rotary embeddings.
    pub fn new(positions: &Positions, seq: i64, device: Device, kind: Kind) -> Option<Rope> {
        let Positions::Rope {
            rot_dim,
            base,
            interleaved,
            interpolation,
            scaling,
        } = positions
        else {
            return None;
        };
        let rot = *rot_dim as i64;
        let opts = (Kind::Float, device);
        let exps = Tensor::arange_start_step(0, rot, 2, opts) / (rot as f64);
        let mut inv_freq = Tensor::pow_scalar(*base, &exps).reciprocal();
        if let Some(sc) = scaling {
            // mcore RotaryEmbedding._apply_scaling (the HF Llama-3 rule)
            let old = sc.original_max_position_embeddings;
            let low_wl = old / sc.low_freq_factor;
            let high_wl = old / sc.high_freq_factor;
            let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
            let scaled = &inv_freq / sc.factor;
            let llama = scaled.where_self(&wavelen.gt(low_wl), &inv_freq);
            let smooth = ((wavelen.reciprocal() * old) - sc.low_freq_factor)
                / (sc.high_freq_factor - sc.low_freq_factor);
            let smoothed = (smooth.ones_like() - &smooth) * &llama / sc.factor + &smooth * &llama;
            let medium = wavelen
                .lt(high_wl)
                .logical_not()
                .logical_and(&wavelen.gt(low_wl).logical_not());
            inv_freq = smoothed.where_self(&medium, &llama);
        }
        let mut pos = Tensor::arange(seq, opts);
        if let Some(f) = interpolation {
            pos *= 1.0 / f;
        }
        let freqs = pos.outer(&inv_freq); // [s, rot/2]
        let emb = if *interleaved {
            Tensor::stack(&[freqs.unsqueeze(-1), freqs.unsqueeze(-1)], -1).view([seq, rot])
        } else {
            Tensor::cat(&[&freqs, &freqs], -1)
        };
        let emb = emb.unsqueeze(1);
        Some(Rope {
            cos: emb.cos().to_kind(kind),
            sin: emb.sin().to_kind(kind),
            rot,
            interleaved: *interleaved,
        })
    }

    /// Rotates `t` (`[b, seq, heads, head_dim]`).
    pub fn apply(&self, t: &Tensor) -> Tensor {
        let d = *t.size().last().unwrap_or(&self.rot);
        let rot = self.rot;
        let (x, pass) = (t.narrow(-1, 0, rot), t.narrow(-1, rot, d - rot));
        let rotated = if self.interleaved {
            let x1 = x.slice(-1, 0, rot, 2);
            let x2 = x.slice(-1, 1, rot, 2);
            Tensor::stack(&[-x2, x1], -1).flatten(-2, -1)
        } else {
            let halves = x.chunk(2, -1);
            Tensor::cat(&[-&halves[1], halves[0].shallow_clone()], -1)
        };
        let y = &x * &self.cos + rotated * &self.sin;
        if rot == d {
            y
        } else {
            Tensor::cat(&[y, pass], -1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(rot_dim: u64, interleaved: bool) -> Positions {
        Positions::Rope {
            rot_dim,
            base: 10000.0,
            interleaved,
            interpolation: None,
            scaling: None,
        }
    }

    #[test]
    fn position_zero_is_the_identity_and_norms_are_kept() {
        let r = Rope::new(&rope(4, false), 3, Device::Cpu, Kind::Float)
            .unwrap_or_else(|| panic!("no rope"));
        let t = Tensor::arange(3 * 6, (Kind::Float, Device::Cpu)).view([1, 3, 1, 6]);
        let y = r.apply(&t);
        assert!(y.get(0).get(0).equal(&t.get(0).get(0)));
        // rotation keeps each pair's norm; the 2 unrotated channels pass through
        let n = |x: &Tensor| {
            x.narrow(-1, 0, 4)
                .square()
                .sum(Kind::Float)
                .double_value(&[])
        };
        assert!((n(&y) - n(&t)).abs() < 1e-3);
        assert!(y.narrow(-1, 4, 2).equal(&t.narrow(-1, 4, 2)));
    }

    #[test]
    fn rotate_half_matches_the_formula() {
        let r = Rope::new(&rope(2, false), 2, Device::Cpu, Kind::Float)
            .unwrap_or_else(|| panic!("no rope"));
        let t = Tensor::from_slice(&[1.0f32, 0.0, 1.0, 0.0]).view([1, 2, 1, 2]);
        let y = r.apply(&t);
        // position 1, inv_freq 1: (x1, x2) -> (x1 cos1 - x2 sin1, x2 cos1 + x1 sin1)
        let got = Vec::<f32>::try_from(y.get(0).get(1).view([2])).unwrap_or_default();
        assert!(
            (got[0] - 1f32.cos()).abs() < 1e-6 && (got[1] - 1f32.sin()).abs() < 1e-6,
            "{got:?}"
        );
        assert!(Rope::new(&Positions::None, 2, Device::Cpu, Kind::Float).is_none());
    }
}
