//! TEST FIXTURE, not a product binary: the worker of the supervisor's
//! process tests (see `fixture/worker.rs`).

use std::process::ExitCode;

#[path = "fixture/worker.rs"]
mod worker;

fn main() -> ExitCode {
    worker::main()
}
