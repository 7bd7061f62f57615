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
