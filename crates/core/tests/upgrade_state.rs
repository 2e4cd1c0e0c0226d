//! The persisted upgrade state is a contract between releases: a controller
//! resumes what an older one stored. Every file in `fixtures/upgrade_state`
//! is a state some release stored (named `v<upgrade_state>-...`); every
//! newer binary must decode it and go on stepping it. Never edit a fixture:
//! add new ones when the state changes, and bump `CONTRACTS.upgrade_state`.

use handover_core::release::{Release, Schema, CONTRACTS};
use handover_core::upgrade::{ClusterView, Input, Path, Phase, Upgrade};
use std::path::PathBuf;

fn fixtures() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upgrade_state");
    let mut out: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("fixtures dir")
        .map(|e| {
            let path = e.expect("entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&path).expect("fixture"))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_stored_state_of_every_release_decodes_and_steps() {
    let all = fixtures();
    assert!(all.len() >= 10, "fixtures missing: {}", all.len());
    for (name, text) in all {
        let version: u32 = name
            .strip_prefix('v')
            .and_then(|r| r.split('-').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name}: fixtures are named v<version>-..."));
        assert!(
            version <= CONTRACTS.upgrade_state,
            "{name}: from a newer upgrade state than this binary's {}",
            CONTRACTS.upgrade_state
        );
        let mut up: Upgrade = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        // States stored before preflight chose a path were incompatible upgrades.
        if version == 1 {
            assert_eq!(up.path, Path::Incompatible, "{name}");
            assert_eq!(up.plan.target.facts().map(|f| f.schema), Ok(Schema(2)));
        }
        // Re-encoding loses nothing this binary reads.
        let again: Upgrade = serde_json::from_str(&serde_json::to_string(&up).unwrap()).unwrap();
        assert_eq!(again, up, "{name}");
        // And it can be stepped: a finished upgrade does not move, a running
        // or paused one takes the tick without panicking.
        let before = up.clone();
        let cluster = ClusterView {
            epoch: 2,
            fenced: matches!(before.phase, Phase::Fence | Phase::Controller),
            controller_release: Release(1),
            controller_sha256: None,
            controller_supervisor_sha256: None,
            replicas_behind: vec![],
            database_schema: Schema(1),
            disk_free_bytes: 1 << 30,
        };
        let _ = up.step(
            Input::Tick {
                nodes: vec![],
                cluster,
            },
            u64::MAX / 2,
        );
        if before.status.is_over() {
            assert_eq!(up, before, "{name}: a finished upgrade does not move");
        }
    }
}
