//! Observability for long jobs: TensorBoard scalars and PNG loss plots.

pub mod plot;
pub mod tensorboard;
