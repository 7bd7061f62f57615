//! The teacher update: an exponential moving average of the student's parameters.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;

/// Every float parameter of a module, flattened, in visiting order, without autodiff.
struct Collect(Vec<Tensor<1>>);

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(param.val().without_autodiff().detach().flatten(0, D - 1));
    }
}

struct Blend {
    student: std::vec::IntoIter<Tensor<1>>,
    momentum: f64,
}

impl ModuleMapper for Blend {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
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
    let mut collect = Collect(Vec::new());
    student.visit(&mut collect);
    let count = collect.0.len();
    let mut blend = Blend { student: collect.0.into_iter(), momentum };
    let teacher = teacher.map(&mut blend);
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
}
