//! Official-layout PyTorch weights (tests/fixtures/pth, written by make_pth_fixtures.py):
//! backbone-only and full training checkpoints load, compute what PyTorch computes, export to
//! safetensors and back bit-exactly, and broken files fail with one clear line.

mod common;

use std::path::PathBuf;

use burn::tensor::Device;
use common::{Fixture, assert_tensor_close, run_dino};
use dino::model::pretrained::load_vit;
use dino::weights::{HostTensor, export};

fn pth(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pth").join(name)
}

fn expected() -> Fixture {
    Fixture::load("pth/expected.safetensors")
}

#[test]
fn backbone_pth_matches_pytorch() {
    let dev = Device::flex();
    let fx = expected();
    let (vit, config, trained_size) = load_vit(&pth("backbone.pth"), "teacher", None, &dev).unwrap();
    assert_eq!((config.embed_dim, config.depth, config.num_heads, config.patch_size, config.mlp_ratio), (64, 2, 1, 8, 4));
    assert_eq!(trained_size, 32);
    let square = fx.tensor::<4>("square.input", &dev);
    assert_tensor_close("cls", vit.forward(square.clone()), fx.host("backbone.square.cls"), 1e-5);
    assert_tensor_close("attention", vit.last_self_attention(square), fx.host("backbone.square.attention"), 1e-5);
    // 32x48: the position embedding is interpolated to a 4x6 grid.
    assert_tensor_close("wide cls", vit.forward(fx.tensor::<4>("wide.input", &dev)), fx.host("backbone.wide.cls"), 1e-5);
}

#[test]
fn full_checkpoint_teacher_and_student() {
    let dev = Device::flex();
    let fx = expected();
    let square = fx.tensor::<4>("square.input", &dev);
    for key in ["teacher", "student"] {
        let (vit, _, _) = load_vit(&pth("full_checkpoint.pth"), key, None, &dev).unwrap();
        assert_tensor_close(key, vit.forward(square.clone()), fx.host(&format!("{key}.square.cls")), 1e-5);
    }
}

#[test]
fn export_then_load_round_trips_bit_exactly() {
    let dev = Device::flex();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("export");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("backbone.safetensors");
    let (ok, _, err) = run_dino(&["export", "--weights", pth("full_checkpoint.pth").to_str().unwrap(), "--checkpoint_key", "student", "--output", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    let original = load_vit(&pth("full_checkpoint.pth"), "student", None, &dev).unwrap();
    let reloaded = load_vit(&out, "teacher", None, &dev).unwrap();
    assert_eq!(reloaded.1, original.1);
    let bits = |v: &dino::model::VisionTransformer| -> Vec<(String, Vec<usize>, Vec<u32>)> {
        let mut t: Vec<_> = export(v).into_iter().map(|(k, h): (String, HostTensor)| (k, h.shape, h.values.iter().map(|x| x.to_bits()).collect())).collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    assert_eq!(bits(&reloaded.0), bits(&original.0));
    // The file holds the official names only: the keys of the PyTorch state dict.
    let bytes = std::fs::read(&out).unwrap();
    let names = dino::weights::read_safetensors(&bytes, &out).unwrap().0;
    let mut keys: Vec<&String> = names.keys().collect();
    keys.sort();
    assert_eq!(keys.len(), 30);
    assert!(keys.contains(&&"blocks.1.attn.qkv.weight".to_string()) && keys.contains(&&"patch_embed.proj.weight".to_string()));
    assert_eq!(names["blocks.0.mlp.fc1.weight"].shape, vec![256, 64], "PyTorch's [out, in] layout");
}

#[test]
fn broken_files_fail_with_one_line_naming_the_problem() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("broken_weights");
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("notes.pth");
    std::fs::write(&text, "these are not weights").unwrap();
    let out = dir.join("x.safetensors");
    let cases: Vec<(PathBuf, Vec<&str>, &str)> = vec![
        (pth("missing_key.pth"), vec![], "missing key 'blocks.0.norm2.bias'"),
        (pth("bad_shape.pth"), vec![], "key 'blocks.0.attn.proj.weight': shape [64, 32] where the model expects [64, 64]"),
        (pth("unexpected_key.pth"), vec![], "unexpected key 'blocks.0.attn.rel_pos'"),
        (pth("backbone.pth"), vec!["--arch", "vit_small"], "--arch vit_small has width 384, but the weights have width 64"),
        (text.clone(), vec![], "neither a PyTorch .pth nor a safetensors file"),
        (pth("full_checkpoint.pth"), vec!["--checkpoint_key", "momentum"], "--checkpoint_key must be teacher or student"),
    ];
    for (file, extra, needle) in cases {
        let args = [&["export", "--weights", file.to_str().unwrap(), "--output", out.to_str().unwrap()], &extra[..]].concat();
        let (ok, _, err) = run_dino(&args);
        assert!(!ok, "{file:?} loaded");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn extract_and_attention_with_an_official_file() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pth_commands");
    let _ = std::fs::remove_dir_all(&dir);
    let images = dir.join("images");
    std::fs::create_dir_all(images.join("cats")).unwrap();
    std::fs::create_dir_all(images.join("dogs")).unwrap();
    for (i, class) in ["cats", "dogs", "cats"].iter().enumerate() {
        let img = image::RgbImage::from_fn(40, 36, |x, y| image::Rgb([(x * 6 + i as u32 * 40) as u8, (y * 7) as u8, 90]));
        img.save(images.join(class).join(format!("{i}.png"))).unwrap();
    }
    let weights = pth("backbone.pth");
    let features = dir.join("features");
    let (ok, _, err) = run_dino(&["extract", "--data", images.to_str().unwrap(), "--weights", weights.to_str().unwrap(), "--output_dir", features.to_str().unwrap()]);
    assert!(ok, "{err}");
    let f = dino::weights::npy::read(&features.join("features.npy")).unwrap();
    assert_eq!(f.shape, vec![3, 64], "the file's 64-d cls feature at its 32-px training size");
    assert_eq!(dino::weights::npy::read(&features.join("labels.npy")).unwrap().values, vec![0.0, 0.0, 1.0]);

    let attention = dir.join("attention");
    let (ok, _, err) = run_dino(&[
        "attention", "--image_path", images.join("dogs/1.png").to_str().unwrap(), "--weights", weights.to_str().unwrap(),
        "--image_size", "36", "--output_dir", attention.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    // 40x36 resized to 40x36 (shorter side 36), cropped to multiples of 8: 40x32; one head.
    assert_eq!(image::image_dimensions(attention.join("attn-head0.png")).unwrap(), (40, 32));
    assert!(!attention.join("attn-head1.png").exists());
}

/// One train-mode pass (BatchNorm on batch statistics) of the torchvision-layout ResNet:
/// features, gradients of sum(features * w) and the updated running statistics equal PyTorch's.
#[test]
fn resnet_train_mode_matches_pytorch() {
    use burn::module::Module;
    let dev = Device::flex();
    let ad = dev.clone().autodiff();
    let fx = expected();
    let p = dino::model::pretrained::load(&pth("resnet.pth"), "teacher", None, &dev).unwrap();
    let dino::model::Network::ResNet(resnet) = p.network else { panic!("not recognised as a ResNet") };
    let resnet = resnet.fork(&ad).train();
    let features = resnet.forward_train(fx.tensor::<4>("resnet.train.input", &ad), dino::dist::Group::single());
    assert_tensor_close("train-mode features", features.clone(), fx.host("resnet.train.features"), 1e-5);
    let grads = (features * fx.tensor::<2>("resnet.train.weights", &ad)).sum().backward();
    let block = |s: usize| &resnet.layers[s][0];
    let checks = [
        ("conv1.weight", common::grad_of(&resnet.conv1.weight, &grads)),
        ("bn1.weight", common::grad_of(&resnet.bn1.weight, &grads)),
        ("bn1.bias", common::grad_of(&resnet.bn1.bias, &grads)),
        ("layer1.0.conv2.weight", common::grad_of(&block(0).conv2.weight, &grads)),
        ("layer2.0.downsample.0.weight", common::grad_of(&block(1).downsample.as_ref().unwrap().conv.weight, &grads)),
        ("layer4.0.bn3.weight", common::grad_of(&block(3).bn3.weight, &grads)),
    ];
    // Measured: 4e-6 to 1.8e-5 (bn1.bias, a sum over every pixel of the first map).
    for (name, grad) in checks {
        common::assert_close(&format!("gradient of {name}"), &grad, fx.host(&format!("resnet.train.grad.{name}")), 5e-5);
    }
    let stats = [
        ("bn1.running_mean", resnet.bn1.running_mean.value()),
        ("bn1.running_var", resnet.bn1.running_var.value()),
        ("layer2.0.downsample.1.running_var", block(1).downsample.as_ref().unwrap().bn.running_var.value()),
        ("layer4.0.bn3.running_mean", block(3).bn3.running_mean.value()),
        ("layer4.0.bn3.running_var", block(3).bn3.running_var.value()),
    ];
    for (name, value) in stats {
        assert_tensor_close(name, value, fx.host(&format!("resnet.train.{name}")), 1e-5);
    }
}

#[test]
fn resnet_in_torchvision_layout_matches_pytorch_and_round_trips() {
    let dev = Device::flex();
    let fx = expected();
    let p = dino::model::pretrained::load(&pth("resnet.pth"), "teacher", None, &dev).unwrap();
    let dino::model::Network::ResNet(resnet) = &p.network else { panic!("not recognised as a ResNet") };
    assert_eq!(resnet.stage_depths(), vec![2, 1, 1, 1]);
    assert_eq!(resnet.out_dim(), 128);
    assert_tensor_close("pooled features", resnet.forward(fx.tensor::<4>("resnet.input", &dev)), fx.host("resnet.features"), 1e-5);

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("resnet_export");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("resnet.safetensors");
    let (ok, _, err) = run_dino(&["export", "--weights", pth("resnet.pth").to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    let again = dino::model::pretrained::load(&out, "teacher", None, &dev).unwrap();
    let dino::model::Network::ResNet(again) = &again.network else { panic!("export is not a ResNet") };
    let bits = |r: &dino::model::ResNet| -> Vec<(String, Vec<u32>)> { r.state_dict().into_iter().map(|(k, h)| (k, h.values.iter().map(|v| v.to_bits()).collect())).collect() };
    assert_eq!(bits(again), bits(resnet));

    // Attention maps need a ViT: one clear line.
    let photo = dir.join("photo.png");
    image::RgbImage::from_pixel(64, 64, image::Rgb([10, 200, 30])).save(&photo).unwrap();
    let (ok, _, err) = run_dino(&["attention", "--image_path", photo.to_str().unwrap(), "--weights", pth("resnet.pth").to_str().unwrap()]);
    assert!(!ok && err.contains("attention maps needs a ViT"), "{err}");
}
