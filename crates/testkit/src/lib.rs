//! Helpers only the process tests use, kept out of the shipped binary: a
//! dev-dependency of the `handover` crate.

pub mod faultproxy;
pub mod subnet;
