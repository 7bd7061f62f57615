//! The schedules of a run and the plan they are laid over. Learning rate (linear warm-up, then
//! cosine), weight decay and teacher momentum (cosine) change every step; the teacher
//! temperature warms up per epoch; the head's last layer stays frozen for the first epochs.
//!
//! A plan is either the reference's — `--epochs` passes over the data — or, with
//! `--max_minutes`, the steps the time budget buys: the first steps run at the schedules'
//! starting values while the step rate is measured (calibration), then the total is fixed and
//! every epoch-based setting keeps its meaning as a fraction of the plan (`--warmup_epochs 10`
//! of `--epochs 100` warms up over the first tenth of the planned steps).

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

use super::config::TrainConfig;

/// The steps a run lays its schedules over. Stored in the checkpoint once fixed, so a resumed
/// run continues the same plan.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Steps run at the schedules' starting values while the step rate was measured (0 for an
    /// epoch plan).
    pub calibration_steps: usize,
    /// Steps the schedules run over after the calibration.
    pub scheduled_steps: usize,
    /// `--epochs` when the plan was fixed: an epoch of the plan is `scheduled_steps / epochs`
    /// steps.
    pub epochs: usize,
}

impl Plan {
    /// The reference's plan: `epochs` full passes of `steps_per_epoch`.
    pub fn epochs(epochs: usize, steps_per_epoch: usize) -> Self {
        Self { calibration_steps: 0, scheduled_steps: epochs * steps_per_epoch, epochs }
    }

    /// A plan of `steps` steps given outright (`--plan_steps`): a budget's plan without its
    /// calibration.
    pub fn of_steps(steps: usize, epochs: usize) -> Self {
        Self { calibration_steps: 0, scheduled_steps: steps, epochs }
    }

    /// The plan that fills what is left of a time budget: `remaining_s` seconds at
    /// `step_s` seconds a step, after `calibration_steps` already run, keeping back
    /// `PLAN_MARGIN` of the time for checkpoints and the epochs' ends; never longer than the
    /// epoch plan, never shorter than one step.
    pub fn for_budget(calibration_steps: usize, remaining_s: f64, step_s: f64, epochs: usize, steps_per_epoch: usize) -> Self {
        let affordable = (remaining_s.max(0.0) * (1.0 - PLAN_MARGIN) / step_s.max(1e-9)).floor() as usize;
        Self { calibration_steps, scheduled_steps: affordable.clamp(1, epochs * steps_per_epoch), epochs }
    }

    /// Every step of the run, calibration included.
    pub fn total_steps(&self) -> usize {
        self.calibration_steps + self.scheduled_steps
    }

    /// Steps in one epoch of the plan (fractional for a budget plan).
    pub fn epoch_steps(&self) -> f64 {
        self.scheduled_steps as f64 / self.epochs as f64
    }

    /// `epochs` epochs of the plan in whole steps.
    pub fn steps_for(&self, epochs: usize) -> usize {
        ((epochs as f64 * self.epoch_steps()).round() as usize).min(self.scheduled_steps)
    }
}

/// Share of a budget kept back when the plan is fixed, for checkpoints, plots and the last
/// epoch's end; the run still stops at the budget if the steps get slower.
pub const PLAN_MARGIN: f64 = 0.03;

/// What the schedules say for one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepValues {
    pub lr: f64,
    pub weight_decay: f64,
    pub teacher_momentum: f64,
    pub teacher_temp: f64,
    /// The head's last layer gets no update this step.
    pub last_layer_frozen: bool,
}

impl StepValues {
    /// The schedules' starting values, which do not depend on the plan: what calibration steps
    /// run at.
    pub fn start(cfg: &TrainConfig) -> Self {
        Self {
            lr: if cfg.warmup_epochs > 0 { 0.0 } else { peak_lr(cfg) },
            weight_decay: cfg.weight_decay,
            teacher_momentum: cfg.momentum_teacher,
            teacher_temp: if cfg.warmup_teacher_temp_epochs > 0 { cfg.warmup_teacher_temp } else { cfg.teacher_temp },
            last_layer_frozen: cfg.freeze_last_layer > 0,
        }
    }
}

/// `--lr` scaled linearly with the global batch size (the reference's rule, at batch 256).
pub fn peak_lr(cfg: &TrainConfig) -> f64 {
    cfg.lr * cfg.global_batch() as f64 / 256.0
}

/// Every step's values under one plan.
pub struct Schedules {
    pub plan: Plan,
    start: StepValues,
    lr: Vec<f64>,
    weight_decay: Vec<f64>,
    momentum: Vec<f64>,
    /// Teacher temperature per epoch of the plan.
    teacher_temps: Vec<f64>,
    frozen_steps: usize,
}

impl Schedules {
    pub fn new(cfg: &TrainConfig, plan: Plan) -> Self {
        let steps = plan.scheduled_steps;
        Self {
            plan,
            start: StepValues::start(cfg),
            lr: cosine_schedule(peak_lr(cfg), cfg.min_lr, steps, plan.steps_for(cfg.warmup_epochs), 0.0),
            weight_decay: cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, steps, 0, 0.0),
            momentum: cosine_schedule(cfg.momentum_teacher, 1.0, steps, 0, 0.0),
            teacher_temps: teacher_temperatures(cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs, plan.epochs),
            frozen_steps: plan.steps_for(cfg.freeze_last_layer),
        }
    }

    /// The values of global step `step` (clamped to the plan's last step).
    pub fn at(&self, step: usize) -> StepValues {
        let Some(i) = step.checked_sub(self.plan.calibration_steps) else { return self.start };
        let i = i.min(self.plan.scheduled_steps - 1);
        let epoch = ((i as f64 / self.plan.epoch_steps()) as usize).min(self.teacher_temps.len() - 1);
        StepValues {
            lr: self.lr[i],
            weight_decay: self.weight_decay[i],
            teacher_momentum: self.momentum[i],
            teacher_temp: self.teacher_temps[epoch],
            last_layer_frozen: i < self.frozen_steps,
        }
    }
}

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

/// One value per step: a linear warm-up from `warmup_start` to `base` over `warmup_steps`, then
/// a half cosine from `base` down (or up) to `end` over the remaining steps.
pub fn cosine_schedule(base: f64, end: f64, total_steps: usize, warmup_steps: usize, warmup_start: f64) -> Vec<f64> {
    let warmup = warmup_steps.min(total_steps);
    let mut values = linspace(warmup_start, base, warmup);
    let cosine = total_steps - warmup;
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
        let s = cosine_schedule(1e-3, 1e-6, 20, 5, 0.0);
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
        let wd = cosine_schedule(0.04, 0.4, 6, 0, 0.0);
        close(wd[0], 0.04);
        // i = 3 of 6: cos(pi/2) = 0 -> the midpoint 0.22.
        close(wd[3], 0.22);
        let m = cosine_schedule(0.996, 1.0, 4, 0, 0.0);
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

    /// The plan's first step starts where the calibration steps were, up to rounding.
    fn same(a: StepValues, b: StepValues) {
        close(a.lr, b.lr);
        close(a.weight_decay, b.weight_decay);
        close(a.teacher_momentum, b.teacher_momentum);
        close(a.teacher_temp, b.teacher_temp);
        assert_eq!(a.last_layer_frozen, b.last_layer_frozen);
    }

    fn config(extra: &str) -> TrainConfig {
        let args: Vec<&str> = ["dino", "train", "--data", "/images", "--batch_size_per_gpu", "256", "--lr", "0.001", "--min_lr", "0.00001"]
            .into_iter()
            .chain(extra.split_whitespace())
            .collect();
        crate::train::config::resolve_args(&args).unwrap()
    }

    /// The reference's rule over the global batch: 2 processes of 256 double the peak of one.
    #[test]
    fn peak_learning_rate_scales_with_the_global_batch() {
        let one = config("");
        let two = TrainConfig { processes: 2, ..one.clone() };
        assert_eq!(peak_lr(&one), 0.001);
        assert_eq!(peak_lr(&two), 0.002);
        assert_eq!(two.global_batch(), 512);
    }

    #[test]
    fn epoch_plan_steps_temperature_and_freezing_by_epoch() {
        // 4 epochs of 5 steps: warm-up over epoch 0, temperature 0.04 -> 0.07 over epochs 0-1,
        // last layer frozen during epoch 0, exactly as the reference counts epochs.
        let cfg = config("--epochs 4 --warmup_epochs 1 --warmup_teacher_temp_epochs 2 --teacher_temp 0.07 --freeze_last_layer 1");
        let s = Schedules::new(&cfg, Plan::epochs(4, 5));
        assert_eq!(s.plan.total_steps(), 20);
        same(s.at(0), StepValues::start(&cfg));
        close(s.at(1).lr, 2.5e-4);
        close(s.at(5).lr, 1e-3);
        assert!(s.at(4).last_layer_frozen && !s.at(5).last_layer_frozen);
        close(s.at(4).teacher_temp, 0.04);
        close(s.at(5).teacher_temp, 0.07);
        close(s.at(19).teacher_temp, 0.07);
    }

    #[test]
    fn budget_plan_keeps_epoch_settings_as_fractions() {
        // 3 calibration steps at the starting values, then 40 scheduled steps; --epochs 4 makes
        // a plan epoch 10 steps, so 1 warm-up epoch is 10 steps and the temperature takes
        // its second (final) value from step 10 of the plan.
        let cfg = config("--epochs 4 --warmup_epochs 1 --warmup_teacher_temp_epochs 2 --teacher_temp 0.07 --freeze_last_layer 1");
        let plan = Plan { calibration_steps: 3, scheduled_steps: 40, epochs: 4 };
        let s = Schedules::new(&cfg, plan);
        for step in 0..3 {
            assert_eq!(s.at(step), StepValues::start(&cfg), "step {step}");
        }
        same(s.at(3), StepValues::start(&cfg));
        close(s.at(3 + 5).lr, 5.0 * 1e-3 / 9.0);
        close(s.at(3 + 10).lr, 1e-3);
        assert!(s.at(3 + 9).last_layer_frozen && !s.at(3 + 10).last_layer_frozen);
        close(s.at(3 + 9).teacher_temp, 0.04);
        close(s.at(3 + 10).teacher_temp, 0.07);
        // The last step ends the cosines: i = 29 of 30 after the warm-up.
        let last = s.at(plan.total_steps() - 1);
        close(last.lr, 1e-5 + 0.5 * (1e-3 - 1e-5) * (1.0 + (PI * 29.0 / 30.0).cos()));
        assert!(last.lr < 1e-5 + 3e-6, "lr {} at the end", last.lr);
        assert!(last.teacher_momentum > 1.0 - 2e-5, "momentum {}", last.teacher_momentum);
        assert_eq!(s.at(plan.total_steps() + 7), last, "past the plan the last values hold");
    }

    #[test]
    fn budget_buys_steps_up_to_the_epoch_plan() {
        // 100 s left at 0.5 s a step, 3% kept back: floor(97 / 0.5) = 194 steps.
        assert_eq!(Plan::for_budget(4, 100.0, 0.5, 100, 50).scheduled_steps, 194);
        assert_eq!(Plan::for_budget(4, 100.0, 0.5, 2, 50).scheduled_steps, 100, "never past --epochs");
        assert_eq!(Plan::for_budget(4, -3.0, 0.5, 2, 50).scheduled_steps, 1, "at least one step");
    }
}
