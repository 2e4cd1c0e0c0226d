//! Record decoding and translation on arbitrary JSON, as batches carry it.
#![no_main]

use handover_core::record::{decode, upcast, ChannelDirectory, ChannelRef};
use handover_core::Schema;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let channels = ChannelDirectory::from([("news".to_owned(), ChannelRef { id: 1, segment_ms: 2000 })]);
    for schema in 0..4 {
        let _ = decode(Schema(schema), &value);
        let _ = upcast(Schema(schema), Schema(2), &value, "n1", &channels);
    }
    let _ = handover_core::params::events_for_group(Schema(1), &value, "g1");
    let _ = handover_core::params::events_for_group(Schema(2), &value, "g1");
});
