//! A command module that does nothing: the baseline for start-up costs.
fn main() {}
