//! `handover bench --quick` runs every benchmark at tiny sizes and prints
//! every JSON key (null only for a benchmark it says it skipped: PostgreSQL
//! down). No timing is asserted: the figures are for
//! docs/benchmarks.md, not for CI. Its processes use 127.50-59.x.x, which no
//! other test uses.

use std::process::Command;

#[test]
fn bench_quick_completes_and_prints_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("benchmarks.md");
    let out = Command::new(env!("CARGO_BIN_EXE_handover"))
        .args(["bench", "--quick", "--json", "--out"])
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench --quick failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in handover::bench::JSON_KEYS {
        let (group, name) = key.split_once('.').unwrap();
        // drain_postgres is skipped, saying why, when PostgreSQL is down.
        if v["skipped"][group].is_string() {
            assert!(v[group][name].is_null(), "{key} of a skipped benchmark");
            continue;
        }
        assert!(v[group][name].is_number(), "no figure for {key} in {v:#}");
    }
    let md = std::fs::read_to_string(&report).unwrap();
    assert!(md.contains("| benchmark |"), "no table in {md}");
}
