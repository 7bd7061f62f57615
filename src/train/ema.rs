//! The teacher update: an exponential moving average of the student's parameters. BatchNorm
//! running statistics are buffers, not parameters: as in the reference, the teacher keeps its
//! own (from its own forward passes).

use burn::module::{Module, Param};
use burn::tensor::Tensor;

use crate::model::resnet::is_running_statistic;
use crate::weights::{ParamMapper, ParamVisitor, map_params, visit_params};

/// Every float parameter of a module, flattened, in visiting order, without autodiff.
#[derive(Default)]
struct Collect {
    params: Vec<Tensor<1>>,
}

impl ParamVisitor for Collect {
    fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<D>>) {
        if !is_running_statistic(path) {
            self.params.push(param.val().without_autodiff().detach().flatten(0, D - 1));
        }
    }
}

struct Blend {
    student: std::vec::IntoIter<Tensor<1>>,
    momentum: f64,
}

impl ParamMapper for Blend {
    fn map<const D: usize>(&mut self, path: &str, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if is_running_statistic(path) {
            return param;
        }
        let student = self.student.next().expect("teacher and student have the same parameters");
        let momentum = self.momentum;
        param.map(|teacher| {
            let dims = teacher.dims();
            assert_eq!(dims.iter().product::<usize>(), student.dims()[0], "teacher/student shape mismatch");
            teacher.mul_scalar(momentum) + student.reshape(dims).mul_scalar(1.0 - momentum)
        })
    }
}

/// teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter.
/// The two modules must have the same structure (the teacher starts as a copy of the student).
pub fn update_teacher<M: Module>(teacher: M, student: &M, momentum: f64) -> M {
    let mut collect = Collect::default();
    visit_params(student, &mut collect);
    let count = collect.params.len();
    let mut blend = Blend { student: collect.params.into_iter(), momentum };
    let teacher = map_params(teacher, &mut blend);
    assert!(blend.student.next().is_none(), "student has more parameters than the teacher ({count})");
    teacher
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LayerNorm;
    use burn::tensor::Device;

    fn values(n: &LayerNorm) -> Vec<f32> {
        n.weight.val().into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn blends_parameters_and_leaves_the_student_alone() {
        let dev = Device::flex();
        let teacher = LayerNorm::new(3, &dev); // weight 1, bias 0
        let student = LayerNorm { weight: Param::from_tensor(Tensor::full([3], 3.0, &dev)), ..LayerNorm::new(3, &dev) };
        let teacher = update_teacher(teacher, &student, 0.9);
        // 0.9 * 1 + 0.1 * 3 = 1.2
        for v in values(&teacher) {
            assert!((v - 1.2).abs() < 1e-6, "{v}");
        }
        assert_eq!(values(&student), vec![3.0; 3]);
        let teacher = update_teacher(teacher, &student, 1.0);
        assert!(values(&teacher).iter().all(|v| (v - 1.2).abs() < 1e-6));
    }

    #[test]
    fn batchnorm_running_statistics_are_not_averaged() {
        use crate::model::ResNetConfig;
        use rand::SeedableRng;
        let dev = Device::flex();
        let config = ResNetConfig::from_arch("resnet_micro").unwrap();
        let student = config.init(&mut rand::rngs::StdRng::seed_from_u64(1), &dev);
        let teacher = config.init(&mut rand::rngs::StdRng::seed_from_u64(2), &dev);
        student.bn1.running_mean.update(Tensor::full([8], 5.0, &dev));
        student.bn1.running_mean.value_sync();
        let teacher = update_teacher(teacher, &student, 0.5);
        let mean: Vec<f32> = teacher.bn1.running_mean.value().into_data().try_to_vec().unwrap();
        assert_eq!(mean, vec![0.0; 8], "the teacher keeps its own statistics");
        // bn1.weight is 1 in both: blends to 1; conv1 moves halfway.
        let w: Vec<f32> = teacher.bn1.weight.val().into_data().try_to_vec().unwrap();
        assert_eq!(w, vec![1.0; 8]);
        let fresh = config.init(&mut rand::rngs::StdRng::seed_from_u64(2), &dev).conv1.weight.val();
        let expected = (fresh + student.conv1.weight.val()).mul_scalar(0.5);
        let diff: f32 = (teacher.conv1.weight.val() - expected).abs().max().into_scalar();
        assert!(diff < 1e-6);
    }
}
