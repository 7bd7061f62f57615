//! ResNet backbones with bottleneck blocks (ResNet-50 and narrower or shallower variants) in
//! torchvision's layout, as DINO's released ResNet-50 uses it: the classifier removed, the
//! feature is the global average of the last stage (2048-d for ResNet-50). Built fresh for
//! training (torchvision's init) or from a state dict. `forward` normalises with the running
//! statistics (evaluation); `forward_train` with the batch's, updating the running ones as
//! PyTorch's BatchNorm2d in train mode does (momentum 0.1, unbiased variance).

use std::collections::{HashMap, HashSet};

use anyhow::{Result, bail};
use burn::module::{Module, Param};
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData};
use rand::Rng;

use super::batch_norm::{BatchNorm, Stats};
use crate::dist::Group;
use super::init::normal;
use crate::weights::HostTensor;

/// Shape of a bottleneck ResNet: blocks per stage and the first stage's width (each stage
/// doubles it; a block's output is 4x its width).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ResNetConfig {
    pub stage_depths: [usize; 4],
    pub width: usize,
}

impl ResNetConfig {
    /// `resnet50` (the reference's), or `resnet_micro` (ours: one block per stage, width 8,
    /// 256-d output, for tests and smoke runs).
    pub fn from_arch(arch: &str) -> Option<Self> {
        match arch {
            "resnet50" => Some(Self { stage_depths: [3, 4, 6, 3], width: 64 }),
            "resnet_micro" => Some(Self { stage_depths: [1, 1, 1, 1], width: 8 }),
            _ => None,
        }
    }

    /// A randomly initialised ResNet as torchvision builds it: convolutions Normal(0,
    /// sqrt(2 / (out_channels * k * k))) (Kaiming, fan-out, ReLU), BatchNorm weight 1, bias 0.
    pub fn init(&self, rng: &mut impl Rng, device: &Device) -> ResNet {
        let mut conv = |cin: usize, cout: usize, k: usize, stride: usize| {
            let std = (2.0 / (cout * k * k) as f64).sqrt();
            Conv { weight: Param::from_tensor(normal([cout, cin, k, k], std, rng, device)), stride, padding: k / 2 }
        };
        let conv1 = conv(3, self.width, 7, 2);
        let mut channels = self.width;
        let mut layers = Vec::new();
        for (stage, &depth) in self.stage_depths.iter().enumerate() {
            let planes = self.width << stage;
            let out = planes * 4;
            let mut blocks = Vec::new();
            for index in 0..depth {
                let stride = if stage > 0 && index == 0 { 2 } else { 1 };
                let (conv1, conv2, conv3) = (conv(channels, planes, 1, 1), conv(planes, planes, 3, stride), conv(planes, out, 1, 1));
                let downsample = (stride != 1 || channels != out).then(|| Downsample { conv: conv(channels, out, 1, stride), bn: BatchNorm::new(out, device) });
                blocks.push(Bottleneck {
                    conv1,
                    bn1: BatchNorm::new(planes, device),
                    conv2,
                    bn2: BatchNorm::new(planes, device),
                    conv3,
                    bn3: BatchNorm::new(out, device),
                    downsample,
                });
                channels = out;
            }
            layers.push(blocks);
        }
        ResNet { conv1, bn1: BatchNorm::new(self.width, device), layers }
    }
}

/// True for the path of a BatchNorm running statistic (a buffer, never trained or averaged).
pub fn is_running_statistic(path: &str) -> bool {
    path.ends_with("running_mean") || path.ends_with("running_var")
}

/// A bias-free convolution with square kernel, stride and padding.
#[derive(Module, Debug)]
pub struct Conv {
    pub weight: Param<Tensor<4>>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let s = self.stride;
        conv2d(x, self.weight.val(), None, ConvOptions::new([s, s], [self.padding; 2], [1, 1], 1))
    }
}


/// The 1x1 convolution + BatchNorm on a block's shortcut when its shape changes.
#[derive(Module, Debug)]
pub struct Downsample {
    pub conv: Conv,
    pub bn: BatchNorm,
}

/// 1x1 reduce, 3x3 (carrying the stride, as torchvision's v1.5), 1x1 expand, plus shortcut.
#[derive(Module, Debug)]
pub struct Bottleneck {
    pub conv1: Conv,
    pub bn1: BatchNorm,
    pub conv2: Conv,
    pub bn2: BatchNorm,
    pub conv3: Conv,
    pub bn3: BatchNorm,
    pub downsample: Option<Downsample>,
}

impl Bottleneck {
    fn forward(&self, x: Tensor<4>, stats: Stats) -> Tensor<4> {
        let out = self.bn1.forward(self.conv1.forward(x.clone()), stats).clamp_min(0.0);
        let out = self.bn2.forward(self.conv2.forward(out), stats).clamp_min(0.0);
        let out = self.bn3.forward(self.conv3.forward(out), stats);
        let shortcut = match &self.downsample {
            Some(d) => d.bn.forward(d.conv.forward(x), stats),
            None => x,
        };
        (out + shortcut).clamp_min(0.0)
    }
}

#[derive(Module, Debug)]
pub struct ResNet {
    pub conv1: Conv,
    pub bn1: BatchNorm,
    pub layers: Vec<Vec<Bottleneck>>,
}

impl ResNet {
    /// Width of the pooled feature (2048 for ResNet-50).
    pub fn out_dim(&self) -> usize {
        let last = self.layers.last().and_then(|l| l.last()).expect("at least one block");
        last.bn3.weight.dims()[0]
    }

    /// Number of trained parameters (BatchNorm running statistics are buffers, not counted).
    pub fn parameter_count(&self) -> usize {
        self.state_dict().iter().filter(|(k, _)| !is_running_statistic(k)).map(|(_, t)| t.values.len()).sum()
    }

    /// Blocks per stage (3, 4, 6, 3 for ResNet-50).
    pub fn stage_depths(&self) -> Vec<usize> {
        self.layers.iter().map(Vec::len).collect()
    }

    /// Global-average-pooled features [B, out_dim] of normalised images [B, 3, H, W], with
    /// BatchNorm's running statistics.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.run(x, Stats::Running)
    }

    /// As `forward` in training mode: BatchNorm uses the batch statistics and updates its
    /// running averages; the batch spans `group`'s processes.
    pub fn forward_train(&self, x: Tensor<4>, group: Group) -> Tensor<2> {
        self.run(x, Stats::Batch(group))
    }

    fn run(&self, x: Tensor<4>, stats: Stats) -> Tensor<2> {
        let x = self.bn1.forward(self.conv1.forward(x), stats).clamp_min(0.0);
        let mut x = max_pool2d(x, MaxPoolOptions::new([3, 3]).with_stride([2, 2]).with_padding([1, 1]));
        for stage in &self.layers {
            for block in stage {
                x = block.forward(x, stats);
            }
        }
        let [b, c, h, w] = x.dims();
        x.reshape([b, c, h * w]).mean_dim(2).reshape([b, c])
    }

    /// True when the tensors look like a torchvision ResNet state dict.
    pub fn recognises(tensors: &HashMap<String, HostTensor>) -> bool {
        tensors.contains_key("conv1.weight") && tensors.contains_key("layer1.0.conv1.weight")
    }

    /// Builds the network a torchvision-layout state dict describes (stages `layer1..4`,
    /// bottleneck blocks, shortcut convolutions at `downsample.0/1`). The classifier `fc.*`
    /// and BatchNorm's `num_batches_tracked` are not used; any other unused key is an error.
    pub fn from_state_dict(tensors: &HashMap<String, HostTensor>, device: &Device) -> Result<Self> {
        let mut reader = StateDictReader { tensors, used: HashSet::new(), device };
        let (conv1, mut channels) = reader.conv("conv1.weight", 3, 7, 2)?;
        let bn1 = reader.bn("bn1", channels)?;
        let mut layers = Vec::new();
        for stage in 1..=4 {
            let mut blocks = Vec::new();
            while let Some((block, out)) = reader.bottleneck(&format!("layer{stage}.{}", blocks.len()), channels, stage > 1 && blocks.is_empty())? {
                blocks.push(block);
                channels = out;
            }
            if blocks.is_empty() {
                bail!("missing key 'layer{stage}.0.conv1.weight'");
            }
            layers.push(blocks);
        }
        let mut unexpected: Vec<&String> = tensors
            .keys()
            .filter(|k| !reader.used.contains(*k) && !k.ends_with("num_batches_tracked") && !k.starts_with("fc."))
            .collect();
        unexpected.sort();
        if let Some(k) = unexpected.first() {
            bail!("unexpected key '{k}' (not a parameter of this ResNet)");
        }
        Ok(Self { conv1, bn1, layers })
    }

    /// The parameters under torchvision's names (running statistics included).
    pub fn state_dict(&self) -> Vec<(String, HostTensor)> {
        let mut out = Vec::new();
        let push_conv = |out: &mut Vec<(String, HostTensor)>, key: String, c: &Conv| out.push((key, HostTensor::from_tensor(c.weight.val())));
        let push_bn = |out: &mut Vec<(String, HostTensor)>, prefix: String, b: &BatchNorm| {
            let values = [b.weight.val(), b.bias.val(), b.running_mean.value(), b.running_var.value()];
            for (name, t) in ["weight", "bias", "running_mean", "running_var"].into_iter().zip(values) {
                out.push((format!("{prefix}.{name}"), HostTensor::from_tensor(t)));
            }
        };
        push_conv(&mut out, "conv1.weight".into(), &self.conv1);
        push_bn(&mut out, "bn1".into(), &self.bn1);
        for (s, stage) in self.layers.iter().enumerate() {
            for (i, block) in stage.iter().enumerate() {
                let p = format!("layer{}.{i}", s + 1);
                for (k, (c, b)) in [(&block.conv1, &block.bn1), (&block.conv2, &block.bn2), (&block.conv3, &block.bn3)].into_iter().enumerate() {
                    push_conv(&mut out, format!("{p}.conv{}.weight", k + 1), c);
                    push_bn(&mut out, format!("{p}.bn{}", k + 1), b);
                }
                if let Some(d) = &block.downsample {
                    push_conv(&mut out, format!("{p}.downsample.0.weight"), &d.conv);
                    push_bn(&mut out, format!("{p}.downsample.1"), &d.bn);
                }
            }
        }
        out
    }
}

/// Reads the layers of a torchvision-layout state dict one by one, checking each shape
/// against the layer before it, and remembers the keys it used.
struct StateDictReader<'a> {
    tensors: &'a HashMap<String, HostTensor>,
    used: HashSet<String>,
    device: &'a Device,
}

impl StateDictReader<'_> {
    fn take(&mut self, key: &str, rank: usize) -> Result<HostTensor> {
        let t = self.tensors.get(key).ok_or_else(|| anyhow::anyhow!("missing key '{key}'"))?;
        if t.shape.len() != rank {
            bail!("key '{key}': shape {:?} is not {rank}-D", t.shape);
        }
        self.used.insert(key.to_string());
        Ok(t.clone())
    }

    fn bn(&mut self, prefix: &str, channels: usize) -> Result<BatchNorm> {
        let mut part = |name: &str| -> Result<Tensor<1>> {
            let key = format!("{prefix}.{name}");
            let t = self.take(&key, 1)?;
            if t.shape != [channels] {
                bail!("key '{key}': shape {:?} where the convolution before it gives [{channels}]", t.shape);
            }
            Ok(Tensor::<1>::from_data(TensorData::new(t.values, t.shape), self.device))
        };
        Ok(BatchNorm::from_values(part("weight")?, part("bias")?, part("running_mean")?, part("running_var")?))
    }

    /// A convolution and the channel count it produces, checked against its input.
    fn conv(&mut self, key: &str, in_channels: usize, kernel: usize, stride: usize) -> Result<(Conv, usize)> {
        let t = self.take(key, 4)?;
        let [out, cin, kh, kw] = t.shape[..] else { unreachable!("4-D") };
        if cin != in_channels || kh != kernel || kw != kernel {
            bail!("key '{key}': shape {:?} where the model expects [{out}, {in_channels}, {kernel}, {kernel}]", t.shape);
        }
        let weight = Param::from_tensor(Tensor::<4>::from_data(TensorData::new(t.values, t.shape), self.device));
        Ok((Conv { weight, stride, padding: kernel / 2 }, out))
    }

    /// The bottleneck block under `p` (`None` past a stage's last), and its output channels;
    /// the first block of a later stage halves the resolution.
    fn bottleneck(&mut self, p: &str, channels: usize, downsamples: bool) -> Result<Option<(Bottleneck, usize)>> {
        if !self.tensors.contains_key(&format!("{p}.conv1.weight")) {
            return Ok(None);
        }
        let stride = if downsamples { 2 } else { 1 };
        let (conv1, w1) = self.conv(&format!("{p}.conv1.weight"), channels, 1, 1)?;
        let (conv2, w2) = self.conv(&format!("{p}.conv2.weight"), w1, 3, stride)?;
        let (conv3, out) = self.conv(&format!("{p}.conv3.weight"), w2, 1, 1)?;
        let downsample = if self.tensors.contains_key(&format!("{p}.downsample.0.weight")) {
            let (conv, dout) = self.conv(&format!("{p}.downsample.0.weight"), channels, 1, stride)?;
            if dout != out {
                bail!("key '{p}.downsample.0.weight': {dout} output channels where the block has {out}");
            }
            Some(Downsample { conv, bn: self.bn(&format!("{p}.downsample.1"), out)? })
        } else {
            if out != channels || stride != 1 {
                bail!("missing key '{p}.downsample.0.weight' (the block changes shape)");
            }
            None
        };
        let (bn1, bn2, bn3) = (self.bn(&format!("{p}.bn1"), w1)?, self.bn(&format!("{p}.bn2"), w2)?, self.bn(&format!("{p}.bn3"), out)?);
        Ok(Some((Bottleneck { conv1, bn1, conv2, bn2, conv3, bn3, downsample }, out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// ResNet-50 has torchvision's parameter count without its classifier:
    /// 25,557,032 - 2048 * 1000 - 1000 = 23,508,032.
    #[test]
    fn resnet50_matches_torchvisions_parameter_count() {
        let net = ResNetConfig::from_arch("resnet50").unwrap().init(&mut rand::rngs::StdRng::seed_from_u64(0), &Device::flex());
        assert_eq!(net.parameter_count(), 23_508_032);
        let state = net.state_dict();
        assert_eq!((net.out_dim(), net.stage_depths()), (2048, vec![3, 4, 6, 3]));
        // The shortcut convolutions sit where torchvision puts them: the first block of each stage.
        assert!(state.iter().any(|(k, _)| k == "layer1.0.downsample.0.weight"));
        assert!(!state.iter().any(|(k, _)| k == "layer1.1.downsample.0.weight"));
    }
}
