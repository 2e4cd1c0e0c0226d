//! Where the CLI takes a secret from: its environment variable or a file
//! the operator names, never the command line (any user of the host reads
//! a process's argv in `ps` and `/proc/PID/cmdline`). A secret file must be
//! private to its owner ([`handover_private::is_private`]): one its group
//! or others may read or write is refused, since the process cannot know
//! who read it already. One helper, [`secret_from`], for every secret.

use anyhow::{bail, Context};
use std::ffi::OsString;
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

/// Largest secret file read: a token is far shorter; anything longer is not
/// a token file.
pub const SECRET_FILE_BYTES_MAX: u64 = 4096;

/// One secret the CLI reads: what it is called, its environment variable
/// and its file flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Secret {
    pub name: &'static str,
    pub env: &'static str,
    pub file_flag: &'static str,
}

/// The token operators present to the controller's API.
pub const OPERATOR_TOKEN: Secret = Secret {
    name: "operator token",
    env: "HANDOVER_OPERATOR_TOKEN",
    file_flag: "--operator-token-file",
};

/// The token that may only read the controller's API (dashboards,
/// status); optional on the controller, refused equal to the operator token.
pub const READ_ONLY_TOKEN: Secret = Secret {
    name: "read-only token",
    env: "HANDOVER_READ_ONLY_TOKEN",
    file_flag: "--read-only-token-file",
};

/// The single-use token `handover node add ID` issues, which a node trades
/// at its first hello for the credential it chose.
pub const BOOTSTRAP_TOKEN: Secret = Secret {
    name: "bootstrap token",
    env: "HANDOVER_BOOTSTRAP_TOKEN",
    file_flag: "--bootstrap-token-file",
};

/// The secret from `file` when one is given (the flag beats the
/// environment, as for every other flag), else from its environment
/// variable. Refused: a file its group or others may access, an empty or
/// unreadable one, neither given.
pub fn secret_from(secret: &Secret, file: Option<&Path>) -> anyhow::Result<String> {
    secret_from_parts(secret, std::env::var_os(secret.env), file)
}

/// [`secret_from`] with the environment variable's value given.
pub fn secret_from_parts(
    secret: &Secret,
    env: Option<OsString>,
    file: Option<&Path>,
) -> anyhow::Result<String> {
    let Secret {
        name,
        env: var,
        file_flag,
    } = *secret;
    if let Some(path) = file {
        return read_secret_file(path).with_context(|| format!("the {name} ({file_flag})"));
    }
    match env {
        Some(v) if !v.is_empty() => v
            .into_string()
            .map_err(|_| anyhow::anyhow!("the {name} in {var} is not UTF-8")),
        _ => bail!(
            "the {name} is missing: set {var}, or pass {file_flag} FILE \
             (a file only its owner may read, e.g. mode 0600); it is never taken \
             on the command line, where every user of the host can read it"
        ),
    }
}

/// A secret file's content, trimmed, if only its owner may access it.
/// Refuses a file holding a secret (a token, a private key) that its group
/// or others may access.
pub fn check_private(path: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read the mode of {}", path.display()))?;
    ensure_private(path, &meta)
}

fn ensure_private(path: &Path, meta: &std::fs::Metadata) -> anyhow::Result<()> {
    anyhow::ensure!(meta.is_file(), "{} is not a file", path.display());
    let mode = meta.permissions().mode() & 0o777;
    anyhow::ensure!(
        handover_private::is_private(mode),
        "{} has mode {mode:04o}: its group or others may access it, so the secret \
         may be known already; make it private (chmod 600 {}) and choose a new secret \
         if others could read it",
        path.display(),
        path.display()
    );
    Ok(())
}

fn read_secret_file(path: &Path) -> anyhow::Result<String> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot read the mode of {}", path.display()))?;
    ensure_private(path, &meta)?;
    let mut text = String::new();
    file.take(SECRET_FILE_BYTES_MAX + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?;
    anyhow::ensure!(
        text.len() as u64 <= SECRET_FILE_BYTES_MAX,
        "{} is longer than {SECRET_FILE_BYTES_MAX} bytes: not a secret file",
        path.display()
    );
    let secret = text.trim();
    anyhow::ensure!(!secret.is_empty(), "{} is empty", path.display());
    Ok(secret.to_owned())
}

/// Refuses a secret given on the command line by a flag kept only to say
/// where it goes now; the process should not run with it in its argv.
pub fn refuse_on_argv(secret: &Secret, flag: &str, given: bool) -> anyhow::Result<()> {
    if given {
        bail!(
            "{flag} is refused: the {} is not taken on the command line, where every \
             user of the host can read it (ps, /proc/PID/cmdline); set {} or pass {} \
             FILE (mode 0600) instead, and choose a new {} if others could have seen it",
            secret.name,
            secret.env,
            secret.file_flag,
            secret.name
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::Permissions;

    fn file_with(dir: &Path, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_private_file_is_read_trimmed_and_beats_the_environment() {
        let tmp = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o400] {
            let f = file_with(tmp.path(), "t", "  0123456789abcdef\n", mode);
            let got =
                secret_from_parts(&OPERATOR_TOKEN, Some("from-env".into()), Some(&f)).unwrap();
            assert_eq!(got, "0123456789abcdef", "mode {mode:o}");
        }
    }

    #[test]
    fn a_file_others_may_access_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o620, 0o602] {
            let f = file_with(tmp.path(), "t", "0123456789abcdef", mode);
            let err = secret_from_parts(&BOOTSTRAP_TOKEN, None, Some(&f)).unwrap_err();
            let text = format!("{err:#}");
            assert!(
                text.contains("--bootstrap-token-file")
                    && text.contains(&format!("{mode:04o}"))
                    && text.contains("chmod 600"),
                "{text}"
            );
        }
    }

    #[test]
    fn empty_missing_and_oversized_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let empty = file_with(tmp.path(), "empty", " \n", 0o600);
        let big = file_with(
            tmp.path(),
            "big",
            &"x".repeat(SECRET_FILE_BYTES_MAX as usize + 1),
            0o600,
        );
        let absent = tmp.path().join("absent");
        for (f, says) in [
            (&empty, "is empty"),
            (&big, "longer than"),
            (&absent, "cannot open"),
        ] {
            let err = secret_from_parts(&OPERATOR_TOKEN, None, Some(f)).unwrap_err();
            assert!(format!("{err:#}").contains(says), "{err:#}");
        }
        let dir = tmp.path().join("d");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, Permissions::from_mode(0o700)).unwrap();
        let err = secret_from_parts(&OPERATOR_TOKEN, None, Some(&dir)).unwrap_err();
        assert!(format!("{err:#}").contains("not a file"), "{err:#}");
    }

    #[test]
    fn the_environment_is_the_other_source_and_neither_is_an_error() {
        assert_eq!(
            secret_from_parts(&OPERATOR_TOKEN, Some("0123456789abcdef".into()), None).unwrap(),
            "0123456789abcdef"
        );
        for env in [None, Some(OsString::new())] {
            let err = secret_from_parts(&OPERATOR_TOKEN, env, None).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("HANDOVER_OPERATOR_TOKEN") && text.contains("--operator-token-file"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_secret_on_the_command_line_is_refused_with_where_it_goes() {
        refuse_on_argv(&OPERATOR_TOKEN, "--operator-token", false).unwrap();
        let text = refuse_on_argv(&OPERATOR_TOKEN, "--operator-token", true)
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("--operator-token is refused")
                && text.contains("HANDOVER_OPERATOR_TOKEN")
                && text.contains("--operator-token-file"),
            "{text}"
        );
    }
}
