//! Least privilege on real processes: artifact signatures are required by
//! default (no trusted key and no opt-in, or the opt-in on an address other
//! hosts reach, refuses to start before anything binds or touches the data
//! dir); tokens come from files or the environment, never argv, and a token
//! file others may read is refused; and after a controller (migrated, so
//! with a snapshot) and a node ran, their data dirs are 0700 and their
//! databases 0600, a looser data dir left by an older release included.
//! A controller's read-only token reaches its workers the way the operator
//! token does (the environment): it reads and cannot change.

mod common;

use common::{exe, Site};
use handover::fleet::{wait_healthy, Proc};
use handover_core::wire::Role;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Bound on a process that must refuse to start (it exits at once).
const REFUSAL_WAIT: Duration = Duration::from_secs(20);

/// Runs this binary with `args` and only `env` of ours; it must exit with
/// an error within [`REFUSAL_WAIT`]. Returns its stderr.
async fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = tokio::process::Command::new(exe());
    cmd.args(args)
        .env_remove("HANDOVER_BOOTSTRAP_TOKEN")
        .env_remove("HANDOVER_OPERATOR_TOKEN")
        .env_remove("HANDOVER_READ_ONLY_TOKEN")
        .env_remove("HANDOVER_TRUSTED_KEYS")
        .env_remove("HANDOVER_ALLOW_UNSIGNED_ARTIFACTS")
        .env("RUST_BACKTRACE", "0")
        .envs(env.iter().copied())
        .kill_on_drop(true);
    let out = tokio::time::timeout(REFUSAL_WAIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{args:?} did not exit: it should have refused to start"))
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} started: {stderr}");
    stderr
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `text` in a file of `mode` under `dir`.
fn secret_file(dir: &Path, name: &str, text: &str, file_mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{text}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(file_mode)).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_trusted_key_nothing_starts_unless_opted_out_on_loopback() {
    let site = Site::new("signatures required");
    let tokens = [("HANDOVER_OPERATOR_TOKEN", "operator-token-0123456789")];
    let data_dir = site.path().join("controller");
    let dir = data_dir.display().to_string();
    let loopback = site.addr(1, 7400).to_string();

    // No key, no opt-in, on loopback: refused, saying what to give.
    let said = refused(
        &["controller", "--data-dir", &dir, "--listen", &loopback],
        &tokens,
    )
    .await;
    assert!(
        said.contains("artifact signatures are required")
            && said.contains("--trusted-key FILE")
            && said.contains("handover artifact keygen")
            && said.contains("--allow-unsigned-artifacts"),
        "{said}"
    );

    // The opt-in on an address other hosts reach: refused before binding
    // (nothing listens; the data dir, made before the socket is bound, is
    // not even created). Supervised, bare, and by the environment alike.
    for extra in [
        &["--allow-unsigned-artifacts"][..],
        &["--allow-unsigned-artifacts", "--no-supervisor"][..],
    ] {
        let mut args = vec!["controller", "--data-dir", &dir, "--listen", "0.0.0.0:7400"];
        args.extend_from_slice(extra);
        let said = refused(&args, &tokens).await;
        assert!(
            said.contains("--allow-unsigned-artifacts is refused on 0.0.0.0")
                && said.contains("loopback"),
            "{args:?}: {said}"
        );
    }
    let mut env = tokens.to_vec();
    env.push(("HANDOVER_ALLOW_UNSIGNED_ARTIFACTS", "true"));
    let said = refused(
        &[
            "node",
            "--id",
            "g1-a",
            "--role",
            "primary",
            "--group",
            "g1",
            "--data-dir",
            &dir,
            "--listen",
            "[::]:7500",
        ],
        &env,
    )
    .await;
    assert!(said.contains("refused on ::"), "{said}");
    assert!(!data_dir.exists(), "a refused start touched its data dir");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_on_argv_and_data_dirs_and_databases_private() {
    let site = Site::new("least privilege at rest");
    let mut fleet = site.fleet();
    // This test starts the controller by hand, without TLS: plain HTTP.
    fleet.plain_http().unwrap();
    let secrets = site.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let op_file = secret_file(&secrets, "operator.token", &fleet.operator_token, 0o600);
    let loose = secret_file(&secrets, "loose.token", &fleet.operator_token, 0o640);
    let controller_dir = site.path().join("controller");
    // A data dir an older release (or an operator) left readable by all.
    std::fs::create_dir(&controller_dir).unwrap();
    std::fs::set_permissions(&controller_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let listen = fleet.controller_addr().to_string();
    let data_dir = controller_dir.display().to_string();

    // A token on argv, or in a file others may read: refused.
    let said = refused(
        &[
            "controller",
            "--data-dir",
            &data_dir,
            "--listen",
            &listen,
            "--allow-unsigned-artifacts",
            "--operator-token",
            &fleet.operator_token,
        ],
        &[],
    )
    .await;
    assert!(
        said.contains("--operator-token is refused") && said.contains("--operator-token-file"),
        "{said}"
    );
    let loose_arg = loose.display().to_string();
    let said = refused(
        &[
            "controller",
            "--data-dir",
            &data_dir,
            "--listen",
            &listen,
            "--allow-unsigned-artifacts",
            "--operator-token-file",
            &loose_arg,
        ],
        &[],
    )
    .await;
    assert!(
        said.contains("mode 0640") && said.contains("chmod 600"),
        "{said}"
    );
    assert_eq!(mode(&controller_dir), 0o755, "refused before touching it");

    // Release 1, bare, with the operator token from a file and none in its
    // environment; then release 2 under its supervisor (tokens in the
    // environment, as the fleet gives them), which migrates the database
    // after a snapshot.
    let op_arg = op_file.display().to_string();
    let args: Vec<String> = [
        "controller",
        "--release",
        "1",
        "--no-supervisor",
        "--data-dir",
        &data_dir,
        "--listen",
        &listen,
        "--allow-unsigned-artifacts",
        "--operator-token-file",
        &op_arg,
    ]
    .map(str::to_owned)
    .to_vec();
    let log = site.path().join("logs/controller-r1-files.log");
    let mut r1 = Proc::spawn(&exe(), "controller r1", &args, log.clone()).unwrap();
    wait_healthy(&format!("{}/healthz", fleet.controller_url()), &mut r1)
        .await
        .unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", r1.pid().unwrap())).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(
        !cmdline.contains(&fleet.operator_token),
        "a token on argv: {cmdline}"
    );
    // An operator command with the token from a file, and from a loose one.
    let status = |file: &PathBuf| {
        let file = file.display().to_string();
        let url = fleet.controller_url();
        async move {
            tokio::process::Command::new(exe())
                .args(["status", "--json", "--controller", &url])
                .args(["--operator-token-file", &file])
                .env_remove("HANDOVER_OPERATOR_TOKEN")
                .output()
                .await
                .unwrap()
        }
    };
    let ok = status(&op_file).await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = status(&loose).await;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("chmod 600"));
    r1.terminate().await.unwrap();
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("tightened permissions") && said.contains("0755"),
        "the looser data dir was not tightened, or not said: {said}"
    );

    fleet.start_controller(2).await.unwrap();
    let group = handover_core::params::Group {
        name: "g1".into(),
        primary: "g1-a".into(),
        backup: "g1-b".into(),
    };
    let _: Value = fleet.op.post("/api/v1/groups", &group).await.unwrap();
    let i = fleet.add_node("g1-a", Role::Primary, "g1", 2);
    fleet.start_node(i).await.unwrap();
    fleet.wait_nodes_registered().await.unwrap();
    let node_dir = fleet.nodes[i].data_dir.clone();
    fleet.stop_all().await.unwrap();

    let snapshots = controller_dir.join("snapshots");
    let snapshot = std::fs::read_dir(&snapshots)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "db"))
        .expect("the migration's snapshot");
    for dir in [
        &controller_dir,
        &controller_dir.join("supervisor"),
        &controller_dir.join("artifacts"),
        &snapshots,
        &node_dir,
        &node_dir.join("supervisor"),
    ] {
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
    }
    let mut files = vec![snapshot];
    for (dir, db) in [(&controller_dir, "controller.db"), (&node_dir, "node.db")] {
        for suffix in ["", "-wal", "-shm"] {
            let p = dir.join(format!("{db}{suffix}"));
            if suffix.is_empty() || p.exists() {
                files.push(p);
            }
        }
    }
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
}

/// The read-only token, as operators give it (a file), through the
/// supervisor to its worker: refused on argv, equal to the operator token
/// or too short, before anything binds; given, it reads the status and its
/// fence is refused `forbidden`, while the operator token's goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_token_reads_but_cannot_fence_through_a_supervisor() {
    let site = Site::new("read-only operator");
    let mut fleet = site.fleet();
    // This test starts the controller by hand, without TLS: plain HTTP.
    fleet.plain_http().unwrap();
    let secrets = site.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let read_only = "read-only-token-of-this-test-0123";
    let op_file = secret_file(&secrets, "operator.token", &fleet.operator_token, 0o600);
    let ro_file = secret_file(&secrets, "read-only.token", read_only, 0o600);
    let same_file = secret_file(&secrets, "same.token", &fleet.operator_token, 0o600);
    let data_dir = site.path().join("controller");
    let (dir, listen) = (
        data_dir.display().to_string(),
        fleet.controller_addr().to_string(),
    );
    let (op_arg, ro_arg, same_arg) = (
        op_file.display().to_string(),
        ro_file.display().to_string(),
        same_file.display().to_string(),
    );
    let base = [
        "controller",
        "--data-dir",
        &dir,
        "--listen",
        &listen,
        "--allow-unsigned-artifacts",
        "--operator-token-file",
        &op_arg,
    ];
    let with = |extra: [&'static str; 2]| {
        let mut args = base.to_vec();
        args.extend(extra);
        args
    };
    let said = refused(&with(["--read-only-token", read_only]), &[]).await;
    assert!(
        said.contains("--read-only-token is refused") && said.contains("--read-only-token-file"),
        "{said}"
    );
    let mut args = base.to_vec();
    args.extend(["--read-only-token-file", same_arg.as_str()]);
    let said = refused(&args, &[]).await;
    assert!(said.contains("is the operator token"), "{said}");
    let said = refused(&base, &[("HANDOVER_READ_ONLY_TOKEN", "short")]).await;
    assert!(said.contains("read-only token must be 16"), "{said}");
    assert!(!data_dir.exists(), "a refused start touched its data dir");

    // Under its supervisor (the default), which hands both tokens to its
    // worker in the environment.
    let mut args: Vec<String> = base.iter().map(|a| a.to_string()).collect();
    args.extend(["--read-only-token-file".to_owned(), ro_arg.clone()]);
    let log = site.path().join("logs/controller-read-only.log");
    std::fs::create_dir_all(site.path().join("logs")).unwrap();
    let mut controller = Proc::spawn(&exe(), "controller", &args, log).unwrap();
    wait_healthy(
        &format!("{}/healthz", fleet.controller_url()),
        &mut controller,
    )
    .await
    .unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", controller.pid().unwrap())).unwrap();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(read_only),
        "a token on argv"
    );
    let operator = |args: &'static [&'static str], file: &Path| {
        let (file, url) = (file.display().to_string(), fleet.controller_url());
        async move {
            tokio::process::Command::new(exe())
                .args(args)
                .args(["--controller", &url, "--operator-token-file", &file])
                .env_remove("HANDOVER_OPERATOR_TOKEN")
                .output()
                .await
                .unwrap()
        }
    };
    let status = operator(&["status", "--json"], &ro_file).await;
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let fence = operator(&["fence"], &ro_file).await;
    let said = String::from_utf8_lossy(&fence.stderr);
    assert!(!fence.status.success(), "the read-only token fenced");
    assert!(said.contains("forbidden") && said.contains("403"), "{said}");
    let fenced = |out: &std::process::Output| {
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["cluster"]["fenced"].as_bool()
    };
    let status = operator(&["status", "--json"], &ro_file).await;
    assert_eq!(fenced(&status), Some(false));
    let fence = operator(&["fence"], &op_file).await;
    assert!(
        fence.status.success(),
        "{}",
        String::from_utf8_lossy(&fence.stderr)
    );
    let status = operator(&["status", "--json"], &ro_file).await;
    assert_eq!(fenced(&status), Some(true));
    controller.terminate().await.unwrap();
}
