//! `dino retrieval` and `dino copy-detection` as a user runs them: a tiny dataset in the
//! revisited Oxford/Paris layout (its ground truth pickled as those files are:
//! tests/fixtures/make_retrieval_fixture.py), the same images as class folders, and a tiny
//! Copydays, built from real photos of Debian packages (scripts/fetch_test_data.sh). The
//! queries are copies of database images, so whatever the random backbone computes, each
//! query's copy ranks first: that fixes the scores below.

mod common;

use std::path::{Path, PathBuf};

use common::run_dino as dino;

fn test_data() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-data");
    assert!(dir.join(".complete").exists(), "run scripts/fetch_test_data.sh first (.ci/run does)");
    dir
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes the photo as JPEG at `to` (creating its folder).
fn jpeg(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    image::open(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())).to_rgb8().save(to).unwrap();
}

const MODEL: [&str; 6] = ["--random_init", "--arch", "vit_tiny", "--patch_size", "16", "--imsize"];

/// The value after `label` on the line starting with `prefix`.
fn score(stdout: &str, prefix: &str, label: &str) -> f64 {
    let line = stdout.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no '{prefix}' line in {stdout}"));
    let rest = &line[line.find(label).unwrap_or_else(|| panic!("no '{label}' in {line}")) + label.len()..];
    rest.trim_start().split([',', ']']).next().unwrap().trim().parse().unwrap()
}

#[test]
fn revisited_layout_scores_easy_medium_and_hard() {
    let data = test_data();
    let root = scratch("retrieval_revisited");
    let jpg = root.join("rtiny/jpg");
    let cube = |i: usize| data.join(format!("cube/image{i:04}.pgm"));
    for (name, from) in [("cube00", cube(0)), ("cube10", cube(10)), ("astronaut", data.join("astronaut.png")), ("cube19", cube(19))] {
        jpeg(&from, &jpg.join(format!("{name}.jpg")));
    }
    std::fs::copy(jpg.join("astronaut.jpg"), jpg.join("query_astronaut.jpg")).unwrap();
    std::fs::copy(jpg.join("cube00.jpg"), jpg.join("query_cube00.jpg")).unwrap();
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gnd_rtiny.pkl");
    std::fs::copy(fixture, root.join("rtiny/gnd_rtiny.pkl")).unwrap();

    for multiscale in ["false", "true"] {
        let args = [&["retrieval", "--data_path", root.to_str().unwrap(), "--dataset", "rtiny", "--multiscale", multiscale], &MODEL[..], &["64"]].concat();
        let (ok, out, err) = dino(&args);
        assert!(ok, "{err}");
        // Easy: each query's only positive is its copy (the astronaut query's hard cube00 and
        // junk cube10 are both junk here), ranked first: AP 1 for both.
        assert_eq!(score(&out, ">> rtiny: mAP", "E:"), 100.0, "{out}");
        // Hard: only the astronaut query has a hard positive (cube00), with its copy junk: its
        // AP is 1 if cube00 ranks above cube19, else (0 + 1/2)/2 = 0.25.
        let hard = score(&out, ">> rtiny: mAP", "H:");
        assert!(hard == 100.0 || hard == 25.0, "{out}");
        // Medium: the cube00 query scores 1; the astronaut query has its copy first, then
        // cube00 at position 1 (AP 1) or 2 (AP ½ + ½·(½ + ⅔)/2 = 0.79167) of the ranking
        // without junk.
        let medium = score(&out, ">> rtiny: mAP", "M:");
        assert!(medium == 100.0 || (medium - 89.58).abs() < 0.006, "{out}");
        assert_eq!(score(&out, ">> rtiny: mP@k", "E: [1:"), 100.0, "{out}");
    }

    // With a feature cache, a second run reads the features back and scores the same; other
    // settings compute them anew.
    let cache = root.join("cache");
    let cached_run = |imsize: &str| {
        let args = [&["retrieval", "--data_path", root.to_str().unwrap(), "--dataset", "rtiny", "--features_cache", cache.to_str().unwrap()], &MODEL[..], &[imsize]].concat();
        let (ok, out, err) = dino(&args);
        assert!(ok, "{err}");
        (out, err.contains("features read from"))
    };
    let (first, reused) = cached_run("64");
    assert!(!reused && cache.join("database/features.npy").exists() && cache.join("queries/files.txt").exists());
    assert_eq!(cached_run("64"), (first, true));
    assert!(!cached_run("48").1, "another --imsize must not reuse the features");

    // A missing ground truth is one line naming the file.
    std::fs::remove_file(root.join("rtiny/gnd_rtiny.pkl")).unwrap();
    let (ok, _, err) = dino(&[&["retrieval", "--data_path", root.to_str().unwrap(), "--dataset", "rtiny"], &MODEL[..], &["64"]].concat());
    assert!(!ok && err.trim().lines().count() == 1 && err.contains("gnd_rtiny.pkl: cannot read"), "{err}");
}

#[test]
fn class_folders_score_each_query_against_its_class() {
    let data = test_data();
    let root = scratch("retrieval_folders");
    let cube = |i: usize| data.join(format!("cube/image{i:04}.pgm"));
    jpeg(&cube(0), &root.join("database/cube/00.jpg"));
    jpeg(&cube(10), &root.join("database/cube/10.jpg"));
    jpeg(&data.join("astronaut.png"), &root.join("database/astronaut/a.jpg"));
    std::fs::create_dir_all(root.join("queries/cube")).unwrap();
    std::fs::create_dir_all(root.join("queries/astronaut")).unwrap();
    std::fs::copy(root.join("database/cube/00.jpg"), root.join("queries/cube/q.jpg")).unwrap();
    std::fs::copy(root.join("database/astronaut/a.jpg"), root.join("queries/astronaut/q.jpg")).unwrap();
    let (database, queries) = (root.join("database"), root.join("queries"));
    let args = [&["retrieval", "--database", database.to_str().unwrap(), "--queries", queries.to_str().unwrap(), "--ks", "1", "2"], &MODEL[..], &["64"]].concat();
    let (ok, out, err) = dino(&args);
    assert!(ok, "{err}");
    // The astronaut query: AP 1. The cube query: its copy first, the other cube frame second
    // (AP 1) or third (0.79167). mP@1 is 1 for both.
    let map = score(&out, ">> queries: mAP", "mAP:");
    assert!(map == 100.0 || (map - 89.58).abs() < 0.006, "{out}");
    assert_eq!(score(&out, ">> queries: mP@k", "[1:"), 100.0, "{out}");

    let (ok, _, err) = dino(&["retrieval", "--database", database.to_str().unwrap(), "--random_init"]);
    assert!(!ok && err.contains("--queries"), "{err}");
}

/// A tiny Copydays: three originals, a `strong` block named by image id and a `crops/10`
/// block of exact copies, twenty distractors, whitening learnt on the twenty cube frames and
/// then read back from its file. Exact copies rank first however the random backbone and the
/// whitening map the images, so every block scores mAP 1.
#[test]
fn copy_detection_blocks_whitening_and_distractors() {
    let data = test_data();
    let root = scratch("copy_detection");
    let cube = |i: usize| data.join(format!("cube/image{i:04}.pgm"));
    let originals = [("200000", cube(0)), ("200100", data.join("astronaut.png")), ("200200", cube(19))];
    for (name, from) in &originals {
        jpeg(from, &root.join(format!("copydays/original/{name}.jpg")));
        std::fs::create_dir_all(root.join("copydays/crops/10")).unwrap();
        std::fs::copy(root.join(format!("copydays/original/{name}.jpg")), root.join(format!("copydays/crops/10/{name}.jpg"))).unwrap();
    }
    std::fs::create_dir_all(root.join("copydays/strong")).unwrap();
    std::fs::copy(root.join("copydays/original/200100.jpg"), root.join("copydays/strong/200100_strong.jpg")).unwrap();
    for i in 0..20 {
        jpeg(&cube(i), &root.join(format!("frames/{i:02}.jpg")));
    }
    let (copydays, frames, whitening) = (root.join("copydays"), root.join("frames"), root.join("whitening.safetensors"));
    let model = ["--random_init", "--arch", "vit_micro", "--patch_size", "8", "--imsize", "64"];
    let run = |extra: &[&str]| {
        let (ok, out, err) = dino(&[&["copy-detection", "--data_path", copydays.to_str().unwrap()], &model[..], extra].concat());
        assert!(ok, "{err}");
        out
    };
    let expected = "eval on original mAP=1.000\neval on strong mAP=1.000\neval on crops/10 mAP=1.000\n";
    assert_eq!(run(&[]), expected);
    let fitted = run(&["--whitening_path", frames.to_str().unwrap(), "--whitening_file", whitening.to_str().unwrap(), "--distractors_path", frames.to_str().unwrap()]);
    assert_eq!(fitted, expected);
    assert!(whitening.exists());
    assert_eq!(run(&["--whitening_file", whitening.to_str().unwrap()]), expected);
    let cache = root.join("cache");
    let cached = ["--whitening_path", frames.to_str().unwrap(), "--features_cache", cache.to_str().unwrap()];
    assert_eq!(run(&cached), expected);
    assert!(cache.join("queries/crops/10/features.npy").exists() && cache.join("whitening/features.npy").exists());
    assert_eq!(run(&cached), expected);

    let (ok, _, err) = dino(&[&["copy-detection", "--data_path", frames.to_str().unwrap()], &model[..]].concat());
    assert!(!ok && err.trim().lines().count() == 1 && err.contains("Copydays block 'original'"), "{err}");
}
