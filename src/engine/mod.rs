//! The CPU engine for ViTs, our own code in place of burn's general tensor ops on the CPU: one
//! network type (`vit.rs`) in an inference mode (`extract`, `knn`, `linear` and the teacher in
//! training) and a training mode whose forward pass keeps a tape for the student's backward
//! pass (`backward.rs`, for `dino train`), the network of `model::vit` with packed matrix
//! products — f32 inputs at `--precision f32`, bf16 inputs at bf16, f32 accumulation — and
//! fused, threaded element-wise passes, checked against the f32 burn path. Each CPU runs the
//! best path it has (`cpu.rs`: AMX, AVX512-BF16, AVX2 or plain code). The model's forward
//! calls it through `graph.rs`, where the student's backbone is one operation of burn's
//! autodiff graph with the engine's backward pass.

pub mod cpu;
mod backward;
mod gradients;
pub mod graph;
pub mod matmul;
mod rows;
pub mod vit;

pub use vit::EngineVit;

/// Sets the process up for computing, once at the start of a command, before anything uses
/// rayon or allocates large buffers:
/// - the calling thread becomes worker 0 of rayon's global pool of `threads` compute threads
///   (0: rayon's default, `RAYON_NUM_THREADS` or one per core), which the engine, burn-flex and
///   `gemm` all run on. The calling thread issues every parallel operation, so as a worker it
///   takes its share of each one instead of handing it over and sleeping until the pool is
///   done; at ViT-Micro's small operations that hand-over cost a third of the training step's
///   time (BENCHMARKS.md);
/// - freed memory is kept for the next allocations (`cpu::keep_freed_memory`), so a step's
///   buffers reuse the last step's pages.
pub fn start_compute(threads: usize) -> anyhow::Result<()> {
    cpu::keep_freed_memory();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .use_current_thread()
        .build_global()
        .map_err(|e| anyhow::anyhow!("starting the compute threads: {e}"))
}

/// Arithmetic of a ViT backbone's matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout: the reference's numbers.
    #[default]
    F32,
    /// The ViT's matrix products take bf16 operands and accumulate in f32; parameters,
    /// optimiser state, loss and the other operations stay f32 (ViT only). On the CPU engine
    /// (AMX or AVX512-BF16), elsewhere on burn's bf16 kernels (`model::matmul_at`).
    Bf16,
}

impl Precision {
    /// The flag's spelling: f32 or bf16.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// `--precision` as asked: a precision, or `auto`, the faster one this device has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionChoice {
    /// f32 throughout: the reference's numbers.
    #[default]
    F32,
    /// bf16 matrix products (ViT only), refused in one line where the device has none.
    Bf16,
    /// bf16 where the device multiplies bf16 in hardware — a CPU with AMX or AVX512-BF16 (the
    /// engine's `amx` and `avx512bf16` paths), a CUDA GPU — f32 elsewhere and for ResNets.
    Auto,
}

impl PrecisionChoice {
    /// The precision to compute at on `device` for a ViT with heads `head_width` wide (`None`:
    /// a ResNet). bf16 as asked is checked later, by [`check_precision`].
    pub fn resolve(self, head_width: Option<usize>, device: &burn::tensor::Device) -> Precision {
        let bf16_in_hardware = |width: usize| {
            if *device == burn::tensor::Device::flex() {
                !cpu::Cpu::engine_off() && EngineVit::fits_heads(width) && cpu::Cpu::selected().is_ok_and(|c| c.path().has_bf16_hardware())
            } else {
                device.supports_dtype(burn::tensor::FloatDType::BF16)
            }
        };
        match self {
            Self::F32 => Precision::F32,
            Self::Bf16 => Precision::Bf16,
            Self::Auto if head_width.is_some_and(bf16_in_hardware) => Precision::Bf16,
            Self::Auto => Precision::F32,
        }
    }
}

/// An error naming `flag` unless a ViT whose attention heads are `head_width` wide can run its
/// products at `precision` on `device`. f32 runs everywhere. bf16 runs on the engine where it
/// computes the ViT (the CPU device: a CPU that multiplies bf16 in hardware, AMX or
/// AVX512-BF16, or a path `DINO_ENGINE_PATH` forced), and elsewhere on burn's bf16 kernels
/// where the device's backend computes in bf16: CUDA (not Vulkan, which has no bf16 arithmetic),
/// and the CPU with the engine turned off (flex widens bf16 to f32 there: slow, but the same
/// arithmetic as on a GPU, which is how that path is tested on a CPU).
pub fn check_precision(flag: &str, precision: Precision, head_width: usize, device: &burn::tensor::Device) -> anyhow::Result<()> {
    if precision == Precision::F32 {
        return Ok(());
    }
    if *device == burn::tensor::Device::flex() && !cpu::Cpu::engine_off() {
        let cpu = cpu::Cpu::selected().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            EngineVit::fits_heads(head_width),
            "{flag} bf16 on the CPU needs attention heads whose width is a multiple of 32; this ViT's are {head_width} wide"
        );
        anyhow::ensure!(
            cpu.path().has_bf16_hardware() || cpu::Cpu::forced(),
            "{flag} bf16 needs a CPU with AMX-BF16 or AVX512-BF16 (Intel Xeon Sapphire Rapids or Cooper Lake, AMD Zen 4 or newer); this one has neither, use {flag} f32"
        );
        return Ok(());
    }
    anyhow::ensure!(
        device.supports_dtype(burn::tensor::FloatDType::BF16),
        "{flag} bf16: burn has no bf16 arithmetic on this device (none on Vulkan, which stores and converts bf16 at most); use {flag} f32"
    );
    Ok(())
}

/// Whether the engine computes `vit` on `device` in place of burn: the CPU device (the engine
/// computes on the host), heads in whole 32-wide slices, and not turned off by
/// `DINO_ENGINE_PATH=burn`.
pub fn engine_runs(vit: &crate::model::VisionTransformer, device: &burn::tensor::Device) -> bool {
    *device == burn::tensor::Device::flex() && EngineVit::fits(vit) && !cpu::Cpu::engine_off()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    /// `auto` is bf16 exactly where the CPU engine multiplies bf16 in hardware (so f32 on the
    /// `avx2` and `portable` paths, which scripts/test.sh forces), and f32 for heads the engine
    /// cannot take and for ResNets; the explicit choices pass through.
    #[test]
    fn auto_precision_is_bf16_only_where_the_cpu_multiplies_bf16() {
        let cpu = Device::flex();
        let path = cpu::Cpu::selected().unwrap().path();
        let expected = if path.has_bf16_hardware() && !cpu::Cpu::engine_off() { Precision::Bf16 } else { Precision::F32 };
        eprintln!("engine path {}: auto is {}", path.name(), expected.name());
        assert_eq!(PrecisionChoice::Auto.resolve(Some(32), &cpu), expected);
        assert_eq!(PrecisionChoice::Auto.resolve(Some(64), &cpu), expected);
        assert_eq!(PrecisionChoice::Auto.resolve(Some(48), &cpu), Precision::F32, "heads the engine cannot take");
        assert_eq!(PrecisionChoice::Auto.resolve(None, &cpu), Precision::F32, "a ResNet");
        assert_eq!(PrecisionChoice::F32.resolve(Some(32), &cpu), Precision::F32);
        assert_eq!(PrecisionChoice::Bf16.resolve(None, &cpu), Precision::Bf16, "checked later, by check_precision");
    }
}
