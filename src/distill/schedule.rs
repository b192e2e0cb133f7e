//! Learning-rate schedules, as NeMo computes them (`nemo/core/optim/lr_scheduler.py`,
//! `CosineAnnealing` over `WarmupAnnealHoldPolicy`). `step` is the number of
//! optimizer steps already taken (the scheduler's `last_epoch`): the rate used
//! by the first update is `lr(0)`.

/// NeMo's `CosineAnnealing` with `warmup_steps`, `constant_steps`, `min_lr`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineAnnealing {
    /// Peak rate (`optim.lr`).
    pub base_lr: f64,
    /// `sched.warmup_steps`.
    pub warmup_steps: u64,
    /// `sched.constant_steps` (rate held at `min_lr` after the decay).
    pub constant_steps: u64,
    /// `trainer.max_steps`.
    pub max_steps: u64,
    /// `sched.min_lr`.
    pub min_lr: f64,
}

impl CosineAnnealing {
    fn decay_steps(&self) -> u64 {
        self.max_steps
            .saturating_sub(self.constant_steps + self.warmup_steps)
    }

    /// Megatron's variant, used when `constant_steps > 0`.
    fn megatron(&self, step: u64) -> f64 {
        let (w, d) = (self.warmup_steps, self.decay_steps());
        if w > 0 && step <= w {
            return self.base_lr * step as f64 / w as f64;
        }
        if step > w + d {
            return self.min_lr;
        }
        let ratio = if d == 0 {
            1.0
        } else {
            (step - w) as f64 / d as f64
        };
        self.min_lr
            + 0.5 * ((std::f64::consts::PI * ratio).cos() + 1.0) * (self.base_lr - self.min_lr)
    }

    /// The rate after `step` updates.
    pub fn lr(&self, step: u64) -> f64 {
        let w = self.warmup_steps;
        if w > 0 && step <= w {
            return if self.constant_steps == 0 {
                self.base_lr * (step + 1) as f64 / (w + 1) as f64
            } else {
                self.megatron(step)
            };
        }
        if self.constant_steps > 0 && w + self.decay_steps() < step && step <= self.max_steps {
            return self.megatron(step);
        }
        if step > self.max_steps {
            return self.min_lr;
        }
        if self.constant_steps > 0 {
            return self.megatron(step);
        }
        let span = self.max_steps.saturating_sub(w).max(1) as f64;
        let mult = 0.5 * (1.0 + (std::f64::consts::PI * (step - w) as f64 / span).cos());
        (self.base_lr - self.min_lr) * mult + self.min_lr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-15 * b.abs().max(1.0)
    }

    #[test]
    fn plain_cosine_with_warmup() {
        let s = CosineAnnealing {
            base_lr: 1e-4,
            warmup_steps: 50,
            constant_steps: 0,
            max_steps: 1000,
            min_lr: 1e-5,
        };
        assert!(close(s.lr(0), 1e-4 / 51.0));
        assert!(close(s.lr(50), 1e-4));
        // Halfway through the decay: the mean of peak and floor.
        assert!(close(s.lr(525), 0.5 * (1e-4 + 1e-5)));
        assert!(close(s.lr(1000), 1e-5));
        assert!(close(s.lr(5000), 1e-5));
        assert!((51..1000).all(|k| s.lr(k) >= s.lr(k + 1)));
    }

    #[test]
    fn megatron_variant_with_constant_steps() {
        let s = CosineAnnealing {
            base_lr: 2e-4,
            warmup_steps: 10,
            constant_steps: 20,
            max_steps: 110,
            min_lr: 2e-5,
        };
        assert!(close(s.lr(0), 0.0));
        assert!(close(s.lr(5), 1e-4));
        assert!(close(s.lr(10), 2e-4));
        assert!(close(s.lr(50), 0.5 * (2e-4 + 2e-5)));
        assert!(close(s.lr(95), 2e-5));
        assert!(close(s.lr(110), 2e-5));
    }
}
