//! `KIVI_FORCE_SCALAR=1` selects the portable kernels (own test binary: the path is read once).

use kivi_model::matrix::{KernelPath, Matrix};

#[test]
fn force_scalar_env_selects_scalar_path() {
    std::env::set_var("KIVI_FORCE_SCALAR", "1");
    assert_eq!(KernelPath::detect(), KernelPath::Scalar);
    let m = Matrix::from_f32("w", 1, 2, vec![1.0, 2.0]);
    let mut out = [0.0];
    m.matmul(&[3.0, 4.0], 1, &mut out);
    assert_eq!(out, [11.0]);
}
