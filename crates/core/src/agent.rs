//! The node's upgrade agent, sans-IO: what to stage and when to switch,
//! from what the controller wants (`Desired`) and what the node has. The
//! node's agent and the simulation's node both follow this one plan.

use crate::release::Release;
use crate::upgrade::Desired;
use serde::{Deserialize, Serialize};

/// A switch the supervisor refused, kept durably by the node so the worker
/// restarted on the old release does not try it again at once (each try
/// stops producing and restarts the worker); shown on the node's /status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchFailure {
    pub artifact: String,
    pub release: u32,
    pub reason: String,
    pub at_ms: i64,
    /// The controller withdrew the switch since: a new request is a new try.
    #[serde(default)]
    pub withdrawn: bool,
}

/// What the agent should start now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentPlan {
    /// Download and verify this artifact (it is wanted and not staged).
    pub stage: Option<String>,
    /// Quiesce and switch to this staged artifact, as this release.
    pub switch: Option<(String, Release)>,
}

/// The plan for `desired`, given the artifacts staged here, whether this
/// worker already runs the artifact it is told to switch to (same release
/// and same binary: a patch build has the release of the one it replaces),
/// and the artifact whose switch failed here and that the controller has
/// not yet withdrawn (tried again only when asked anew).
pub fn plan(
    desired: &Desired,
    staged: &[String],
    already_runs: bool,
    refused: Option<&str>,
) -> AgentPlan {
    let stage = desired.stage.clone().filter(|id| !staged.contains(id));
    let switch = match (desired.switch_to, &desired.stage) {
        (Some(to), Some(id))
            if staged.contains(id) && !already_runs && refused != Some(id.as_str()) =>
        {
            Some((id.clone(), to))
        }
        _ => None,
    };
    AgentPlan { stage, switch }
}

/// Whether a failed switch counts as withdrawn: the controller answered
/// with a desired state (it has a revision) that asks for no switch. A
/// later request to switch is then a new try.
pub fn switch_withdrawn(desired: &Desired, desired_rev_known: bool) -> bool {
    desired_rev_known && desired.switch_to.is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(stage: Option<&str>, switch_to: Option<u32>) -> Desired {
        Desired {
            stage: stage.map(str::to_owned),
            quiesce: false,
            switch_to: switch_to.map(Release),
        }
    }

    /// node.db keeps this JSON across releases; one stored before
    /// `withdrawn` existed still reads (as not withdrawn).
    #[test]
    fn a_stored_switch_failure_keeps_its_shape() {
        let old = r#"{"artifact":"r2-a","release":2,"reason":"never ready","at_ms":5}"#;
        let f: SwitchFailure = serde_json::from_str(old).unwrap();
        assert!(!f.withdrawn);
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"artifact":"r2-a","release":2,"reason":"never ready","at_ms":5,"withdrawn":false}"#
        );
    }

    #[test]
    fn stage_what_is_wanted_then_switch_to_it() {
        let staged = vec!["r2-a".to_owned()];
        assert_eq!(
            plan(&desired(None, None), &[], false, None),
            AgentPlan::default()
        );
        assert_eq!(
            plan(&desired(Some("r2-a"), None), &[], false, None)
                .stage
                .as_deref(),
            Some("r2-a")
        );
        assert_eq!(
            plan(&desired(Some("r2-a"), None), &staged, false, None),
            AgentPlan::default()
        );
        // Told to switch before staging: stage first, switch later.
        assert_eq!(
            plan(&desired(Some("r2-a"), Some(2)), &[], false, None),
            AgentPlan {
                stage: Some("r2-a".into()),
                switch: None
            }
        );
        assert_eq!(
            plan(&desired(Some("r2-a"), Some(2)), &staged, false, None).switch,
            Some(("r2-a".into(), Release(2)))
        );
    }

    #[test]
    fn no_switch_to_what_runs_or_to_what_failed_until_asked_anew() {
        let staged = vec!["r2-a".to_owned()];
        let d = desired(Some("r2-a"), Some(2));
        assert_eq!(plan(&d, &staged, true, None).switch, None);
        assert_eq!(plan(&d, &staged, false, Some("r2-a")).switch, None);
        assert!(plan(&d, &staged, false, Some("r2-other")).switch.is_some());
        assert!(switch_withdrawn(&desired(Some("r2-a"), None), true));
        assert!(!switch_withdrawn(&desired(Some("r2-a"), None), false));
        assert!(!switch_withdrawn(&d, true));
    }
}
