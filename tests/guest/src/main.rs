//! Guest workload (placeholder).
fn main() {}
