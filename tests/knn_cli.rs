//! `dino knn` as a user runs it, on Fashion-MNIST subsets: raw pixels, a randomly initialised
//! ViT, and the teacher of a short `dino train` run.

use std::path::{Path, PathBuf};
use std::process::Command;

const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

fn dino(args: &[&str]) -> (bool, String, String) {
    assert!(Path::new(FASHION_MNIST).is_dir(), "these tests need `apt-get install dataset-fashion-mnist` (.ci/run does it)");
    let o = Command::new(env!("CARGO_BIN_EXE_dino")).args(args).output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

/// (k, top1, top5) for each result line.
fn results(stdout: &str) -> Vec<(usize, f64, f64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let (k, rest) = l.split_once("-NN classifier result: Top1: ")?;
            let (top1, top5) = rest.split_once(", Top5: ")?;
            Some((k.parse().ok()?, top1.parse().ok()?, top5.parse().ok()?))
        })
        .collect()
}

const SUBSETS: [&str; 4] = ["--subset_train", "3000", "--subset_test", "500"];

#[test]
fn raw_pixels_and_random_vit_baselines() {
    let (ok, out, err) = dino(&[&["knn", "--pixels", "--center_crop", "1"], &SUBSETS[..]].concat());
    assert!(ok, "{err}");
    let r = results(&out);
    assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![10, 20, 100, 200]);
    // Cosine k-NN on raw Fashion-MNIST pixels is a strong baseline (84.6% with all 60k).
    assert!(r[1].1 > 70.0 && r[1].1 <= r[1].2, "{out}");

    let (ok, out, err) = dino(&[&["knn", "--random_init", "--arch", "vit_micro", "--nb_knn", "20"], &SUBSETS[..]].concat());
    assert!(ok, "{err}");
    let r = results(&out);
    assert_eq!(r.len(), 1);
    assert!(r[0].1 > 20.0, "a random ViT is still far above chance (10%): {out}");
}

#[test]
fn knn_on_a_trained_checkpoint() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("knn_checkpoint");
    let _ = std::fs::remove_dir_all(&dir);
    let dir_s = dir.to_str().unwrap();
    let (ok, _, err) = dino(&[
        "train", "--output_dir", dir_s, "--preset", "small", "--arch", "vit_micro", "--local_crops_number", "2",
        "--out_dim", "256", "--batch_size_per_gpu", "32", "--subset", "256", "--epochs", "1", "--warmup_epochs", "0",
    ]);
    assert!(ok, "{err}");
    let ckpt = dir.join("checkpoint.safetensors");
    for key in ["teacher", "student"] {
        let (ok, out, err) = dino(&[&["knn", "--checkpoint", ckpt.to_str().unwrap(), "--checkpoint_key", key, "--nb_knn", "10", "20"], &SUBSETS[..]].concat());
        assert!(ok, "{err}");
        assert!(err.contains("dim 64"), "vit_micro features are 64-d: {err}");
        let r = results(&out);
        assert_eq!(r.len(), 2, "{out}");
        assert!(r.iter().all(|&(_, t1, t5)| t1 > 20.0 && t1 <= t5 && t5 <= 100.0), "{out}");
    }
    let (ok, _, err) = dino(&["knn", "--checkpoint", ckpt.to_str().unwrap(), "--checkpoint_key", "momentum"]);
    assert!(!ok && err.contains("--checkpoint_key"), "{err}");
    let (ok, _, err) = dino(&["knn", "--pixels", "--random_init"]);
    assert!(!ok && err.contains("exactly one"), "{err}");
}
