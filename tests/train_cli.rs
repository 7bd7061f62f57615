//! `dino train` run as a user runs it: on a Fashion-MNIST subset and on image folders with
//! broken files; killed and resumed; with bad flags.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

fn dino() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dino"))
}

fn fashion_mnist() -> &'static str {
    assert!(Path::new(FASHION_MNIST).is_dir(), "these tests need `apt-get install dataset-fashion-mnist` (.ci/run does it)");
    FASHION_MNIST
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny but complete run: ViT-micro/4 on 28/12-px crops, 2 local crops, 8 steps an epoch;
/// a teacher momentum of 0.9 lets the teacher follow within so few steps.
fn small_run_args(data: &str, out: &Path, epochs: usize) -> Vec<String> {
    format!(
        "train --data {data} --output_dir {} --preset small --arch vit_micro --local_crops_number 2 \
         --out_dim 256 --batch_size_per_gpu 32 --subset 256 --epochs {epochs} --warmup_epochs 1 --lr 0.004 --momentum_teacher 0.9 --num_workers 2",
        out.display()
    )
    .split_whitespace()
    .map(String::from)
    .collect()
}

/// Sets `--flag value`, replacing the flag's value when it is already there.
fn set_flag(args: &mut Vec<String>, flag: &str, value: &str) {
    match args.iter().position(|a| a == flag) {
        Some(i) => args[i + 1] = value.into(),
        None => args.extend([flag.into(), value.into()]),
    }
}

fn run(args: &[String]) -> Output {
    dino().args(args).output().expect("run dino")
}

fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn checkpoint_tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn trains_on_fashion_mnist_and_writes_logs_checkpoint_and_plot() {
    let out = scratch("train_basic");
    let mut args = small_run_args(fashion_mnist(), &out, 2);
    for (flag, value) in [("--knn_every", "1"), ("--knn_train_subset", "1000"), ("--knn_val_subset", "200")] {
        set_flag(&mut args, flag, value);
    }
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let epochs = json_lines(&out.join("log.txt"));
    assert_eq!(epochs.len(), 2);
    for (i, e) in epochs.iter().enumerate() {
        assert_eq!(e["epoch"], i);
        assert_eq!(e["steps"], 8);
        assert_eq!(e["skipped_files"], 0);
        for key in ["train_loss", "teacher_entropy", "kl", "train_lr", "train_wd", "teacher_momentum", "teacher_temp", "img_per_s", "data_wait_share"] {
            assert!(e[key].as_f64().is_some_and(f64::is_finite), "{key} in {e}");
        }
        // The teacher is neither collapsed to one prototype nor uniform over the 256.
        let h = e["teacher_entropy"].as_f64().unwrap();
        assert!(h > 0.1 && h < (256f64).ln(), "entropy {h}");
        // The online k-NN ran after each epoch, well above chance (10%).
        let knn = e["knn_top1"].as_f64().expect("knn_top1 logged");
        assert!(knn > 20.0 && knn <= 100.0, "k-NN {knn}");
    }
    let steps = json_lines(&out.join("metrics.jsonl"));
    assert_eq!(steps.len(), 16);
    let loss = |e: &serde_json::Value| e["loss"].as_f64().unwrap();
    assert!(steps.iter().all(|s| loss(s).is_finite()));
    assert!(loss(&steps[15]) < loss(&steps[0]), "loss did not fall: {} -> {}", loss(&steps[0]), loss(&steps[15]));
    let epoch_loss = |e: &serde_json::Value| e["train_loss"].as_f64().unwrap();
    assert!(epoch_loss(&epochs[1]) < epoch_loss(&epochs[0]));
    // The student closes in on its teacher: KL(teacher || student) falls.
    let kl = |e: &serde_json::Value| e["kl"].as_f64().unwrap();
    assert!(kl(&epochs[1]) < kl(&epochs[0]), "KL did not fall: {} -> {}", kl(&epochs[0]), kl(&epochs[1]));

    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["arch"], "vit_micro", "flags override the preset");
    assert_eq!(config["global_crop_size"], 28, "the preset sets crop sizes");
    let png = std::fs::read(out.join("training.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert!(out.join("checkpoint.safetensors").is_file());
    assert!(!out.join("checkpoint.tmp").exists());
}

#[test]
fn killed_run_resumes_to_bit_identical_weights() {
    let data = fashion_mnist();
    assert_resumes_bit_identically("resume", |out| small_run_args(data, out, 2));
}

/// Runs `args_for(dir)` (2 epochs of 8 steps) straight through, and again killed in the
/// second epoch after a mid-epoch checkpoint and resumed: every checkpoint tensor (weights,
/// running statistics, optimizer buffers, centre) must come out bit-identical.
fn assert_resumes_bit_identically(name: &str, args_for: impl Fn(&Path) -> Vec<String>) {
    let straight = scratch(&format!("{name}_straight"));
    let mut args = args_for(&straight);
    set_flag(&mut args, "--saveckp_steps", "3");
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let killed = scratch(&format!("{name}_killed"));
    let mut args = args_for(&killed);
    set_flag(&mut args, "--saveckp_steps", "3");
    let mut child = dino().args(&args).stderr(std::process::Stdio::null()).spawn().unwrap();
    // Kill it in the second epoch, after a mid-epoch checkpoint (step 9 of 16).
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let lines = std::fs::read_to_string(killed.join("metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0);
        if lines >= 11 {
            break;
        }
        assert!(Instant::now() < deadline, "run never reached step 11");
        assert!(child.try_wait().unwrap().is_none(), "run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(json_lines(&killed.join("log.txt")).len() == 1, "killed mid second epoch");

    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("resuming from"));
    let a = checkpoint_tensors(&straight.join("checkpoint.safetensors"));
    let b = checkpoint_tensors(&killed.join("checkpoint.safetensors"));
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta == tb, "tensor {na} differs after resume");
    }
}

/// Waits until `ready(lines of out/metrics.jsonl)` holds, then kills the run (SIGKILL);
/// returns the number of lines it had logged.
fn kill_when(child: &mut std::process::Child, out: &Path, ready: impl Fn(usize) -> bool) -> usize {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let lines = std::fs::read_to_string(out.join("metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0);
        if ready(lines) {
            child.kill().unwrap();
            child.wait().unwrap();
            return lines;
        }
        assert!(Instant::now() < deadline, "run never got ready to be killed");
        assert!(child.try_wait().unwrap().is_none(), "run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The plan line a budgeted run writes into log.txt, once it is fixed.
fn plan_of(out: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("log.txt")).ok()?;
    text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find(|v| v.get("plan").is_some())
}

/// A cosine schedule from `base` to `end` over `steps` steps without warm-up, at its last step
/// (i = steps - 1), computed here by hand.
fn cosine_end(base: f64, end: f64, steps: usize) -> f64 {
    end + 0.5 * (base - end) * (1.0 + (std::f64::consts::PI * (steps - 1) as f64 / steps as f64).cos())
}

/// `--plan_steps N` lays the schedules over exactly N steps without timing anything: the run
/// ends after step N (past an epoch's end) with every schedule at its end, and the progress
/// lines count the epochs the plan reaches. The plan is kept in
/// the checkpoint, so a second call with another `--plan_steps` resumes the first plan, which
/// is finished, and changes nothing.
#[test]
fn plan_steps_fixes_the_plan_without_a_budget() {
    let out = scratch("plan_steps");
    let args_for = |steps: &str| {
        let mut args = small_run_args(fashion_mnist(), &out, 1000);
        set_flag(&mut args, "--plan_steps", steps);
        set_flag(&mut args, "--min_lr", "0.0001");
        args
    };
    let o = run(&args_for("12"));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && stderr.contains("plan from --plan_steps: 12 steps"), "{stderr}");
    assert!(stderr.contains("epoch 2/2 step") && !stderr.contains("/1000 step"), "progress counts the plan's 2 epochs, not --epochs: {stderr}");
    let plan = plan_of(&out).expect("the plan's line in log.txt");
    assert_eq!((plan["total_steps"].as_u64(), plan["step_seconds"].is_null()), (Some(12), true), "{plan}");
    let last_step = || json_lines(&out.join("metrics.jsonl")).iter().map(|s| s["step"].as_u64().unwrap()).max();
    assert_eq!(last_step(), Some(11), "8 steps an epoch: the plan ends 4 steps into the second");
    let last = json_lines(&out.join("log.txt")).pop().unwrap();
    let close = |key: &str, expected: f64| assert!((last[key].as_f64().unwrap() - expected).abs() < 1e-9, "{key}: {last} vs {expected}");
    close("train_lr", cosine_end(0.004 * 32.0 / 256.0, 1e-4, 12));
    close("teacher_momentum", cosine_end(0.9, 1.0, 12));

    let finished = checkpoint_tensors(&out.join("checkpoint.safetensors"));
    let o = run(&args_for("40"));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && stderr.contains("resuming from") && !stderr.contains("plan from --plan_steps"), "{stderr}");
    assert_eq!(last_step(), Some(11));
    assert_eq!(checkpoint_tensors(&out.join("checkpoint.safetensors")), finished);
}

/// Under `--max_minutes` the schedules are laid over the steps the budget buys: the run ends at
/// its planned step, before the budget, with the learning rate and teacher momentum at the ends
/// of their cosines and the temperature at its final value. Killed after the plan is fixed, a
/// run resumes to the same weights as one that went on uninterrupted from the same checkpoint.
#[test]
fn time_budget_plans_the_schedules_and_resumes_bit_identically() {
    let args_for = |out: &Path, minutes: &str| {
        let mut args = small_run_args(fashion_mnist(), out, 1000);
        for (flag, value) in [
            ("--max_minutes", minutes),
            ("--batch_size_per_gpu", "16"),
            ("--head_hidden_dim", "128"),
            ("--head_bottleneck_dim", "64"),
            ("--saveckp_steps", "4"),
            ("--warmup_teacher_temp", "0.02"),
            ("--warmup_teacher_temp_epochs", "300"),
            ("--teacher_temp", "0.05"),
            ("--min_lr", "0.0001"),
        ] {
            set_flag(&mut args, flag, value);
        }
        args
    };
    let spawn = |args: Vec<String>| dino().args(args).stderr(std::process::Stdio::null()).spawn().unwrap();

    // A 24-second budget, killed once its plan is fixed and a checkpoint (every 4 steps) holds it.
    let uninterrupted = scratch("budget_uninterrupted");
    let mut child = spawn(args_for(&uninterrupted, "0.4"));
    let calibration = || plan_of(&uninterrupted).map(|p| p["plan"]["calibration_steps"].as_u64().unwrap() as usize);
    let killed_at = kill_when(&mut child, &uninterrupted, |lines| calibration().is_some_and(|c| lines >= c + 5));
    let plan = plan_of(&uninterrupted).unwrap();
    let total = plan["total_steps"].as_u64().unwrap() as usize;
    let scheduled = plan["plan"]["scheduled_steps"].as_u64().unwrap() as usize;
    assert!(total > killed_at + 20, "a plan of {total} steps is too short to test (killed at {killed_at})");
    assert!(total as f64 * plan["step_seconds"].as_f64().unwrap() < 24.0, "{plan}");

    // Both copies continue the stored plan (a longer budget on resuming changes nothing); one
    // is killed once more on the way.
    let interrupted = scratch("budget_interrupted");
    for file in ["checkpoint.safetensors", "log.txt", "metrics.jsonl"] {
        std::fs::copy(uninterrupted.join(file), interrupted.join(file)).unwrap();
    }
    let o = run(&args_for(&uninterrupted, "5"));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && stderr.contains("resuming from") && !stderr.contains("time budget"), "{stderr}");
    let mut child = spawn(args_for(&interrupted, "5"));
    kill_when(&mut child, &interrupted, |lines| lines >= killed_at + 10);
    let o = run(&args_for(&interrupted, "5"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(checkpoint_tensors(&uninterrupted.join("checkpoint.safetensors")), checkpoint_tensors(&interrupted.join("checkpoint.safetensors")));

    // The run stopped at its planned step with every schedule at its end.
    let steps = json_lines(&uninterrupted.join("metrics.jsonl"));
    assert_eq!(steps.iter().map(|s| s["step"].as_u64().unwrap()).max(), Some(total as u64 - 1));
    let last = json_lines(&uninterrupted.join("log.txt")).pop().unwrap();
    // --warmup_epochs 1 of 1000 rounds to no warm-up step.
    let close = |key: &str, expected: f64| assert!((last[key].as_f64().unwrap() - expected).abs() < 1e-9, "{key}: {last} vs {expected}");
    close("train_lr", cosine_end(0.004 * 16.0 / 256.0, 1e-4, scheduled));
    close("teacher_momentum", cosine_end(0.9, 1.0, scheduled));
    close("teacher_temp", 0.05);
    assert!(last["teacher_momentum"].as_f64().unwrap() > 0.999);
    assert!(last["train_lr"].as_f64().unwrap() < 1.05e-4);
}

/// The small run with a ResNet backbone: `--arch resnet_micro` brings the ResNet recipe.
fn resnet_run_args(data: &str, out: &Path) -> Vec<String> {
    let mut args = small_run_args(data, out, 2);
    set_flag(&mut args, "--arch", "resnet_micro");
    set_flag(&mut args, "--lr", "0.1");
    args
}

#[test]
fn resnet_trains_with_its_recipe_and_resumes() {
    let data = fashion_mnist();
    assert_resumes_bit_identically("resnet_resume", |out| resnet_run_args(data, out));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("resnet_resume_straight");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!((config["optimizer"].as_str(), config["weight_decay"].as_f64()), (Some("sgd"), Some(1e-4)));
    assert_eq!(config["global_crops_scale"], serde_json::json!([0.14, 1.0]));
    let log = json_lines(&out.join("log.txt"));
    assert_eq!(log.len(), 2);
    assert!(log.iter().all(|l| l["train_loss"].as_f64().unwrap().is_finite()));

    // BatchNorm statistics are checkpointed, moved away from their init (mean 0, variance 1),
    // and the teacher keeps its own (the EMA covers parameters only).
    let bytes = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    let tensors = dino::weights::read_safetensors(&bytes, &out).unwrap().0;
    let student = &tensors["student.backbone.bn1.running_var"].values;
    let teacher = &tensors["teacher.backbone.bn1.running_var"].values;
    assert!(student.iter().any(|v| (v - 1.0).abs() > 0.05), "running variance never updated: {student:?}");
    assert!(student != teacher, "teacher statistics equal the student's");
    assert!(tensors.contains_key("optim.backbone.conv1.weight.momentum_buffer"));

    // The checkpoint is a backbone for the evaluation commands and exports under torchvision's names.
    let ckpt = out.join("checkpoint.safetensors");
    let exported = out.join("resnet.safetensors");
    let o = dino().args(["export", "--weights", ckpt.to_str().unwrap(), "--output", exported.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&exported).unwrap();
    let names = dino::weights::read_safetensors(&bytes, &exported).unwrap().0;
    assert!(names.contains_key("layer4.0.downsample.1.running_var") && names.contains_key("conv1.weight"));
    let o = dino()
        .args(["knn", "--weights", ckpt.to_str().unwrap(), "--train_data", data, "--test_data", data, "--subset_train", "500", "--subset_test", "100"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Top1"));
}

/// A PNG whose header claims a 30-gigapixel image: it must be skipped, not decoded.
fn huge_png_header(width: u32, height: u32) -> Vec<u8> {
    fn chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
        out
    }
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IEND", &[]));
    png
}

fn write_png(path: &Path, seed: u32) {
    let img = image::RgbImage::from_fn(20, 16, |x, y| image::Rgb([(x * 12 + seed) as u8, (y * 15) as u8, ((x * y + seed * 7) % 255) as u8]));
    img.save(path).unwrap();
}

#[test]
fn broken_files_are_skipped_and_named() {
    let dir = scratch("broken_files");
    let data = dir.join("data");
    for class in ["cats", "dogs"] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for i in 0..7 {
            write_png(&data.join(class).join(format!("{i}.png")), i * 31);
        }
    }
    let mut jpeg = Vec::new();
    image::RgbImage::from_pixel(32, 32, image::Rgb([200, 10, 10]))
        .write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
        .unwrap();
    std::fs::write(data.join("cats/truncated.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
    std::fs::write(data.join("dogs/empty.png"), b"").unwrap();
    std::fs::write(data.join("dogs/notes.png"), b"this is not an image").unwrap();
    std::fs::write(data.join("dogs/huge.png"), huge_png_header(200_000, 150_000)).unwrap();
    // A misnamed file is read by its content, not skipped.
    std::fs::copy(data.join("cats/0.png"), data.join("cats/actually_a_png.jpg")).unwrap();

    let args = |data: &Path, out: &Path, batch: usize| -> Vec<String> {
        format!(
            "train --data {} --output_dir {} --preset small --arch vit_micro --local_crops_number 1 --out_dim 64 \
             --batch_size_per_gpu {batch} --epochs 1 --warmup_epochs 0",
            data.display(),
            out.display()
        )
        .split_whitespace()
        .map(String::from)
        .collect()
    };
    // One batch holding all 19 files, so none is left out with the last partial batch.
    let out = dir.join("run");
    let o = run(&args(&data, &out, 19));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    for bad in ["truncated.jpg", "empty.png", "notes.png", "huge.png"] {
        assert!(stderr.lines().any(|l| l.contains("warning: skipped") && l.contains(bad)), "{bad} not named in:\n{stderr}");
    }
    assert!(!stderr.contains("actually_a_png"), "{stderr}");
    let epochs = json_lines(&out.join("log.txt"));
    assert_eq!(epochs[0]["skipped_files"], 4);

    // Nothing readable at all is an error, not a silent empty run.
    let only_bad = dir.join("only_bad");
    std::fs::create_dir_all(&only_bad).unwrap();
    std::fs::write(only_bad.join("a.png"), b"").unwrap();
    std::fs::write(only_bad.join("b.jpg"), b"nope").unwrap();
    let o = run(&args(&only_bad, &dir.join("run_bad"), 1));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no readable images"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn non_finite_loss_stops_the_run_and_keeps_the_checkpoint() {
    let out = scratch("non_finite");
    // A learning rate this large blows the weights up after the first step.
    let mut args = small_run_args(fashion_mnist(), &out, 1);
    set_flag(&mut args, "--lr", "1e36");
    set_flag(&mut args, "--warmup_epochs", "0");
    set_flag(&mut args, "--saveckp_steps", "1");
    let o = run(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(stderr.contains("loss is") && stderr.contains("stopping"), "{stderr}");
    assert!(out.join("checkpoint.safetensors").is_file());
}

#[test]
fn bad_input_gives_one_line_errors() {
    let out = scratch("bad_input");
    let unlabelled = out.join("flat");
    std::fs::create_dir_all(&unlabelled).unwrap();
    write_png(&unlabelled.join("a.png"), 1);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["train".into(), "--arch".into(), "vit_giant".into(), "--data".into(), out.display().to_string()], "--arch"),
        (vec!["train".into(), "--output_dir".into(), out.display().to_string()], "--data is required"),
        (vec!["train".into(), "--data".into(), "/no/such/dir".into(), "--output_dir".into(), out.display().to_string()], "/no/such/dir"),
        (
            ["train", "--data", unlabelled.to_str().unwrap(), "--batch_size_per_gpu", "1", "--knn_every", "1", "--output_dir", out.to_str().unwrap()].map(String::from).to_vec(),
            "--knn_every",
        ),
    ];
    for (args, needle) in cases {
        let o = run(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
    }
    let config = out.join("bad.toml");
    std::fs::write(&config, "epochs = 3\nlearning_rate = 0.1\n").unwrap();
    let o = dino().args(["train", "--config"]).arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("unknown setting 'learning_rate'"), "{stderr}");
}

#[test]
fn pretrained_weights_initialise_the_backbone() {
    let source = scratch("pretrained_source");
    let mut args = small_run_args(fashion_mnist(), &source, 1);
    set_flag(&mut args, "--subset", "64");
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let source_ckpt = source.join("checkpoint.safetensors");

    // Learning rate 0 and teacher momentum 1: the backbones stay what they were loaded as.
    let out = scratch("pretrained_init");
    let mut args = small_run_args(fashion_mnist(), &out, 1);
    for (flag, value) in [("--subset", "64"), ("--lr", "0"), ("--momentum_teacher", "1"), ("--pretrained_weights", source_ckpt.to_str().unwrap())] {
        set_flag(&mut args, flag, value);
    }
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("backbone initialised from"));
    let backbone = |path: &Path, net: &str| -> Vec<(String, Vec<u8>)> {
        checkpoint_tensors(path).into_iter().filter_map(|(k, v)| Some((k.strip_prefix(&format!("{net}.backbone."))?.to_string(), v))).collect()
    };
    let loaded = backbone(&source_ckpt, "teacher");
    assert_eq!(loaded.len(), 4 * 12 + 6);
    assert_eq!(backbone(&out.join("checkpoint.safetensors"), "teacher"), loaded);
    assert_eq!(backbone(&out.join("checkpoint.safetensors"), "student"), loaded);

    let mut args = small_run_args(fashion_mnist(), &scratch("pretrained_wrong_arch"), 1);
    for (flag, value) in [("--arch", "vit_tiny"), ("--pretrained_weights", source_ckpt.to_str().unwrap())] {
        set_flag(&mut args, flag, value);
    }
    let o = run(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("--pretrained_weights"), "{stderr}");
}

/// `--precision bf16` trains the same network: from the same weights and crops the first
/// step's loss equals f32's up to bf16 rounding, and over an epoch the losses stay close and
/// fall alike — on each engine path, and through burn's bf16 products (the engine turned off:
/// the GPUs' mixed precision, run by the CPU backend). Without bf16 hardware, and for a ResNet,
/// the flag is refused with one line; `--precision auto` runs the precision the CPU has.
#[test]
fn bf16_training_follows_f32() {
    let out = scratch("train_bf16");
    // Each run writes its own directory: a second run into one holding a finished checkpoint
    // would resume it and train nothing.
    let args_at = |precision: &str, path: &str| {
        let mut args = small_run_args(fashion_mnist(), &out.join(format!("{precision}-{path}")), 1);
        set_flag(&mut args, "--precision", precision);
        args
    };
    let mut resnet = args_at("bf16", "resnet");
    set_flag(&mut resnet, "--arch", "resnet_micro");
    let o = run(&resnet);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.trim().lines().count() == 1 && stderr.contains("--precision"), "{stderr}");
    if !dino::engine::cpu::Cpu::supported()[0].has_bf16_hardware() {
        let o = run(&args_at("bf16", "default"));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && stderr.trim().lines().count() == 1 && stderr.contains("AVX512-BF16"), "{stderr}");
    }
    let losses = |precision: &str, engine: Option<&str>| {
        let path = engine.unwrap_or("default");
        let o = dino().args(args_at(precision, path)).envs(engine.map(|path| ("DINO_ENGINE_PATH", path))).output().expect("run dino");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        json_lines(&out.join(format!("{precision}-{path}")).join("metrics.jsonl")).iter().map(|s| s["loss"].as_f64().unwrap()).collect::<Vec<_>>()
    };
    let f32_losses = losses("f32", None);
    eprintln!("f32 {f32_losses:?}");
    let relative = |a: f64, b: f64| (a - b).abs() / b.abs();
    for path in common::engine_paths("bf16 training").into_iter().chain(["burn"]) {
        let bf16_losses = losses("bf16", Some(path));
        assert_eq!(bf16_losses.len(), 8);
        eprintln!("bf16 on {path} {bf16_losses:?}");
        assert!(relative(bf16_losses[0], f32_losses[0]) < 1e-3, "{path}: first loss {} vs {}", bf16_losses[0], f32_losses[0]);
        for (b, f) in bf16_losses.iter().zip(&f32_losses) {
            assert!(relative(*b, *f) < 5e-3, "{path}: {b} vs {f}");
        }
        assert!(bf16_losses[7] < bf16_losses[0], "bf16 loss on {path} did not fall: {bf16_losses:?}");
    }
    // --precision auto is bf16 on a CPU that multiplies bf16 in hardware and f32 elsewhere: the
    // same run as the one it picks, loss for loss.
    let auto_losses = losses("auto", None);
    let expected = if dino::engine::cpu::Cpu::supported()[0].has_bf16_hardware() { losses("bf16", None) } else { f32_losses };
    assert_eq!(auto_losses, expected, "--precision auto");
}

/// A ResNet-micro checkpoint written in the first checkpoint format (make_checkpoint_v1.sh,
/// by the code of 2026-12-02) still evaluates to the features that code extracted from it, and
/// still resumes: its run goes on into a second epoch and is saved in today's format.
#[test]
fn a_format_1_checkpoint_evaluates_and_resumes() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint_v1");
    let out = scratch("format_1");
    let o = dino()
        .args(["extract", "--data", fashion_mnist(), "--split", "test", "--subset", "16", "--center_crop", "1", "--pretrained_weights"])
        .arg(fixture.join("checkpoint.safetensors"))
        .arg("--output_dir")
        .arg(out.join("features"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let features = dino::weights::npy::read(&out.join("features/features.npy")).unwrap();
    let expected = dino::weights::npy::read(&fixture.join("teacher_features.npy")).unwrap();
    assert_eq!(features.shape, vec![16, 256]);
    let actual: Vec<f32> = features.values.iter().map(|&v| v as f32).collect();
    let expected: Vec<f32> = expected.values.iter().map(|&v| v as f32).collect();
    assert!(common::relative_error(&actual, &expected) < 1e-5, "features drift: {}", common::relative_error(&actual, &expected));

    let run = out.join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::copy(fixture.join("checkpoint.safetensors"), run.join("checkpoint.safetensors")).unwrap();
    let args = format!(
        "train --data {} --output_dir {} --preset quick --arch resnet_micro --subset 64 --batch_size_per_gpu 16 --epochs 2 --warmup_epochs 1 --out_dim 64 \
         --head_hidden_dim 32 --head_bottleneck_dim 16 --saveckp_freq 0 --num_workers 1 --seed 3",
        fashion_mnist(),
        run.display()
    );
    let o = run_args(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && stderr.contains("resuming from") && stderr.contains("at epoch 1 step 0"), "{stderr}");
    let epochs = json_lines(&run.join("log.txt"));
    assert_eq!((epochs.len(), epochs[0]["epoch"].as_u64(), epochs[0]["global_step"].as_u64()), (1, Some(1), Some(8)));
    let bytes = std::fs::read(run.join("checkpoint.safetensors")).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let record: serde_json::Value = serde_json::from_str(&header.metadata().as_ref().unwrap()["dino_train"]).unwrap();
    assert_eq!((record["format"].as_u64(), record["progress"]["epoch"].as_u64()), (Some(2), Some(2)));
}

fn run_args(args: &str) -> Output {
    run(&args.split_whitespace().map(String::from).collect::<Vec<_>>())
}

/// `model-info` takes its flags in the same snake_case as `train` (as the README shows) and
/// counts the quick preset's ViT-Micro/7 at 28 px by hand: 4·4 patches + cls = 17 tokens;
/// patch projection 64·3·7·7 + 64 = 9472, cls 64, position embedding 17·64 = 1088, four
/// blocks of 2·128 (norms) + 64·192 + 192 (qkv) + 64·64 + 64 (proj) + 64·256 + 256 (fc1) +
/// 256·64 + 64 (fc2) = 49984 each, final norm 128: 210688.
#[test]
fn model_info_counts_a_vit_by_hand() {
    let (ok, stdout, stderr) = common::run_dino(&["model-info", "--arch", "vit_micro", "--patch_size", "7", "--img_size", "28", "--out_dim", "64"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("vit_micro/7 at 28px: 17 tokens, dim 64, depth 4, heads 2"), "{stdout}");
    assert!(stdout.contains("backbone parameters: 210688"), "{stdout}");
}
