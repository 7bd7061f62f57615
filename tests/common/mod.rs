//! Shared helpers for the integration tests: reading the safetensors fixtures written by
//! tests/fixtures/make_fixtures.py and comparing tensors.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use burn::tensor::{Device, Tensor, TensorData};
use dino::weights::HostTensor;

pub struct Fixture {
    pub tensors: HashMap<String, HostTensor>,
    pub config: serde_json::Value,
}

impl Fixture {
    pub fn load(name: &str) -> Self {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("safetensors header");
        let config = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("config"))
            .map(|c| serde_json::from_str(c).expect("config json"))
            .unwrap_or(serde_json::Value::Null);
        let tensors = dino::weights::read_safetensors(&bytes, &path).expect("f32 safetensors").0;
        Self { tensors, config }
    }

    pub fn host(&self, name: &str) -> &HostTensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("fixture has no tensor '{name}'"))
    }

    pub fn tensor<const D: usize>(&self, name: &str, device: &Device) -> Tensor<D> {
        let h = self.host(name);
        Tensor::from_data(TensorData::new(h.values.clone(), h.shape.clone()), device)
    }

    pub fn scalar(&self, name: &str) -> f32 {
        self.host(name).values[0]
    }
}


/// max |a - b| / max |b|: agreement relative to the expected tensor's scale.
pub fn relative_error(actual: &[f32], expected: &[f32]) -> f64 {
    assert_eq!(actual.len(), expected.len(), "length mismatch");
    let scale = expected.iter().fold(0f64, |m, x| m.max(x.abs() as f64)).max(1e-30);
    let diff = actual.iter().zip(expected).fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
    diff / scale
}

pub fn assert_close(what: &str, actual: &HostTensor, expected: &HostTensor, tol: f64) {
    assert_eq!(actual.shape, expected.shape, "{what}: shape");
    let err = relative_error(&actual.values, &expected.values);
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
}

pub fn assert_tensor_close<const D: usize>(what: &str, actual: Tensor<D>, expected: &HostTensor, tol: f64) {
    assert_close(what, &HostTensor::from_tensor(actual), expected, tol);
}

/// The gradient of a parameter as a host tensor.
pub fn grad_of<const D: usize>(p: &burn::module::Param<Tensor<D>>, grads: &burn::tensor::Gradients) -> HostTensor {
    HostTensor::from_tensor(p.grad(grads).expect("parameter has a gradient"))
}

/// The gradient of a burn Linear weight ([in, out]) in PyTorch's layout ([out, in]).
pub fn grad_of_linear(p: &burn::module::Param<Tensor<2>>, grads: &burn::tensor::Gradients) -> HostTensor {
    HostTensor::from_tensor(p.grad(grads).expect("parameter has a gradient").transpose())
}

/// Runs the `dino` binary: (success, stdout, stderr).
pub fn run_dino(args: &[&str]) -> (bool, String, String) {
    run_dino_with(args, &[])
}

/// Runs the `dino` binary with extra environment variables: (success, stdout, stderr).
pub fn run_dino_with(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_dino")).args(args).envs(env.iter().copied()).output().expect("the dino binary runs");
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

/// The bf16 engine's paths this CPU runs and the ones it cannot, printed so that a test's
/// output says which paths it checked (a path missing here was not tested, not passed).
pub fn engine_paths(test: &str) -> Vec<&'static str> {
    use dino::engine::cpu::{Cpu, Path};
    let supported = Cpu::supported();
    let (ran, skipped): (Vec<Path>, Vec<Path>) = Path::ALL.into_iter().partition(|p| supported.contains(p));
    let names = |paths: &[Path]| paths.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ");
    eprintln!("{test}: engine paths tested: {}; not on this CPU, untested: {}", names(&ran), if skipped.is_empty() { "none".into() } else { names(&skipped) });
    ran.into_iter().map(Path::name).collect()
}
