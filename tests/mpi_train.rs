//! `dino train` as a job of two processes under Open MPI's `mpirun`, run as a user runs it:
//! the job trains the model one process trains with the whole batch, a rank whose weights drift
//! ends it, a job whose rank is killed resumes to the checkpoint of an uninterrupted one. Built
//! only with the `mpi` feature (scripts/test.sh turns it on; .ci/run installs Open MPI).
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `dino` alone, or as `processes` ranks under mpirun (as root in CI, on a 2-core machine).
fn dino(processes: usize, env: &[(&str, &str)]) -> Command {
    let mut command = if processes == 1 {
        Command::new(env!("CARGO_BIN_EXE_dino"))
    } else {
        let mut c = Command::new("mpirun");
        c.args(["--allow-run-as-root", "--oversubscribe", "-np", &processes.to_string()]);
        for (name, _) in env {
            c.args(["-x", name]);
        }
        c.arg(env!("CARGO_BIN_EXE_dino"));
        c
    };
    command.envs(env.iter().copied());
    command
}

/// ViT-micro/4 on Fashion-MNIST, f32, no stochastic depth, no warm-up and no frozen last layer
/// (so every step moves every weight), a global batch of 8 split over `processes`. SGD: its
/// step is linear in the gradient, so weights differ only by the order of the gradient sums,
/// where Adam would blow float noise up into whole steps on parameters whose gradient is zero
/// in exact arithmetic (the key bias: softmax ignores a per-query constant).
fn run_args(out: &Path, processes: usize, subset: usize, epochs: usize) -> Vec<String> {
    model_run_args(out, processes, subset, epochs, VIT_MICRO)
}

/// The network of most tests: ViT-micro/4 (from the small preset) without stochastic depth.
const VIT_MICRO: &str = "--arch vit_micro --drop_path_rate 0";

/// `run_args` for the network `model` (flags).
fn model_run_args(out: &Path, processes: usize, subset: usize, epochs: usize, model: &str) -> Vec<String> {
    assert!(Path::new(FASHION_MNIST).is_dir(), "these tests need `apt-get install dataset-fashion-mnist` (.ci/run does it)");
    format!(
        "train --data {FASHION_MNIST} --output_dir {} --preset small {model} --local_crops_number 2 --out_dim 256 \
         --head_hidden_dim 128 --head_bottleneck_dim 64 --batch_size_per_gpu {} --subset {subset} --epochs {epochs} \
         --warmup_epochs 0 --freeze_last_layer 0 --optimizer sgd --lr 0.1 --momentum_teacher 0.9 --num_workers 1 --precision f32",
        out.display(),
        8 / processes
    )
    .split_whitespace()
    .map(String::from)
    .collect()
}

fn finished(o: &Output) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{stderr}");
    stderr
}

fn checkpoint(dir: &Path) -> std::collections::HashMap<String, dino::weights::HostTensor> {
    let path = dir.join("checkpoint.safetensors");
    dino::weights::read_safetensors(&std::fs::read(&path).unwrap(), &path).unwrap().0
}

fn step_losses(dir: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap()).collect()
}

/// Three steps of one process with batch 8 and of two processes with 4 each: the same weights
/// (student, teacher, BatchNorm running statistics), centre and per-step losses, up to the
/// order of the float sums. Every checkpoint of the two-process job is written only after
/// both ranks' weights were found bit-identical, which a test below shows is checked.
fn assert_two_processes_train_as_one(name: &str, model: &str) {
    let (one, two) = (scratch(&format!("mpi_one_{name}")), scratch(&format!("mpi_two_{name}")));
    finished(&dino(1, &[]).args(model_run_args(&one, 1, 24, 1, model)).output().unwrap());
    let stderr = finished(&dino(2, &[]).args(model_run_args(&two, 2, 24, 1, model)).output().unwrap());
    assert!(stderr.contains("global batch 8 (4 per process × 2 processes)"), "{stderr}");

    let (a, b) = (checkpoint(&one), checkpoint(&two));
    let mut compared = 0;
    for (name, expected) in a.iter().filter(|(n, _)| n.starts_with("student.") || n.starts_with("teacher.") || *n == "center") {
        let actual = &b[name];
        // A tensor near zero (a bias that barely moved from 0) compares on an absolute 1e-8.
        let scale = expected.values.iter().map(|v| v.abs()).fold(0.0f32, f32::max).max(1e-3);
        let worst = actual.values.iter().zip(&expected.values).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-5 * scale, "{name}: differs by {worst} (largest value {scale})");
        compared += 1;
    }
    assert!(compared > 40, "only {compared} tensors compared");
    // The student moved away from the teacher it started equal to: the steps did something.
    let moved = a.keys().filter_map(|n| n.strip_prefix("student.backbone.")).filter(|n| a[&format!("student.backbone.{n}")].values != a[&format!("teacher.backbone.{n}")].values);
    assert!(moved.count() > 10, "the student's backbone barely moved");

    let (la, lb) = (step_losses(&one), step_losses(&two));
    assert_eq!(la.len(), 3);
    assert_eq!(lb.len(), 3, "rank 0 alone writes the step metrics");
    assert!(la.iter().zip(&lb).all(|(x, y)| (x - y).abs() <= 1e-5 * x.abs()), "{la:?} vs {lb:?}");
}

#[test]
fn two_processes_train_the_model_one_process_trains_with_the_whole_batch() {
    assert_two_processes_train_as_one("vit", VIT_MICRO);
}

/// BatchNorm normalises with the statistics of the job's whole batch (the reference's
/// SyncBatchNorm), forward and backward: a ResNet, whose every block has BatchNorm, and a ViT
/// with BatchNorm in its head train as one process does with the whole batch. Statistics of
/// each rank's half alone would change the outputs, the gradients and the running averages.
#[test]
fn batch_norm_statistics_span_both_processes_as_in_one() {
    assert_two_processes_train_as_one("resnet", "--arch resnet_micro");
    assert_two_processes_train_as_one("vit_bn_head", &format!("{VIT_MICRO} --use_bn_in_head true"));
}

#[test]
fn a_rank_whose_weights_drift_ends_the_job_naming_it_before_any_checkpoint() {
    let out = scratch("mpi_drift");
    let o = dino(2, &[("DINO_TEST_PERTURB_RANK", "1")]).args(run_args(&out, 2, 24, 1)).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(stderr.contains("rank 1: weights differ from rank 0's"), "{stderr}");
    assert!(!out.join("checkpoint.safetensors").exists());
}

/// One rank of a 2-process job is killed (SIGKILL) mid-epoch, after a mid-epoch checkpoint: the
/// job ends, and started again under mpirun it ends with the checkpoint an uninterrupted job
/// writes, bit for bit. Resuming it as one process is refused in one line.
#[test]
fn killed_two_process_job_resumes_to_the_uninterrupted_checkpoint() {
    let args_for = |out: &Path| {
        let mut args = run_args(out, 2, 64, 2);
        args.extend(["--saveckp_steps".into(), "3".into()]);
        args
    };
    let straight = scratch("mpi_straight");
    finished(&dino(2, &[]).args(args_for(&straight)).output().unwrap());

    let killed = scratch("mpi_killed");
    let mut job = dino(2, &[]).args(args_for(&killed)).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    // 8 steps an epoch: wait for step 11 (after the checkpoint at step 9), then kill a rank.
    while std::fs::read_to_string(killed.join("metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0) < 11 {
        assert!(Instant::now() < deadline, "job never reached step 11");
        assert!(job.try_wait().unwrap().is_none(), "job ended before it could be killed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let ranks = Command::new("pgrep").args(["-P", &job.id().to_string()]).output().unwrap();
    let rank = String::from_utf8_lossy(&ranks.stdout).lines().next().expect("a rank process under mpirun").to_string();
    assert!(Command::new("kill").args(["-KILL", &rank]).status().unwrap().success());
    let status = loop {
        if let Some(status) = job.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "mpirun kept running after a rank died");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());

    let o = dino(1, &[]).args(run_args(&killed, 1, 64, 2)).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("resume it with `mpirun -np 2 dino train`"), "{stderr}");

    let stderr = finished(&dino(2, &[]).args(args_for(&killed)).output().unwrap());
    assert!(stderr.contains("resuming from"), "{stderr}");
    let (a, b) = (checkpoint(&straight), checkpoint(&killed));
    assert_eq!(a.len(), b.len());
    for (name, tensor) in &a {
        assert!(b[name].values.iter().map(|v| v.to_bits()).eq(tensor.values.iter().map(|v| v.to_bits())), "{name} differs after resume");
    }
}

/// Ranks started with different settings (here `--subset`, so different epoch lengths) would
/// call the collectives out of step: the job is refused before its first step, naming the rank.
#[test]
fn ranks_with_different_settings_are_refused_naming_the_rank() {
    let out = scratch("mpi_mismatch");
    let dino = env!("CARGO_BIN_EXE_dino");
    let mut command = Command::new("mpirun");
    command.args(["--allow-run-as-root", "--oversubscribe", "-np", "1", dino]).args(run_args(&out, 2, 24, 1));
    command.args([":", "-np", "1", dino]).args(run_args(&out, 2, 32, 1));
    let o = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(stderr.contains("rank 1: settings or --data"), "{stderr}");
    assert!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default().is_empty());
}
