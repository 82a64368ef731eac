//! placeholder
pub(crate) const REALISTIC: &str = "services: {}\n";
