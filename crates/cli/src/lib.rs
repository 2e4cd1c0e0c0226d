//! The `handover` binary's library half: the operator client, the viewer
//! load generator, the exactly-once checker, the local fleet of processes
//! (used by the demo and the process tests) and the demo itself.

pub mod artifact;
pub mod bench;
pub mod check;
pub mod client;
pub mod demo;
pub mod fleet;
pub mod init;
pub mod roles;
pub mod secret;
pub mod upgrade;
pub mod viewers;
