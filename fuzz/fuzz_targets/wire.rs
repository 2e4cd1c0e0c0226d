//! Every node-protocol message decoder, on arbitrary bytes: refuse with a
//! known code, never panic.
#![no_main]

use handover_core::wire::{decode, Batch, Heartbeat, Hello};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for code in [
        decode::<Hello>(data).err().map(|e| e.code()),
        decode::<Heartbeat>(data).err().map(|e| e.code()),
        decode::<Batch>(data).err().map(|e| e.code()),
    ]
    .into_iter()
    .flatten()
    {
        assert!(matches!(code, "malformed" | "unsupported_version" | "invalid_field"));
    }
    let _ = handover_core::artifact::Manifest::decode(data);
});
