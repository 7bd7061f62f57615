//! Per-iteration schedules: learning rate, weight decay and teacher momentum (cosine, with an
//! optional linear warm-up), and the per-epoch teacher temperature.

use std::f64::consts::PI;

/// `num` evenly spaced values from `start` to `end`, both included (numpy's `linspace`).
pub fn linspace(start: f64, end: f64, num: usize) -> Vec<f64> {
    match num {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (end - start) / (num - 1) as f64;
            let mut v: Vec<f64> = (0..num).map(|i| start + i as f64 * step).collect();
            v[num - 1] = end;
            v
        }
    }
}

/// One value per iteration: a linear warm-up from `warmup_start` to `base` over
/// `warmup_epochs`, then a half cosine from `base` down (or up) to `end`.
pub fn cosine_schedule(
    base: f64,
    end: f64,
    epochs: usize,
    iters_per_epoch: usize,
    warmup_epochs: usize,
    warmup_start: f64,
) -> Vec<f64> {
    let total = epochs * iters_per_epoch;
    let warmup = (warmup_epochs * iters_per_epoch).min(total);
    let mut values = linspace(warmup_start, base, warmup);
    let cosine = total - warmup;
    values.extend((0..cosine).map(|i| end + 0.5 * (base - end) * (1.0 + (PI * i as f64 / cosine as f64).cos())));
    values
}

/// Teacher temperature per epoch: linear from `warmup` to `final_temp` over `warmup_epochs`
/// (both ends included), then constant.
pub fn teacher_temperatures(warmup: f64, final_temp: f64, warmup_epochs: usize, epochs: usize) -> Vec<f64> {
    let warmup_epochs = warmup_epochs.min(epochs);
    let mut temps = linspace(warmup, final_temp, warmup_epochs);
    temps.resize(epochs, final_temp);
    temps
}

/// Per-iteration values: learning rate (base lr scaled by batch / 256, linear warm-up, cosine),
/// weight decay (cosine up) and teacher momentum (cosine to 1).
pub struct Schedules {
    pub lr: Vec<f64>,
    pub wd: Vec<f64>,
    pub momentum: Vec<f64>,
}

impl Schedules {
    pub fn new(cfg: &super::config::TrainConfig, steps_per_epoch: usize) -> Self {
        let base_lr = cfg.lr * cfg.batch_size_per_gpu as f64 / 256.0;
        Self {
            lr: cosine_schedule(base_lr, cfg.min_lr, cfg.epochs, steps_per_epoch, cfg.warmup_epochs, 0.0),
            wd: cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps_per_epoch, 0, 0.0),
            momentum: cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, steps_per_epoch, 0, 0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn learning_rate_warms_up_then_decays() {
        // 4 epochs of 5 iterations, 1 warm-up epoch: iterations 0..5 climb 0 -> 1e-3 in steps of
        // 2.5e-4; the 15 cosine iterations follow end + (base-end)/2 * (1 + cos(pi*i/15)).
        let s = cosine_schedule(1e-3, 1e-6, 4, 5, 1, 0.0);
        assert_eq!(s.len(), 20);
        close(s[0], 0.0);
        close(s[1], 2.5e-4);
        close(s[4], 1e-3);
        close(s[5], 1e-3);
        // i = 5 of 15: cos(pi/3) = 0.5, so 1e-6 + 0.5 * 0.999e-3 * 1.5.
        close(s[10], 1e-6 + 0.5 * 0.999e-3 * 1.5);
        // i = 14 of 15: cos(14pi/15) = -0.9781476007338056.
        close(s[19], 1e-6 + 0.5 * 0.999e-3 * (1.0 - 0.9781476007338056));
    }

    #[test]
    fn weight_decay_and_momentum_rise() {
        let wd = cosine_schedule(0.04, 0.4, 2, 3, 0, 0.0);
        close(wd[0], 0.04);
        // i = 3 of 6: cos(pi/2) = 0 -> the midpoint 0.22.
        close(wd[3], 0.22);
        let m = cosine_schedule(0.996, 1.0, 1, 4, 0, 0.0);
        close(m[0], 0.996);
        // i = 2 of 4: midpoint 0.998; i = 1: 1 - 0.002 * (1 + cos(pi/4)).
        close(m[2], 0.998);
        close(m[1], 1.0 - 0.002 * (1.0 + std::f64::consts::FRAC_1_SQRT_2));
    }

    #[test]
    fn teacher_temperature_warms_up_per_epoch() {
        let t = teacher_temperatures(0.04, 0.07, 30, 100);
        assert_eq!(t.len(), 100);
        close(t[0], 0.04);
        close(t[1], 0.04 + 0.03 / 29.0);
        close(t[29], 0.07);
        close(t[99], 0.07);
        assert_eq!(teacher_temperatures(0.04, 0.04, 0, 3), vec![0.04; 3]);
    }
}
