//! Which device a command computes on: the `--device` flag of training and of every command
//! that runs a backbone, and the burn device it names in this build.

use anyhow::{Result, bail};
use burn::tensor::Device;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The CPU: burn's flex backend, ViTs on this project's engine.
    Cpu,
    /// An NVIDIA GPU through CUDA (a binary built with `--features cuda`, scripts/build_cuda.sh).
    Cuda,
    /// A GPU through Vulkan (a binary built with `--features vulkan`).
    Vulkan,
}

impl DeviceKind {
    /// The burn device; `gpu` picks among the GPUs this process sees (the default one when
    /// `None`). An error in one line when this binary was built without that backend.
    pub fn open(self, gpu: Option<usize>) -> Result<Device> {
        let _ = gpu;
        match self {
            DeviceKind::Cpu => Ok(Device::flex()),
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => {
                ensure_listed(&Device::enumerate(burn::tensor::DeviceType::Cuda), gpu, "--device cuda")?;
                Ok(Device::cuda(gpu.unwrap_or(0)))
            }
            #[cfg(not(feature = "cuda"))]
            DeviceKind::Cuda => bail!("--device cuda: this binary was built without CUDA; rebuild with `--features cuda` (scripts/build_cuda.sh)"),
            #[cfg(feature = "vulkan")]
            DeviceKind::Vulkan => {
                ensure_listed(&Device::enumerate(burn::tensor::DeviceType::Vulkan), gpu, "--device vulkan")?;
                Ok(Device::vulkan(match gpu {
                    None => burn::tensor::DeviceKind::DefaultDevice,
                    Some(i) => burn::tensor::DeviceKind::DiscreteGpu(i),
                }))
            }
            #[cfg(not(feature = "vulkan"))]
            DeviceKind::Vulkan => bail!("--device vulkan: this binary was built without Vulkan; rebuild with `--features vulkan`"),
        }
    }
}

/// The GPU `index` of a runtime's `devices` (`None`: the first), or an error in one line naming
/// `flag`: a runtime without its driver lists no devices, where using it would panic at the
/// first tensor.
#[cfg(any(feature = "cuda", feature = "vulkan"))]
fn ensure_listed(devices: &[Device], index: Option<usize>, flag: &str) -> Result<()> {
    let index = index.unwrap_or(0);
    match devices.len() {
        0 => bail!("{flag}: no GPU found (is the driver installed and the device visible to this process?)"),
        n if index >= n => bail!("{flag}: GPU {index} asked for, but {n} visible"),
        _ => Ok(()),
    }
}
