//! `dino train`, read top to bottom as the reference's main_dino.py: [`train`] sets up data,
//! models and schedules, [`Run::train_one_epoch`] is the loop over batches, each of them one
//! [`TrainStep`] (teacher forward, student forward, loss, backward, gradients combined over the
//! job's processes, clipped AdamW or SGD step, teacher EMA), with checkpoints, logs and a clean
//! stop on a time budget or a non-finite loss. Every process of an MPI job runs this loop on
//! its share of each global batch; rank 0 alone writes files and talks on the terminal.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::json;

use super::checkpoint::{self, Progress, TrainState};
use super::config::TrainConfig;
use super::log::{StepMetrics, append_line, plot, read_knn_points, read_step_metrics};
use super::loss::DinoLoss;
use super::online_knn::OnlineKnn;
use super::optim::Optimizer;
use super::replicas;
use super::schedule::{Plan, Schedules, StepValues};
use super::step::{Crops, TrainStep};
use crate::data::dataset::{Dataset, IdxSplit};
use crate::data::loader::{Batch, Shard, mix_seed, start_epoch, steps_per_epoch};
use crate::device::DeviceKind;
use crate::dist::Dist;
use crate::model::DinoModel;
use crate::model::pretrained;
use crate::weights::{self, HostTensor};

/// How a run ended.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Finished,
    TimeBudgetReached,
}

/// `dino train` as a job of one process, or of every process an MPI launcher started.
pub fn run(cfg: &TrainConfig) -> Result<()> {
    let dist = Dist::from_launcher()?;
    // Several processes: each takes its part of the machine's cores.
    let threads = if dist.world_size() > 1 && std::env::var_os("RAYON_NUM_THREADS").is_none() { dist.cores() } else { 0 };
    crate::engine::start_compute(threads)?;
    if dist.world_size() == 1 {
        if train(cfg, &dist)? == Outcome::Finished {
            eprintln!("training finished: {}", cfg.output_dir.display());
        }
        return Ok(());
    }
    // Several processes: an error or a panic on any of them ends them all rather than leaving the
    // others waiting in a collective.
    crate::dist::abort_job_on_panic();
    match train(cfg, &dist) {
        Ok(outcome) => {
            if outcome == Outcome::Finished && dist.is_main() {
                eprintln!("training finished: {}", cfg.output_dir.display());
            }
            Ok(())
        }
        Err(e) => {
            eprintln!("error: rank {} of {}: {e:#}", dist.rank(), dist.world_size());
            dist.abort(1)
        }
    }
}

/// The training run of this process (`dist` says which of the job's processes it is): data,
/// models and schedules, then epochs until the plan or the time budget ends.
pub fn train(cfg: &TrainConfig, dist: &Dist) -> Result<Outcome> {
    let started = Instant::now();
    let cfg = &TrainConfig { processes: dist.world_size(), ..cfg.clone() };
    let has_batch_norm = cfg.vit().is_none() || cfg.use_bn_in_head;
    if cfg.processes > 1 && has_batch_norm && cfg.device != DeviceKind::Cpu {
        bail!("--device {}: BatchNorm statistics are synchronised across processes on the CPU only (a ResNet or --use_bn_in_head under several processes)", format!("{:?}", cfg.device).to_lowercase());
    }
    let device = cfg.device.open(gpu_of(dist))?;
    let head_width = cfg.vit().map(|vit| vit.embed_dim / vit.num_heads);
    let precision = cfg.precision.resolve(head_width, &device);
    if let Some(width) = head_width {
        crate::engine::check_precision("--precision", precision, width, &device)?;
    }
    let main = dist.is_main();
    if main {
        std::fs::create_dir_all(&cfg.output_dir).with_context(|| format!("--output_dir {}: cannot create", cfg.output_dir.display()))?;
        std::fs::write(cfg.output_dir.join("config.json"), serde_json::to_string_pretty(cfg)?)?;
    }

    // Data: each process takes its share of every global batch.
    let mut dataset = Dataset::open(cfg.data(), IdxSplit::Train).with_context(|| format!("--data {}", cfg.data().display()))?;
    dataset.keep_subset(cfg.subset, cfg.seed);
    let steps = steps_per_epoch(dataset.len(), cfg.global_batch());
    if steps == 0 {
        bail!("--data {}: {} images is less than one batch of {}", cfg.data().display(), dataset.len(), batch_description(cfg));
    }
    let workers = if cfg.num_workers == 0 { dist.cores() } else { cfg.num_workers };
    let knn = if main && cfg.knn_every > 0 { Some(OnlineKnn::open(cfg)?) } else { None };
    if main {
        eprintln!(
            "global batch {}, peak learning rate {:.3e}, {steps} steps per epoch, {} products{}",
            batch_description(cfg),
            super::schedule::peak_lr(cfg),
            precision.name(),
            if cfg.precision == crate::engine::PrecisionChoice::Auto { " (--precision auto)" } else { "" }
        );
    }

    // Student, teacher (a copy that never gets gradients), loss, optimiser, schedules.
    let mut loss = DinoLoss { student_temp: cfg.student_temp, center_momentum: cfg.center_momentum, ..DinoLoss::new(cfg.out_dim, cfg.crops().ncrops(), &device) };
    let ckpt_path = cfg.output_dir.join("checkpoint.safetensors");
    let (mut state, center) = initial_state(cfg, dist, &ckpt_path, dataset.len(), loss.center.clone(), &device)?;
    loss.center = center;
    // The student trains on the autodiff device; the teacher stays on the plain one.
    state.student = state.student.fork(&device.clone().autodiff()).train();
    let budget = (cfg.max_minutes > 0.0).then(|| Duration::from_secs_f64(cfg.max_minutes * 60.0));
    // The plan the schedules run over: the one a resumed run fixed, --plan_steps, the
    // reference's --epochs, or, under a time budget, the steps it buys (fixed once the first
    // steps are timed).
    let schedules = match (state.progress.plan, budget) {
        (Some(plan), _) => Some(Schedules::new(cfg, plan)),
        (None, _) if cfg.plan_steps > 0 => {
            let plan = Plan::of_steps(cfg.plan_steps, cfg.epochs);
            if main {
                announce_plan(&cfg.output_dir, cfg, &plan, None, dataset.len())?;
            }
            state.progress.plan = Some(plan);
            Some(Schedules::new(cfg, plan))
        }
        (None, None) => Some(Schedules::new(cfg, Plan::epochs(cfg.epochs, steps))),
        (None, Some(_)) => None,
    };
    let step = TrainStep {
        dist,
        device,
        precision,
        clip_grad: (cfg.clip_grad > 0.0).then_some(cfg.clip_grad),
        loss,
        perturbed: replicas::perturbed_for_test(dist),
    };
    let mut run = Run {
        cfg,
        dist,
        dataset: Arc::new(dataset),
        shard: Shard { rank: dist.rank(), ranks: dist.world_size() },
        steps,
        pool: Arc::new(rayon::ThreadPoolBuilder::new().num_threads(workers).build()?),
        knn,
        started,
        budget,
        calibration: Calibration::new(budget),
        schedules,
        step,
        ckpt_path,
    };
    loop {
        if run.plan_done(&state) {
            return Ok(Outcome::Finished);
        }
        let end;
        (state, end) = run.train_one_epoch(state)?;
        if end == EpochEnd::BudgetReached {
            return Ok(Outcome::TimeBudgetReached);
        }
    }
}

/// The state training starts from: fresh (or from `--pretrained_weights`), or the checkpoint
/// being resumed, read by rank 0 and sent to the other processes; with the loss's centre
/// (`fresh_center` for a fresh run).
fn initial_state(cfg: &TrainConfig, dist: &Dist, ckpt_path: &Path, dataset_len: usize, fresh_center: Tensor<2>, device: &Device) -> Result<(TrainState, Tensor<2>)> {
    let main = dist.is_main();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let backbone = cfg.init_backbone(&mut rng, device);
    let head = cfg.head(backbone.embed_dim()).init(&mut rng, device);
    let mut student = DinoModel { backbone, head };
    // Rank 0 reads the checkpoint or the pretrained weights; the others receive its state.
    let resuming = main && ckpt_path.exists();
    if let Some(path) = cfg.pretrained_weights.as_ref().filter(|_| main && !resuming) {
        let loaded = pretrained::load(path, "teacher", Some(&cfg.arch), device).context("--pretrained_weights")?;
        let tensors: HashMap<String, HostTensor> = weights::export(&loaded.network).into_iter().collect();
        student.backbone = weights::import(student.backbone, &tensors, "")
            .with_context(|| match cfg.vit() {
                Some(_) => format!("--pretrained_weights {} does not fit --arch {} --patch_size {} at {} px", path.display(), cfg.arch, cfg.patch_size, cfg.global_crop_size),
                None => format!("--pretrained_weights {} does not fit --arch {}", path.display(), cfg.arch),
            })?;
        eprintln!("backbone initialised from {}", path.display());
    }
    let teacher = student.valid();
    let (state, center) = if resuming {
        let restored = checkpoint::load(ckpt_path, student, teacher, device)?;
        if restored.processes != cfg.processes {
            bail!(
                "{} was written by a run of {} process(es); resume it with {} (the global batch, the learning rate and the position in the epoch depend on it)",
                ckpt_path.display(),
                restored.processes,
                match restored.processes {
                    1 => "a plain `dino train`".to_string(),
                    n => format!("`mpirun -np {n} dino train`"),
                }
            );
        }
        let progress = &restored.state.progress;
        eprintln!("resuming from {} at epoch {} step {}", ckpt_path.display(), progress.epoch, progress.step_in_epoch);
        (restored.state, restored.center)
    } else {
        let progress = Progress { epoch: 0, step_in_epoch: 0, global_step: 0, plan: None };
        (TrainState { student, teacher, optimizer: Optimizer::new(cfg.optimizer), progress }, fresh_center)
    };
    replicas::check_same_run(dist, cfg, dataset_len)?;
    replicas::state_from_main(dist, state, center, cfg, device)
}

/// How an epoch ended.
#[derive(Debug, PartialEq)]
enum EpochEnd {
    /// Its data or the plan ran out; checkpoint, log line and plot are written.
    Done,
    /// The time budget stopped the run inside it, checkpoint written.
    BudgetReached,
}

/// What one process's run holds from setup to the end, and the plan once it is fixed.
struct Run<'a> {
    cfg: &'a TrainConfig,
    dist: &'a Dist,
    dataset: Arc<Dataset>,
    shard: Shard,
    /// Steps per epoch.
    steps: usize,
    /// The loader's threads.
    pool: Arc<rayon::ThreadPool>,
    knn: Option<OnlineKnn>,
    started: Instant,
    budget: Option<Duration>,
    calibration: Calibration,
    /// `None` until a budgeted run has timed its first steps.
    schedules: Option<Schedules>,
    step: TrainStep<'a>,
    ckpt_path: PathBuf,
}

impl Run<'_> {
    /// The data epochs the run will pass through: those the plan's steps reach once a plan is
    /// fixed (a budget or --plan_steps usually ends inside an epoch), --epochs until then.
    fn epochs_to_run(&self) -> usize {
        self.schedules.as_ref().map_or(self.cfg.epochs, |s| s.plan.total_steps().div_ceil(self.steps))
    }

    fn plan_done(&self, state: &TrainState) -> bool {
        self.schedules.as_ref().is_some_and(|s| state.progress.global_step >= s.plan.total_steps())
    }

    /// One epoch from the state's position in it: steps until its data, the plan or the time
    /// budget runs out, then the epoch's checkpoint, log line and plot.
    fn train_one_epoch(&mut self, mut state: TrainState) -> Result<(TrainState, EpochEnd)> {
        let cfg = self.cfg;
        let epoch = state.progress.epoch;
        let loader = start_epoch(self.dataset.clone(), cfg.crops(), cfg.batch_size_per_gpu, self.shard, cfg.seed, epoch, state.progress.step_in_epoch, self.pool.clone());
        let bar = progress_bar(self.dist.is_main(), self.steps as u64, state.progress.step_in_epoch as u64, epoch, self.epochs_to_run());
        let mut sums = EpochSums { started: Some(Instant::now()), ..EpochSums::default() };
        let mut values = StepValues::start(cfg);
        let mut plan_done = false;
        while !plan_done {
            let wait = Instant::now();
            let Ok(batch) = loader.batches.recv() else { break };
            sums.data_wait += wait.elapsed();
            for msg in &batch.skipped {
                bar.suspend(|| eprintln!("warning: skipped {msg}"));
            }
            sums.skipped += batch.skipped.len();
            values = self.schedules.as_ref().map_or_else(|| StepValues::start(cfg), |s| s.at(state.progress.global_step));
            state = self.train_step(state, batch, &values, &mut sums)?;
            state.progress.step_in_epoch += 1;
            state.progress.global_step += 1;
            self.fix_plan_once_timed(&mut state, &bar)?;
            plan_done = self.plan_done(&state);
            self.show_progress(&bar, &sums, &state.progress);
            let budget_over = self.budget.is_some_and(|b| self.started.elapsed() >= b);
            let over_budget = !plan_done && self.budget.is_some() && self.dist.broadcast(budget_over)?;
            let periodic = cfg.saveckp_steps > 0 && state.progress.global_step.is_multiple_of(cfg.saveckp_steps);
            // Checkpoints inside an epoch here; the ends of epochs and of the plan save below.
            if over_budget || (periodic && !plan_done && state.progress.step_in_epoch < self.steps) {
                save_checkpoint(self.dist, &self.ckpt_path, &state, &self.step.loss.center, cfg)?;
            }
            if over_budget {
                bar.abandon();
                self.report_budget_stop(&state, &sums, &values)?;
                return Ok((state, EpochEnd::BudgetReached));
            }
        }
        drop(loader);
        bar.finish_and_clear();
        let state = self.end_epoch(state, &sums, &values, plan_done)?;
        Ok((state, EpochEnd::Done))
    }

    /// One iteration on a batch; a batch none of whose images could be read is skipped alone
    /// and refused in a job of several processes (the others would wait for this one).
    fn train_step(&mut self, state: TrainState, batch: Batch, values: &StepValues, sums: &mut EpochSums) -> Result<TrainState> {
        let (cfg, it) = (self.cfg, state.progress.global_step);
        if batch.images == 0 && cfg.processes > 1 {
            bail!("none of the images of this process's share of step {it} could be read (see the warnings above)");
        }
        if batch.images == 0 {
            return Ok(state);
        }
        let shape = cfg.crops();
        let crops = Crops { images: batch.images, global: batch.global, global_size: shape.global_size, local: batch.local, local_size: shape.local_size, local_number: shape.local_crops_number };
        // Stochastic depth draws per step and process.
        let mut drop_rng = StdRng::seed_from_u64(mix_seed(cfg.seed, it as u64, 0xD0 | (self.dist.rank() as u64) << 32));
        let (state, report) = self.step.run(state, &crops, values, &mut drop_rng);
        sums.sync += Duration::from_secs_f64(report.times.combine);
        if !report.loss.is_finite() {
            let progress = &state.progress;
            bail!("loss is {} at epoch {} step {}: stopping; the last good checkpoint is {}", report.loss, progress.epoch, progress.step_in_epoch, self.ckpt_path.display());
        }
        let metrics = StepMetrics { step: it, loss: report.loss, teacher_entropy: report.teacher_entropy, kl: report.kl, lr: values.lr };
        if self.dist.is_main() {
            append_line(&cfg.output_dir.join("metrics.jsonl"), &metrics)?;
        }
        sums.add(&metrics, report.images);
        Ok(state)
    }

    /// Under a time budget, fixes the plan once the first steps are timed (rank 0's clock
    /// decides for every process), says it and records it in the state.
    fn fix_plan_once_timed(&mut self, state: &mut TrainState, bar: &ProgressBar) -> Result<()> {
        if self.schedules.is_some() {
            return Ok(());
        }
        let timed = self.calibration.after_step(state.progress.global_step, self.started.elapsed(), self.cfg.epochs, self.steps);
        if let Some((plan, step_seconds)) = self.dist.broadcast(timed)? {
            if self.dist.is_main() {
                bar.suspend(|| announce_plan(&self.cfg.output_dir, self.cfg, &plan, Some(step_seconds), self.dataset.len()))?;
            }
            state.progress.plan = Some(plan);
            self.schedules = Some(Schedules::new(self.cfg, plan));
        }
        Ok(())
    }

    /// The bar on a terminal; a plain line every tenth of the epoch otherwise (rank 0).
    fn show_progress(&self, bar: &ProgressBar, sums: &EpochSums, progress: &Progress) {
        bar.inc(1);
        bar.set_message(format!("loss {:.4}", sums.mean(sums.loss)));
        let tenth = (self.steps / 10).max(1);
        if self.dist.is_main() && bar.is_hidden() && progress.step_in_epoch.is_multiple_of(tenth) {
            let seconds = sums.elapsed().as_secs_f64();
            eprintln!("epoch {}/{} step {}/{} loss {:.4} ({seconds:.0}s)", progress.epoch + 1, self.epochs_to_run(), progress.step_in_epoch, self.steps, sums.mean(sums.loss));
        }
    }

    /// Rank 0's account of a run the time budget stopped inside an epoch.
    fn report_budget_stop(&self, state: &TrainState, sums: &EpochSums, values: &StepValues) -> Result<()> {
        if !self.dist.is_main() {
            return Ok(());
        }
        let progress = &state.progress;
        let knn_top1 = self.knn.as_ref().map(|k| k.top1(&state.teacher.backbone, &self.step.device)).transpose()?;
        report_epoch(self.cfg, progress.epoch, sums, progress.global_step, values, knn_top1, true)?;
        let unfinished = match &self.schedules {
            Some(s) => format!(" with {} planned steps left", s.plan.total_steps() - progress.global_step),
            None => " before its plan was fixed".into(),
        };
        eprintln!(
            "time budget of {} min reached at epoch {} step {}{unfinished}; checkpoint saved to {}",
            self.cfg.max_minutes,
            progress.epoch,
            progress.step_in_epoch,
            self.ckpt_path.display()
        );
        Ok(())
    }

    /// The end of an epoch, or of the plan inside it: the checkpoint (and a numbered copy every
    /// --saveckp_freq epochs), the online k-NN when due, the log line and the plot.
    fn end_epoch(&self, mut state: TrainState, sums: &EpochSums, values: &StepValues, plan_done: bool) -> Result<TrainState> {
        let (cfg, main) = (self.cfg, self.dist.is_main());
        if sums.steps == 0 && sums.skipped > 0 && main {
            bail!("--data {}: no readable images (all {} tried were skipped)", cfg.data().display(), sums.skipped);
        }
        let epoch = state.progress.epoch;
        let whole_epoch = state.progress.step_in_epoch == self.steps;
        if whole_epoch {
            state.progress.epoch += 1;
            state.progress.step_in_epoch = 0;
        }
        save_checkpoint(self.dist, &self.ckpt_path, &state, &self.step.loss.center, cfg)?;
        if !main {
            return Ok(state);
        }
        if whole_epoch && cfg.saveckp_freq > 0 && (epoch + 1).is_multiple_of(cfg.saveckp_freq) {
            std::fs::copy(&self.ckpt_path, cfg.output_dir.join(format!("checkpoint{epoch:04}.safetensors")))?;
        }
        let knn_due = plan_done || (epoch + 1).is_multiple_of(cfg.knn_every.max(1));
        let knn_top1 = self.knn.as_ref().filter(|_| knn_due).map(|k| k.top1(&state.teacher.backbone, &self.step.device)).transpose()?;
        report_epoch(cfg, epoch, sums, state.progress.global_step, values, knn_top1, !whole_epoch)?;
        Ok(state)
    }
}

/// Writes the checkpoint (rank 0), once every process is known to hold the same weights: a
/// process that drifted ends the run before its weights can reach the file.
fn save_checkpoint(dist: &Dist, path: &std::path::Path, state: &TrainState, center: &burn::tensor::Tensor<2>, cfg: &TrainConfig) -> Result<()> {
    replicas::check_in_step(dist, &state.student, &format!("at step {}", state.progress.global_step))?;
    if dist.is_main() {
        checkpoint::save(path, state, center, cfg)?;
    }
    Ok(())
}

/// The GPU of this process: none in particular alone; with several processes, the one of its
/// rank on this machine, unless the launcher left it a single GPU (CUDA_VISIBLE_DEVICES naming
/// one device, as Slurm's per-task GPU binding does).
fn gpu_of(dist: &Dist) -> Option<usize> {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let one_visible = visible.is_some_and(|v| !v.is_empty() && !v.contains(','));
    (dist.world_size() > 1).then(|| if one_visible { 0 } else { dist.local_rank() })
}

/// "B" in one process, "B × N processes = G" in several.
fn batch_description(cfg: &TrainConfig) -> String {
    match cfg.processes {
        1 => cfg.batch_size_per_gpu.to_string(),
        n => format!("{} ({} per process × {n} processes)", cfg.global_batch(), cfg.batch_size_per_gpu),
    }
}

/// Times the first steps of a budgeted run and fixes its plan from the rate: the first step
/// after (re)starting is left out (allocations, the loader filling up), then steps are timed
/// for `CALIBRATION_BUDGET_SHARE` of the budget (at most `CALIBRATION_SECONDS`), however many
/// steps that is: a rate taken over a second or less ran 12-25% fast on a VM whose clock
/// settles lower under sustained load (BENCHMARKS.md, the quickstart on Zen 4).
struct Calibration {
    budget: Option<Duration>,
    timer: Option<(Instant, usize)>,
}

const CALIBRATION_SECONDS: f64 = 30.0;
const CALIBRATION_BUDGET_SHARE: f64 = 0.02;
const CALIBRATION_MIN_STEPS: usize = 2;

impl Calibration {
    fn new(budget: Option<Duration>) -> Self {
        Self { budget, timer: None }
    }

    /// Called after each step with the next step's index and the time since the run started;
    /// returns the plan and the measured seconds per step once the rate is known.
    fn after_step(&mut self, next_step: usize, elapsed: Duration, epochs: usize, steps_per_epoch: usize) -> Option<(Plan, f64)> {
        let budget = self.budget?.as_secs_f64();
        let Some((since, from_step)) = self.timer else {
            self.timer = Some((Instant::now(), next_step));
            return None;
        };
        let timed = next_step - from_step;
        let seconds = since.elapsed().as_secs_f64();
        let long_enough = seconds >= CALIBRATION_SECONDS.min(CALIBRATION_BUDGET_SHARE * budget);
        if timed < CALIBRATION_MIN_STEPS || !long_enough {
            return None;
        }
        let step_seconds = seconds / timed as f64;
        Some((Plan::for_budget(next_step, budget - elapsed.as_secs_f64(), step_seconds, epochs, steps_per_epoch), step_seconds))
    }
}

/// Says the plan once it is fixed, on the terminal and as a line of log.txt: with the step
/// time a budget measured, or `None` for --plan_steps.
fn announce_plan(run_dir: &std::path::Path, cfg: &TrainConfig, plan: &Plan, step_seconds: Option<f64>, dataset_len: usize) -> Result<()> {
    let warmup = plan.steps_for(cfg.warmup_epochs);
    let line = json!({
        "plan": plan,
        "total_steps": plan.total_steps(),
        "data_epochs": plan.total_steps() as f64 * cfg.global_batch() as f64 / dataset_len as f64,
        "warmup_steps": warmup,
        "step_seconds": step_seconds,
    });
    append_line(&run_dir.join("log.txt"), &line)?;
    let origin = match step_seconds {
        Some(seconds) => format!("for the {}-minute budget: {} steps ({} calibration at {seconds:.3} s/step, then {} scheduled; ", cfg.max_minutes, plan.total_steps(), plan.calibration_steps, plan.scheduled_steps),
        None => format!("from --plan_steps: {} steps (", plan.total_steps()),
    };
    eprintln!("plan {origin}warm-up {warmup} steps, one --epochs epoch = {:.1} steps)", plan.epoch_steps());
    Ok(())
}

/// Appends the epoch's line to log.txt, prints it and redraws the plot. `values` are the
/// schedules' values at the epoch's last step; `partial` marks an epoch cut short by the time
/// budget or the end of the plan; `knn_top1` is the online k-NN result when one was due.
fn report_epoch(cfg: &TrainConfig, epoch: usize, sums: &EpochSums, global_step: usize, values: &StepValues, knn_top1: Option<f64>, partial: bool) -> Result<()> {
    let run_dir = &cfg.output_dir;
    let seconds = sums.elapsed().as_secs_f64();
    let mut line = json!({
        "epoch": epoch,
        "global_step": global_step,
        "partial": partial,
        "train_loss": sums.mean(sums.loss),
        "teacher_entropy": sums.mean(sums.entropy),
        "kl": sums.mean(sums.kl),
        "train_lr": values.lr,
        "train_wd": values.weight_decay,
        "teacher_momentum": values.teacher_momentum,
        "teacher_temp": values.teacher_temp,
        "img_per_s": sums.images as f64 / seconds,
        "data_wait_share": sums.data_wait.as_secs_f64() / seconds,
        "sync_share": sums.sync.as_secs_f64() / seconds,
        "skipped_files": sums.skipped,
        "steps": sums.steps,
        "epoch_seconds": seconds,
    });
    if let Some(top1) = knn_top1 {
        line["knn_top1"] = json!(top1);
    }
    append_line(&run_dir.join("log.txt"), &line)?;
    eprintln!("{line}");
    let knn_points = read_knn_points(&run_dir.join("log.txt"));
    plot(&read_step_metrics(&run_dir.join("metrics.jsonl")), &knn_points, cfg.out_dim, &run_dir.join("training.png"))
}

#[derive(Default)]
struct EpochSums {
    /// When the epoch's steps began (in this process).
    started: Option<Instant>,
    steps: usize,
    images: usize,
    loss: f64,
    entropy: f64,
    kl: f64,
    skipped: usize,
    data_wait: Duration,
    /// Time spent combining the steps over processes (waiting for the slowest included).
    sync: Duration,
}

impl EpochSums {
    fn add(&mut self, m: &StepMetrics, images: usize) {
        self.steps += 1;
        self.images += images;
        self.loss += m.loss;
        self.entropy += m.teacher_entropy;
        self.kl += m.kl;
    }

    fn mean(&self, sum: f64) -> f64 {
        sum / self.steps.max(1) as f64
    }

    fn elapsed(&self) -> Duration {
        self.started.map_or(Duration::ZERO, |t| t.elapsed())
    }
}

/// A bar with ETA on rank 0's terminal; plain lines every 10% of the epoch otherwise.
fn progress_bar(main: bool, len: u64, pos: u64, epoch: usize, epochs: usize) -> ProgressBar {
    let bar = if main && std::io::stderr().is_terminal() {
        ProgressBar::new(len)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(&format!("epoch {}/{epochs} {{bar:30}} {{pos}}/{{len}} [{{elapsed}}<{{eta}}] {{msg}}", epoch + 1))
            .expect("template"),
    );
    bar.set_position(pos);
    bar
}
