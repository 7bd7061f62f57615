//! `dino knn`, `dino extract` and `dino linear` as a user runs them, on Fashion-MNIST subsets:
//! raw pixels, a randomly initialised ViT, the teacher of a short `dino train` run, features
//! written by `dino extract` then read back, and a linear probe.

mod common;

use std::path::{Path, PathBuf};

const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// Runs dino with Fashion-MNIST as the data of `train` (`--data`) and of `knn` and `linear`
/// (`--data_path`, its train-* and t10k-* files) unless `args` name other data.
fn dino(args: &[&str]) -> (bool, String, String) {
    assert!(Path::new(FASHION_MNIST).is_dir(), "these tests need `apt-get install dataset-fashion-mnist` (.ci/run does it)");
    let names_data = args.iter().any(|a| ["--data", "--data_path", "--train_data", "--train_features"].contains(a));
    let data_flag = match args.first() {
        Some(&"train") if !names_data => Some("--data"),
        Some(&("knn" | "linear")) if !names_data => Some("--data_path"),
        _ => None,
    };
    let mut args = args.to_vec();
    if let Some(flag) = data_flag {
        args.extend([flag, FASHION_MNIST]);
    }
    common::run_dino(&args)
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
    let (ok, out, err) = dino(&[&["knn", "--pixels", "--center_crop", "1", "--image_size", "28"], &SUBSETS[..]].concat());
    assert!(ok, "{err}");
    let r = results(&out);
    assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![10, 20, 100, 200]);
    // Cosine k-NN on raw Fashion-MNIST pixels is a strong baseline (84.6% with all 60k).
    assert!(r[1].1 > 70.0 && r[1].1 <= r[1].2, "{out}");

    let (ok, out, err) = dino(&[&["knn", "--random_init", "--arch", "vit_micro", "--patch_size", "4", "--image_size", "28", "--nb_knn", "20"], &SUBSETS[..]].concat());
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
    let (ok, _, err) = dino(&["knn", "--pretrained_weights", ckpt.to_str().unwrap(), "--checkpoint_key", "momentum"]);
    assert!(!ok && err.contains("--checkpoint_key"), "{err}");
    let (ok, _, err) = dino(&["knn", "--pixels", "--random_init"]);
    assert!(!ok && err.contains("exactly one"), "{err}");
}

/// Reads features.npy and labels.npy of an extract directory.
fn read_npy(path: &Path) -> dino::weights::npy::Array {
    dino::weights::npy::read(path).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn extract_then_knn_from_the_files_equals_knn_on_images() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("extract");
    let _ = std::fs::remove_dir_all(&dir);
    let model = ["--random_init", "--arch", "vit_micro", "--patch_size", "4", "--image_size", "28", "--center_crop", "1"];
    let (train_dir, test_dir) = (dir.join("train"), dir.join("test"));
    for (split, out, n) in [("train", &train_dir, "1000"), ("test", &test_dir, "200")] {
        let args = [&["extract", "--data", FASHION_MNIST, "--split", split, "--subset", n, "--output_dir", out.to_str().unwrap()], &model[..]].concat();
        let (ok, _, err) = dino(&args);
        assert!(ok, "{err}");
    }
    let features = read_npy(&train_dir.join("features.npy"));
    assert_eq!(features.shape, vec![1000, 64]);
    let labels = read_npy(&train_dir.join("labels.npy"));
    assert_eq!(labels.shape, vec![1000]);
    // --subset draws per class: Fashion-MNIST's 60000 training images are 6000 of each of 10
    // classes, so 1000 of them are exactly 100 of each, listed in file order.
    let mut per_class = [0; 10];
    labels.values.iter().for_each(|&l| per_class[l as usize] += 1);
    assert_eq!(per_class, [100; 10]);
    let files = std::fs::read_to_string(train_dir.join("files.txt")).unwrap();
    let records: Vec<usize> = files.lines().map(|l| l.strip_prefix("IDX record ").expect("an IDX record").parse().unwrap()).collect();
    assert_eq!(records.len(), 1000);
    assert!(records.windows(2).all(|w| w[0] < w[1]) && records[999] < 60000, "{:?}", &records[..10]);
    // Each drawn record keeps its own label.
    let full = dino::data::dataset::Dataset::open(Path::new(FASHION_MNIST), dino::data::dataset::IdxSplit::Train).unwrap();
    for (k, &record) in records.iter().enumerate() {
        assert_eq!(labels.values[k], full.label(record).unwrap() as f64, "record {record}");
    }

    let (ok, from_files, err) =
        dino(&["knn", "--train_features", train_dir.to_str().unwrap(), "--test_features", test_dir.to_str().unwrap(), "--nb_knn", "10", "20"]);
    assert!(ok, "{err}");
    let knn_args = [&["knn", "--subset_train", "1000", "--subset_test", "200", "--nb_knn", "10", "20"], &model[..]].concat();
    let (ok, from_images, err) = dino(&knn_args);
    assert!(ok, "{err}");
    assert_eq!(results(&from_files), results(&from_images));
    assert_eq!(results(&from_files).len(), 2);
    // knn --pooling mean: the cls token with the mean patch token, as from files extracted so.
    let (mean_train, mean_test) = (dir.join("mean_train"), dir.join("mean_test"));
    for (split, out, n) in [("train", &mean_train, "1000"), ("test", &mean_test, "200")] {
        let args = [&["extract", "--data", FASHION_MNIST, "--split", split, "--subset", n, "--pooling", "mean", "--output_dir", out.to_str().unwrap()], &model[..]].concat();
        let (ok, _, err) = dino(&args);
        assert!(ok, "{err}");
    }
    let (ok, mean_files, err) =
        dino(&["knn", "--train_features", mean_train.to_str().unwrap(), "--test_features", mean_test.to_str().unwrap(), "--nb_knn", "10", "20"]);
    assert!(ok, "{err}");
    let (ok, mean_images, err) = dino(&[&knn_args[..], &["--pooling", "mean"]].concat());
    assert!(ok, "{err}");
    assert_eq!(results(&mean_files), results(&mean_images));
    assert_ne!(results(&mean_images), results(&from_images), "the mean patch token changes the neighbours");

    let (ok, _, err) = dino(&["knn", "--train_features", dir.to_str().unwrap(), "--test_features", test_dir.to_str().unwrap()]);
    assert!(!ok && err.contains("features.npy"), "{err}");
}

/// Several blocks and the patch mean widen the feature; a depth beyond the model's is refused.
#[test]
fn extract_widens_and_pools_features() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("extract_pooling");
    let _ = std::fs::remove_dir_all(&dir);
    let model = ["--random_init", "--arch", "vit_micro", "--patch_size", "4", "--image_size", "28", "--center_crop", "1"];
    let wide = dir.join("wide");
    let args = [&["extract", "--data", FASHION_MNIST, "--subset", "8", "--n_last_blocks", "2", "--avgpool_patchtokens", "--output_dir", wide.to_str().unwrap()], &model[..]].concat();
    let (ok, _, err) = dino(&args);
    assert!(ok, "{err}");
    assert_eq!(read_npy(&wide.join("features.npy")).shape, vec![8, 192]);
    // --pooling: the mean patch token (interleaved with the cls token, as the reference's
    // linear evaluation) or its GeM with p = 4 (after it). By the power-mean inequality the
    // GeM of each channel (of tokens clamped at 1e-6) is at least the plain mean.
    let pooled = |pooling: &str| {
        let out = dir.join(pooling);
        let args = [&["extract", "--data", FASHION_MNIST, "--subset", "8", "--pooling", pooling, "--output_dir", out.to_str().unwrap()], &model[..]].concat();
        let (ok, _, err) = dino(&args);
        assert!(ok, "{err}");
        read_npy(&out.join("features.npy"))
    };
    let (mean, gem) = (pooled("mean"), pooled("gem"));
    assert_eq!((mean.shape.clone(), gem.shape.clone()), (vec![8, 128], vec![8, 128]));
    for (m, g) in mean.values.chunks(128).zip(gem.values.chunks(128)) {
        for d in 0..64 {
            assert!((m[2 * d] - g[d]).abs() < 1e-6, "the cls parts agree");
            assert!(g[64 + d] >= m[2 * d + 1] - 1e-6, "GeM {} below the mean {}", g[64 + d], m[2 * d + 1]);
        }
    }
    let args = [&["extract", "--data", FASHION_MNIST, "--subset", "8", "--n_last_blocks", "5", "--output_dir", wide.to_str().unwrap()], &model[..]].concat();
    let (ok, _, err) = dino(&args);
    assert!(!ok && err.contains("--n_last_blocks"), "{err}");
}

#[test]
fn linear_probe_on_cached_and_augmented_features() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("linear");
    let _ = std::fs::remove_dir_all(&dir);
    let model = ["--random_init", "--arch", "vit_micro", "--patch_size", "4", "--image_size", "28", "--center_crop", "1"];
    let out = dir.join("cached");
    let args = [&["linear", "--subset_train", "2000", "--subset_test", "500", "--epochs", "20", "--lr", "0.1", "--augment", "false", "--output_dir", out.to_str().unwrap()], &model[..]].concat();
    let (ok, stdout, err) = dino(&args);
    assert!(ok, "{err}");
    let top1: f64 = stdout.split("Top1: ").nth(1).and_then(|s| s.split(',').next()).and_then(|s| s.parse().ok()).expect("a Top1 line");
    // Measured: 47.8% (random features, 2000 training images); chance is 10%.
    assert!(top1 > 35.0, "{stdout}");
    let bytes = std::fs::read(out.join("linear.safetensors")).unwrap();
    let tensors = dino::weights::read_safetensors(&bytes, &out).unwrap().0;
    // 4 blocks x 64 channels by default.
    assert_eq!(tensors["linear.weight"].shape, vec![10, 256]);
    assert_eq!(tensors["linear.bias"].shape, vec![10]);
    assert_eq!(std::fs::read_to_string(out.join("log.txt")).unwrap().lines().count(), 20);

    // The reference's augmented protocol, one short epoch, with the patch mean.
    let out = dir.join("augmented");
    let args = [&["linear", "--subset_train", "256", "--subset_test", "100", "--epochs", "1", "--n_last_blocks", "1", "--avgpool_patchtokens", "--output_dir", out.to_str().unwrap()], &model[..]].concat();
    let (ok, stdout, err) = dino(&args);
    assert!(ok, "{err}");
    assert!(stdout.contains("Linear probe: Top1:"), "{stdout}");
    let bytes = std::fs::read(out.join("linear.safetensors")).unwrap();
    assert_eq!(dino::weights::read_safetensors(&bytes, &out).unwrap().0["linear.weight"].shape, vec![10, 128]);
}

/// Smallest cosine similarity between corresponding rows of two feature matrices.
fn min_row_cosine(a: &dino::weights::npy::Array, b: &dino::weights::npy::Array) -> f64 {
    let dim = a.shape[1];
    a.values
        .chunks(dim)
        .zip(b.values.chunks(dim))
        .map(|(x, y)| {
            let dot: f64 = x.iter().zip(y).map(|(p, q)| p * q).sum();
            let norm = |v: &[f64]| v.iter().map(|p| p * p).sum::<f64>().sqrt();
            dot / (norm(x) * norm(y))
        })
        .fold(1.0, f64::min)
}

#[test]
fn bf16_features_match_f32_and_keep_knn_accuracy() {
    let model = ["--random_init", "--arch", "vit_micro", "--patch_size", "7", "--image_size", "28", "--center_crop", "1"];
    let has_bf16_hardware = dino::engine::cpu::Cpu::supported()[0].has_bf16_hardware();
    if !has_bf16_hardware {
        let (ok, _, err) = dino(&[&["knn", "--precision", "bf16"], &model[..]].concat());
        assert!(!ok && err.contains("--precision bf16") && err.contains("AVX512-BF16"), "{err}");
    }
    let (ok, _, err) = common::run_dino_with(&[&["knn", "--data_path", FASHION_MNIST, "--precision", "bf16"], &model[..]].concat(), &[("DINO_ENGINE_PATH", "sse9")]);
    assert!(!ok && err.trim().lines().count() == 1 && err.contains("DINO_ENGINE_PATH=sse9"), "{err}");

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("precision");
    let _ = std::fs::remove_dir_all(&dir);
    let extract = |precision: &str, engine: Option<&str>| {
        let out = dir.join(format!("{precision}-{}", engine.unwrap_or("default")));
        let args = [
            &["extract", "--data", FASHION_MNIST, "--subset", "300", "--n_last_blocks", "2", "--avgpool_patchtokens"][..],
            &["--precision", precision, "--output_dir", out.to_str().unwrap()],
            &model[..],
        ]
        .concat();
        let env: Vec<_> = engine.map(|path| ("DINO_ENGINE_PATH", path)).into_iter().collect();
        let (ok, _, err) = common::run_dino_with(&args, &env);
        assert!(ok, "{err}");
        read_npy(&out.join("features.npy"))
    };
    let reference = extract("f32", None);
    assert_eq!(reference.shape, vec![300, 192]);
    // The engine at f32 against burn's tensor ops (the engine turned off): summation order only.
    let burn = extract("f32", Some("burn"));
    let max_diff = reference.values.iter().zip(&burn.values).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(max_diff < 1e-3 && min_row_cosine(&reference, &burn) > 0.999_999, "f32 engine vs burn: max |diff| {max_diff}");
    let paths = common::engine_paths("bf16 extraction");
    // Each engine path, and burn's bf16 products (the GPUs' mixed precision, on the CPU backend).
    for &path in paths.iter().chain(&["burn"]) {
        let bf16 = extract("bf16", Some(path));
        assert_eq!(reference.shape, bf16.shape);
        assert_ne!(reference.values, bf16.values, "bf16 must take its own path");
        let cosine = min_row_cosine(&reference, &bf16);
        eprintln!("{path}: min cosine to f32 {cosine:.6}");
        assert!(cosine > 0.999, "bf16 features on the {path} path drift from f32: cosine {cosine}");
    }

    // The rest on the best path (forced, so that it also runs where bf16 is emulated).
    let best = [("DINO_ENGINE_PATH", paths[0])];
    let dino = |args: &[&str]| common::run_dino_with(args, &best);
    let mut top1 = Vec::new();
    for precision in ["f32", "bf16"] {
        let (ok, out, err) = dino(&[&["knn", "--data_path", FASHION_MNIST, "--nb_knn", "20", "--precision", precision], &model[..], &SUBSETS[..]].concat());
        assert!(ok, "{err}");
        top1.push(results(&out)[0].1);
    }
    assert!((top1[0] - top1[1]).abs() <= 1.0, "20-NN top-1 f32 {} vs bf16 {}", top1[0], top1[1]);

    let (ok, _, err) = dino(&["extract", "--data", FASHION_MNIST, "--subset", "2", "--random_init", "--arch", "vit_micro", "--image_size", "4", "--precision", "bf16", "--output_dir", dir.join("small").to_str().unwrap()]);
    assert!(!ok && err.contains("--image_size 4 is smaller than the ViT's patch size 16"), "{err}");
    let (ok, _, err) = dino(&["knn", "--data_path", FASHION_MNIST, "--random_init", "--arch", "resnet_micro", "--precision", "bf16"]);
    assert!(!ok && err.contains("--precision bf16") && err.contains("ResNet"), "{err}");
}

/// The reference's layout and names: `--data_path DIR` (DIR/train and DIR/val, class folders),
/// `--batch_size_per_gpu`, and its launcher and loader flags. Each val image is a copy of a train image, so its nearest
/// neighbour is its copy whatever the random backbone computes: 1-NN top-1 is 100%.
#[test]
fn knn_takes_the_reference_data_path_layout() {
    let photos = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-data");
    assert!(photos.join(".complete").exists(), "run scripts/fetch_test_data.sh first (.ci/run does)");
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("knn_data_path");
    let _ = std::fs::remove_dir_all(&root);
    let images = [("cube/0.png", "cube/image0000.pgm"), ("cube/10.png", "cube/image0010.pgm"), ("astronaut/a.png", "astronaut.png")];
    for (name, source) in images {
        let to = root.join("train").join(name);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        image::open(photos.join(source)).unwrap().to_rgb8().save(&to).unwrap();
    }
    for name in ["cube/0.png", "astronaut/a.png"] {
        let to = root.join("val").join(name);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(root.join("train").join(name), to).unwrap();
    }
    let root = root.to_str().unwrap();
    let model = ["--random_init", "--arch", "vit_micro", "--patch_size", "8", "--image_size", "32", "--center_crop", "1"];
    // The reference's plumbing flags are accepted as pasted; --use_cuda says what it does not do.
    let plumbing = ["--use_cuda", "True", "--num_workers", "10", "--dist_url", "env://", "--local_rank", "0"];
    let (ok, out, err) = dino(&[&["knn", "--data_path", root, "--nb_knn", "1", "--batch_size_per_gpu", "2"], &model[..], &plumbing[..]].concat());
    assert!(ok, "{err}");
    assert!(err.contains("--use_cuda is ignored"), "{err}");
    assert_eq!(results(&out), vec![(1, 100.0, 100.0)], "{out}");
    let (ok, _, err) = dino(&[&["knn", "--data_path", root, "--train_data", root], &model[..]].concat());
    assert!(!ok && err.contains("--data_path"), "{err}");
}
