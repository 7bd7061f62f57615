//! Our side of the speed harness (bench/run.sh runs it next to bench/dino_step.py): one DINO
//! training step — `dino train`'s own `TrainStep`: teacher forward on the global crops, student
//! forward on all crops, loss, backward, clipped AdamW, teacher EMA — or feature extraction,
//! timed part by part, at either precision.
//! Prints one JSON line: median seconds, images per second, peak RSS, the step's parts, and
//! `threads_busy`, the CPU seconds of the timed steps over their wall seconds (2.0 on two
//! threads that never wait).
//!
//!     cargo run --release --example bench -- --mode step --arch vit_tiny --patch 16 --batch 8 --out_dim 65536
//!     cargo run --release --example bench -- --mode step --arch vit_tiny --patch 16 --batch 8 --out_dim 65536 --precision bf16
//!     cargo run --release --example bench -- --mode extract --arch vit_small --batch 64 --precision bf16
//!     DINO_ENGINE_PATH=avx2 cargo run --release --example bench -- --mode products --arch vit_small --batch 64 --precision f32
//!
//! `--mode products` times the engine's matrix products alone (f32 or bf16 inputs), on the
//! selected engine path, at the shapes of one ViT block's forward pass (rows = batch · tokens
//! at `--global_size`), and prints GFLOP/s per shape, next to the same f32 product through
//! burn's flex backend (`<shape>_burn_f32`, the `gemm` crate's kernels).
//!
//! `--mode allreduce` (build with `--features mpi`, start under mpirun) times the sum over all
//! ranks of a gradient buffer as large as the model's (backbone and head) parameters, as
//! `dino train` runs it every step, and prints seconds and bandwidths:
//!
//!     mpirun -np 2 target/release/examples/bench --mode allreduce --arch vit_small --out_dim 65536

use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Distribution, Tensor};
use dino::eval::features::{FeatureLayout, FeatureNetwork, Precision};
use dino::model::{DinoHeadConfig, DinoModel, Network, VitConfig};
use dino::dist::Dist;
use dino::train::schedule::StepValues;
use dino::train::{checkpoint, loss::DinoLoss, optim, step};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map_or(default, |v| v.parse().ok().expect("a valid value"))
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok()).map_or(0.0, |kb| kb / 1024.0)
}

/// CPU seconds this process has used, all threads, user and system.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes one rusage struct, which lives on this stack frame.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    dino::engine::start_compute(0).expect("compute threads");
    let mode: String = arg("--mode", "step".to_string());
    let arch: String = arg("--arch", "vit_tiny".to_string());
    let (patch, batch, out_dim): (usize, usize, usize) = (arg("--patch", 16), arg("--batch", 8), arg("--out_dim", 65536));
    let (gsize, lsize, nlocal): (usize, usize, usize) = (arg("--global_size", 224), arg("--local_size", 96), arg("--nlocal", 8));
    let (steps, warmup): (usize, usize) = (arg("--steps", 5), arg("--warmup", 2));
    let (hidden, bottleneck): (usize, usize) = (arg("--head_hidden_dim", 2048), arg("--head_bottleneck_dim", 256));
    let device: String = arg("--device", "cpu".to_string());
    let precision: String = arg("--precision", "f32".to_string());
    let precision = <Precision as clap::ValueEnum>::from_str(&precision, true).expect("--precision f32 or bf16");
    let kind = <dino::device::DeviceKind as clap::ValueEnum>::from_str(&device, true).expect("--device cpu, cuda or vulkan");
    let dev = kind.open(None).expect("device available in this build");
    let mut vit = VitConfig::from_arch(&arch, patch).expect("known arch");
    vit.img_size = gsize;
    vit.drop_path_rate = 0.1;
    let mut rng = StdRng::seed_from_u64(0);
    let backbone = vit.init(&mut rng, &dev);
    let mut times = Vec::new();
    // CPU seconds of each timed step or batch, for the threads' average occupancy.
    let mut busy = Vec::new();
    let mut parts: Vec<[f64; 3]> = Vec::new();
    if mode == "allreduce" {
        let head = DinoHeadConfig { hidden_dim: hidden, bottleneck_dim: bottleneck, ..DinoHeadConfig::new(vit.embed_dim, out_dim) }.init(&mut rng, &dev);
        allreduce(backbone.num_params() + head.num_params(), steps);
        return;
    }
    if mode == "products" {
        match precision {
            Precision::F32 => products::<f32>(&vit, batch, steps),
            Precision::Bf16 => products::<u16>(&vit, batch, steps),
        }
        return;
    }
    if let Err(e) = dino::engine::check_precision("--precision", precision, vit.embed_dim / vit.num_heads, &dev) {
        eprintln!("{e}");
        std::process::exit(2);
    }
    if mode == "extract" {
        let network = Network::Vit(backbone);
        let network = FeatureNetwork::new(&network, precision).expect("--precision available here");
        for _ in 0..warmup + steps {
            let x = Tensor::<4>::random([batch, 3, gsize, gsize], Distribution::Normal(0.0, 1.0), &dev);
            let (t0, cpu0) = (Instant::now(), cpu_seconds());
            let _ = network.kind(FeatureLayout::CLS).features(x).into_data();
            times.push(t0.elapsed().as_secs_f64());
            busy.push(cpu_seconds() - cpu0);
        }
    } else {
        let head = DinoHeadConfig { hidden_dim: hidden, bottleneck_dim: bottleneck, ..DinoHeadConfig::new(vit.embed_dim, out_dim) }.init(&mut rng, &dev);
        let student = DinoModel { backbone: dino::model::Network::Vit(backbone), head };
        let teacher = student.valid();
        let student = student.fork(&dev.clone().autodiff()).train();
        let optimizer = optim::Optimizer::new(optim::OptimizerKind::Adamw);
        let progress = checkpoint::Progress { epoch: 0, step_in_epoch: 0, global_step: 0, plan: None };
        let mut state = checkpoint::TrainState { student, teacher, optimizer, progress };
        let dist = Dist::single();
        let loss = DinoLoss::new(out_dim, 2 + nlocal, &dev);
        let mut train_step = step::TrainStep { dist: &dist, device: dev.clone(), precision, clip_grad: Some(3.0), loss, perturbed: false };
        let values = StepValues { lr: 1e-4, weight_decay: 0.04, teacher_momentum: 0.996, teacher_temp: 0.04, last_layer_frozen: false };
        for _ in 0..warmup + steps {
            let pixels = |count: usize, size: usize| {
                let t = Tensor::<4>::random([count, 3, size, size], Distribution::Normal(0.0, 1.0), &dev);
                t.into_data().try_to_vec::<f32>().expect("f32 pixels")
            };
            let crops = step::Crops { images: batch, global: pixels(2 * batch, gsize), global_size: gsize, local: pixels(nlocal * batch, lsize), local_size: lsize, local_number: nlocal };
            let (t0, cpu0) = (Instant::now(), cpu_seconds());
            let report;
            (state, report) = train_step.run(state, &crops, &values, &mut rng);
            assert!(report.loss.is_finite(), "non-finite loss {}", report.loss);
            // Waits for queued GPU work before the clock stops.
            let _ = state.teacher.head.last_layer.weight_v.val().into_data();
            times.push(t0.elapsed().as_secs_f64());
            busy.push(cpu_seconds() - cpu0);
            let t = report.times;
            parts.push([t.forward_backward, t.optimizer, t.ema]);
        }
    }
    let m = median(times[warmup..].to_vec());
    let threads_busy = busy[warmup..].iter().sum::<f64>() / times[warmup..].iter().sum::<f64>();
    let mut line = serde_json::json!({ "impl": format!("dino ({device}, {precision:?})"), "median_s": m, "img_per_s": batch as f64 / m, "peak_rss_mb": peak_rss_mb(), "threads_busy": threads_busy });
    if !parts.is_empty() {
        let names = ["forward_backward", "adamw", "ema"];
        for (i, name) in names.iter().enumerate() {
            line[name] = serde_json::json!(median(parts[warmup..].iter().map(|p| p[i]).collect()));
        }
    }
    println!("{line}");
}

/// GFLOP/s of the engine's products at one ViT block's shapes (qkv, proj, fc1, fc2).
fn products<E: dino::engine::matmul::Element>(vit: &VitConfig, batch: usize, repeats: usize) {
    use dino::engine::matmul::{Matrix, Packed, add_weight_gradient, matmul};
    let (d, hidden) = (vit.embed_dim, vit.embed_dim * vit.mlp_ratio);
    let rows = batch * (1 + (vit.img_size / vit.patch_size).pow(2));
    let mut rng = StdRng::seed_from_u64(0);
    let path = dino::engine::cpu::Cpu::selected().expect("DINO_ENGINE_PATH names a path this CPU runs").path();
    let mut line = serde_json::json!({ "impl": format!("dino {} products ({})", std::any::type_name::<E>(), path.name()), "rows": rows });
    for (name, k, n) in [("qkv", d, 3 * d), ("proj", d, d), ("fc1", d, hidden), ("fc2", hidden, d)] {
        let mut values = |count: usize| -> Vec<f32> { (0..count).map(|_| rand::Rng::random_range(&mut rng, -1.0f32..1.0)).collect() };
        let (a_values, b_values) = (values(rows * k), values(k * n));
        let mut a = Matrix::<E>::zeros(rows, k);
        for (i, src) in a_values.chunks(k).enumerate() {
            for (dst, &v) in a.row_mut(i).iter_mut().zip(src) {
                *dst = E::from_f32(v);
            }
        }
        let b = Packed::<E>::pack(k, n, |i| &b_values[i * n..(i + 1) * n]);
        let mut out = vec![0f32; rows * n];
        let mut times = Vec::new();
        for _ in 0..repeats + 1 {
            let t0 = Instant::now();
            matmul(a.view(), &b, &mut out, n, |dst, v, _, _| dst.copy_from_slice(v));
            times.push(t0.elapsed().as_secs_f64());
        }
        let gflops = |times: Vec<f64>| (2 * rows * k * n) as f64 / median(times[1..].to_vec()) / 1e9;
        line[name] = serde_json::json!(gflops(times));
        // The same layer's weight gradient: [k, n] += Aᵀ · dy over the rows, dy [rows, n].
        let mut dy = Matrix::<E>::zeros(rows, n);
        for (i, v) in values(rows * n).chunks(n).enumerate() {
            for (dst, &v) in dy.row_mut(i).iter_mut().zip(v) {
                *dst = E::from_f32(v);
            }
        }
        let (mut packed, mut grad) = (Packed::<E>::default(), vec![0f32; k * n]);
        let times = (0..repeats + 1)
            .map(|_| {
                let t0 = Instant::now();
                add_weight_gradient(&a, &dy, rows, &mut packed, &mut grad);
                t0.elapsed().as_secs_f64()
            })
            .collect();
        line[format!("{name}_weight_gradient")] = serde_json::json!(gflops(times));
        // The same f32 product through burn's flex backend (the `gemm` crate's kernels).
        let dev = burn::tensor::Device::flex();
        let (a, b) = (Tensor::<2>::from_data(burn::tensor::TensorData::new(a_values, [rows, k]), &dev), Tensor::<2>::from_data(burn::tensor::TensorData::new(b_values, [k, n]), &dev));
        let times = (0..repeats + 1)
            .map(|_| {
                let t0 = Instant::now();
                let _ = a.clone().matmul(b.clone()).into_data();
                t0.elapsed().as_secs_f64()
            })
            .collect();
        line[format!("{name}_burn_f32")] = serde_json::json!(gflops(times));
    }
    println!("{line}");
}

/// Times `Dist::sum_f32` over `values` floats (median of `steps`), on every rank; rank 0 prints
/// the seconds, the algorithm bandwidth (bytes summed per second) and the bus bandwidth (the
/// bytes each rank sends and receives in a ring all-reduce, 2 (N - 1) / N of the buffer, per
/// second: the figure to compare with a link's speed).
fn allreduce(values: usize, steps: usize) {
    let dist = Dist::from_launcher().expect("MPI");
    let mut buffer: Vec<f32> = (0..values).map(|i| (i % 7) as f32).collect();
    let mut times = Vec::new();
    for _ in 0..steps + 1 {
        let start = Instant::now();
        dist.sum_f32(&mut buffer);
        times.push(start.elapsed().as_secs_f64());
    }
    let seconds = median(times[1..].to_vec());
    let (bytes, ranks) = (4.0 * values as f64, dist.world_size() as f64);
    if dist.is_main() {
        println!(
            "{{\"mode\": \"allreduce\", \"ranks\": {ranks}, \"values\": {values}, \"seconds\": {seconds:.5}, \"algorithm_gb_per_s\": {:.3}, \"bus_gb_per_s\": {:.3}}}",
            bytes / seconds / 1e9,
            2.0 * (ranks - 1.0) / ranks * bytes / seconds / 1e9
        );
    }
}
