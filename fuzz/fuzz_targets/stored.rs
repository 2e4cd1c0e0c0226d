//! What the controller reads back from its own tables (the upgrade state, a
//! node's desired state): corrupt rows are errors, never panics.
#![no_main]

use handover_core::upgrade::{Desired, Upgrade};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<Upgrade>(data);
    let _ = serde_json::from_slice::<Desired>(data);
});
