//! The DINO loss: cross-entropy between the centred, sharpened teacher distribution of each
//! global view and the student distribution of every other view, plus the centre's EMA and the
//! collapse metrics (teacher entropy, teacher-student KL).

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Device, Tensor, TensorData};

use crate::dist::Dist;
use crate::weights::HostTensor;

/// The student's softmax temperature in the reference (`--student_temp`).
pub const STUDENT_TEMP: f64 = 0.1;
/// The centre's EMA momentum in the reference (`--center_momentum`).
pub const CENTER_MOMENTUM: f64 = 0.9;

#[derive(Debug, Clone)]
pub struct DinoLoss {
    /// Views per image the student sees (2 global + local crops).
    pub ncrops: usize,
    pub student_temp: f64,
    pub center_momentum: f64,
    /// EMA of the teacher's batch-mean output, [1, out_dim]; never part of a graph.
    pub center: Tensor<2>,
}

/// One evaluation of the loss.
pub struct LossOutput {
    /// Scalar loss, differentiable with respect to the student output.
    pub loss: Tensor<1>,
    /// Mean entropy of the teacher's target distributions (nats).
    pub teacher_entropy: Tensor<1>,
    /// KL(teacher || student) averaged over the same view pairs as the loss.
    pub kl: Tensor<1>,
}

impl DinoLoss {
    /// The loss with the reference's student temperature and centre momentum, and a zero centre.
    pub fn new(out_dim: usize, ncrops: usize, device: &Device) -> Self {
        assert!(ncrops >= 2, "DINO needs at least the two global views");
        Self {
            ncrops,
            student_temp: STUDENT_TEMP,
            center_momentum: CENTER_MOMENTUM,
            center: Tensor::zeros([1, out_dim], device),
        }
    }

    /// Loss for one batch. `student_out` is [ncrops * B, K] view-major, `teacher_out` is
    /// [2 * B, K] for the two global views, sharpened at `teacher_temp`. Updates the centre
    /// afterwards, from the teacher outputs of every rank's batch.
    pub fn forward(&mut self, student_out: Tensor<2>, teacher_out: Tensor<2>, teacher_temp: f64, dist: &Dist) -> LossOutput {
        let [rows, k] = student_out.dims();
        let batch = rows / self.ncrops;
        let teacher_out = teacher_out.detach().without_autodiff();

        let student_logp = log_softmax(student_out.div_scalar(self.student_temp), 1).reshape([self.ncrops, batch, k]);
        let teacher_logits = (teacher_out.clone() - self.center.clone()).div_scalar(teacher_temp);
        let targets = softmax(teacher_logits.clone(), 1).reshape([2, batch, k]);

        // Each global view a is the target of every student view except itself:
        // sum over v != a of log p_v = (sum over all v) - log p_a.
        let all_views = student_logp.clone().sum_dim(0);
        let others = all_views - student_logp.slice_dim(0, 0..2);
        let pairs = (2 * (self.ncrops - 1) * batch) as f64;
        // The targets carry no graph: the teacher receives no gradient through the loss.
        let loss = (targets.clone() * others).sum().neg().div_scalar(pairs);

        let target_logp = log_softmax(teacher_logits, 1).reshape([2, batch, k]);
        let teacher_entropy = (targets * target_logp).sum().neg().div_scalar((2 * batch) as f64);
        let kl = loss.clone().without_autodiff().detach() - teacher_entropy.clone();

        self.update_center(teacher_out, dist);
        LossOutput { loss, teacher_entropy, kl }
    }

    /// The centre's EMA step towards the mean teacher output of the global batch (all ranks'
    /// rows; the reference all-reduces the same sum).
    fn update_center(&mut self, teacher_out: Tensor<2>, dist: &Dist) {
        let batch_center = if dist.world_size() == 1 {
            teacher_out.mean_dim(0)
        } else {
            let rows = teacher_out.dims()[0];
            let device = teacher_out.device();
            let HostTensor { shape, mut values } = HostTensor::from_tensor(teacher_out.sum_dim(0));
            let mut total_rows = [rows as f64];
            dist.sum_f64(&mut total_rows);
            dist.sum_f32(&mut values);
            Tensor::<2>::from_data(TensorData::new(values, shape), &device).div_scalar(total_rows[0])
        };
        self.center = self.center.clone().mul_scalar(self.center_momentum)
            + batch_center.mul_scalar(1.0 - self.center_momentum);
    }
}
