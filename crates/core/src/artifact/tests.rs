use super::*;

const BINARY: &[u8] = b"#!/bin/sh\necho pretend this is handover\n";

fn facts_of(release: u32) -> ReleaseFacts {
    ReleaseInfo::of(Release(release)).unwrap().facts()
}

/// A release no binary of this build carries, as a newer binary would
/// describe it.
fn future_facts() -> ReleaseFacts {
    ReleaseFacts {
        release: Release(9),
        semver: "9.1.0".into(),
        schema: Schema(9),
        protocol: ProtocolRange { min: 8, max: 9 },
        window_min_schema: Schema(8),
        migrates_from: vec![Schema(8)],
    }
}

fn good() -> Manifest {
    Manifest::for_release(
        &facts_of(2),
        crate::release::CONTRACTS,
        sha256_hex(BINARY),
        BINARY.len() as u64,
        1_700_000_000_000,
    )
    .unwrap()
}

#[test]
fn sha256_of_known_input() {
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn good_manifest_validates_and_round_trips() {
    let m = good();
    assert_eq!(m.v, MANIFEST_VERSION);
    assert_eq!(m.semver, "2.0.0");
    assert_eq!(m.schema, Schema(2));
    assert_eq!(m.protocol, ProtocolRange { min: 1, max: 2 });
    m.validate().unwrap();
    assert_eq!(m.id(), format!("r2-{}", &m.sha256[..12]));
    check_id(&m.id()).unwrap();
    let back = Manifest::decode(m.to_pretty_json().as_bytes()).unwrap();
    assert_eq!(back, m);
    let compact = serde_json::to_string(&m).unwrap();
    assert_eq!(Manifest::decode(compact.as_bytes()).unwrap(), m);
}

#[test]
fn a_release_this_binary_does_not_carry_is_judged_by_shape() {
    let m = Manifest::for_release(
        &future_facts(),
        crate::release::CONTRACTS,
        sha256_hex(BINARY),
        1,
        0,
    )
    .unwrap();
    assert_eq!(m.facts(), future_facts());
    assert_eq!(Manifest::decode(m.to_pretty_json().as_bytes()), Ok(m));
    // Facts that cannot describe any release are refused all the same.
    type Spoil = Box<dyn Fn(&mut ReleaseFacts)>;
    let spoiled: Vec<Spoil> = vec![
        Box::new(|f| f.protocol = ProtocolRange { min: 3, max: 2 }),
        Box::new(|f| f.window_min_schema = Schema(10)),
        Box::new(|f| f.migrates_from = vec![Schema(9)]),
        Box::new(|f| f.migrates_from = vec![Schema(8), Schema(7)]),
        Box::new(|f| f.schema = Schema(0)),
    ];
    for spoil in spoiled {
        let mut f = future_facts();
        spoil(&mut f);
        let e = Manifest::for_release(&f, crate::release::CONTRACTS, sha256_hex(BINARY), 1, 0)
            .unwrap_err();
        assert_eq!(e.code(), "invalid_manifest", "{f:?}: {e}");
    }
}

#[test]
fn each_bad_field_is_refused() {
    type Spoil = Box<dyn Fn(&mut Manifest)>;
    let cases: Vec<(&str, Spoil, &str)> = vec![
        ("v", Box::new(|m| m.v = 1), "unsupported_version"),
        ("v0", Box::new(|m| m.v = 0), "unsupported_version"),
        (
            "release0",
            Box::new(|m| m.release = Release(0)),
            "invalid_manifest",
        ),
        (
            "contracts",
            Box::new(|m| m.contracts.worker_cli = 0),
            "invalid_manifest",
        ),
        (
            "window",
            Box::new(|m| m.window_min_schema = Schema(2)),
            "release_mismatch",
        ),
        (
            "schema",
            Box::new(|m| m.schema = Schema(1)),
            "release_mismatch",
        ),
        (
            "protocol",
            Box::new(|m| m.protocol = ProtocolRange { min: 2, max: 2 }),
            "release_mismatch",
        ),
        (
            "release-vs-schema",
            Box::new(|m| m.release = Release(1)),
            "release_mismatch",
        ),
        (
            "semver-empty",
            Box::new(|m| m.semver.clear()),
            "invalid_manifest",
        ),
        (
            "semver-chars",
            Box::new(|m| m.semver = "2.0.0/../x".into()),
            "invalid_manifest",
        ),
        (
            "semver-long",
            Box::new(|m| m.semver = "1".repeat(SEMVER_CHARS_MAX + 1)),
            "invalid_manifest",
        ),
        (
            "sha-upper",
            Box::new(|m| m.sha256 = m.sha256.to_uppercase()),
            "invalid_manifest",
        ),
        (
            "sha-short",
            Box::new(|m| m.sha256.truncate(63)),
            "invalid_manifest",
        ),
        (
            "sha-long",
            Box::new(|m| m.sha256.push('0')),
            "invalid_manifest",
        ),
        (
            "sha-nonhex",
            Box::new(|m| m.sha256.replace_range(0..1, "g")),
            "invalid_manifest",
        ),
        ("size-zero", Box::new(|m| m.size = 0), "invalid_manifest"),
        (
            "size-huge",
            Box::new(|m| m.size = ARTIFACT_BYTES_MAX + 1),
            "invalid_manifest",
        ),
        (
            "created",
            Box::new(|m| m.created_ms = -1),
            "invalid_manifest",
        ),
    ];
    for (name, spoil, code) in cases {
        let mut m = good();
        spoil(&mut m);
        let err = m.validate().expect_err(name);
        assert_eq!(err.code(), code, "{name}: {err}");
        let doc = serde_json::to_string(&m).unwrap();
        assert_eq!(Manifest::decode(doc.as_bytes()), Err(err), "{name}");
    }
    let mut m = good();
    m.size = ARTIFACT_BYTES_MAX;
    m.validate().unwrap();
}

#[test]
fn malformed_documents_are_refused() {
    let m = good();
    let mut v = serde_json::to_value(&m).unwrap();
    v["extra"] = serde_json::json!(1);
    let err = Manifest::decode(v.to_string().as_bytes()).unwrap_err();
    assert_eq!(err.code(), "malformed", "{err}");
    let mut v = serde_json::to_value(&m).unwrap();
    v.as_object_mut().unwrap().remove("sha256");
    let err = Manifest::decode(v.to_string().as_bytes()).unwrap_err();
    assert_eq!(err.code(), "malformed", "{err}");
    let err = Manifest::decode(b"not json").unwrap_err();
    assert_eq!(err.code(), "malformed");
    let big = vec![b' '; MANIFEST_BYTES_MAX + 1];
    assert_eq!(
        Manifest::decode(&big),
        Err(ArtifactError::ManifestTooLarge {
            size: MANIFEST_BYTES_MAX + 1
        })
    );
}

#[test]
fn ids() {
    for ok in [
        "r1-0123456789ab",
        "r42-abcdefabcdef",
        "r4294967295-000000000000",
    ] {
        check_id(ok).unwrap();
    }
    for bad in [
        "",
        "r",
        "r1",
        "r1-",
        "1-0123456789ab",
        "r-0123456789ab",
        "r01-0123456789ab",
        "r4294967296-0123456789ab",
        "r1-0123456789AB",
        "r1-0123456789a",
        "r1-0123456789abc",
        "r1-../../etc/pa",
        "r1-0123456789ab/",
    ] {
        assert_eq!(check_id(bad).unwrap_err().code(), "invalid_id", "{bad:?}");
    }
}

fn check_chunks(m: &Manifest, bytes: &[u8], chunk: usize) -> Result<(), ArtifactError> {
    let mut c = DigestCheck::new(m);
    for piece in bytes.chunks(chunk) {
        c.update(piece)?;
    }
    c.finish()
}

#[test]
fn digest_check_accepts_the_right_bytes_in_any_chunking() {
    let m = good();
    for chunk in [1, 3, 7, 64, BINARY.len()] {
        check_chunks(&m, BINARY, chunk).unwrap();
    }
    let mut c = DigestCheck::new(&m);
    c.update(&[]).unwrap();
    c.update(BINARY).unwrap();
    c.update(&[]).unwrap();
    assert_eq!(c.received(), BINARY.len() as u64);
    c.finish().unwrap();
}

#[test]
fn digest_check_refuses_a_flipped_byte() {
    let m = good();
    let mut bytes = BINARY.to_vec();
    bytes[5] ^= 0x01;
    match check_chunks(&m, &bytes, 4) {
        Err(ArtifactError::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, m.sha256);
            assert_eq!(actual, sha256_hex(&bytes));
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
}

#[test]
fn digest_check_refuses_too_long_as_soon_as_it_is() {
    let m = good();
    let n = BINARY.len() as u64;
    let mut c = DigestCheck::new(&m);
    c.update(BINARY).unwrap();
    assert_eq!(
        c.update(b"x"),
        Err(ArtifactError::SizeMismatch {
            expected: n,
            actual: n + 1
        })
    );
    let mut long = BINARY.to_vec();
    long.extend_from_slice(b"tail");
    let err = check_chunks(&m, &long, 8).unwrap_err();
    assert_eq!(err.code(), "size_mismatch", "{err}");
}

#[test]
fn digest_check_refuses_too_short() {
    let m = good();
    let n = BINARY.len() as u64;
    assert_eq!(
        check_chunks(&m, &BINARY[..BINARY.len() - 1], 5),
        Err(ArtifactError::SizeMismatch {
            expected: n,
            actual: n - 1
        })
    );
    assert_eq!(
        check_chunks(&m, &[], 5),
        Err(ArtifactError::SizeMismatch {
            expected: n,
            actual: 0
        })
    );
}

#[test]
fn messages_tell_the_operator_what_to_do() {
    let e = ArtifactError::DigestMismatch {
        expected: "a".into(),
        actual: "b".into(),
    };
    assert!(e.to_string().contains("re-upload"), "{e}");
    let e = ArtifactError::UnknownRelease {
        release: 9,
        carried: "1, 2".into(),
    };
    assert!(e.to_string().contains("release 9"), "{e}");
}

/// A fresh minisign key pair: the signer, and the key as trusted.
fn keypair() -> (minisign::KeyPair, PublicKey) {
    let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let text = kp.pk.to_box().unwrap().into_string();
    let trusted = PublicKey::decode(&text).unwrap();
    (kp, trusted)
}

fn sign(kp: &minisign::KeyPair, bytes: &[u8]) -> String {
    minisign::sign(Some(&kp.pk), &kp.sk, bytes, None, None)
        .unwrap()
        .into_string()
}

#[test]
fn a_good_signature_verifies() {
    let (kp, key) = keypair();
    let doc = good().to_pretty_json();
    let sig = sign(&kp, doc.as_bytes());
    assert_eq!(
        verify_manifest(doc.as_bytes(), Some(&sig), std::slice::from_ref(&key)),
        Ok(good())
    );
    assert_eq!(signature_key_id(&sig).unwrap(), key.id());
    // Any trusted key may have signed it.
    let (_, other) = keypair();
    assert_eq!(
        verify_manifest(doc.as_bytes(), Some(&sig), &[other, key.clone()]),
        Ok(good())
    );
    // The key id is the one minisign prints in the .pub comment.
    let text = kp.pk.to_box().unwrap().into_string();
    assert!(text.contains(key.id()), "{text} / {}", key.id());
    assert_eq!(PublicKey::from_base64(key.to_base64()).unwrap(), key);
}

#[test]
fn unsigned_is_refused() {
    let (_, key) = keypair();
    let doc = good().to_pretty_json();
    for sig in [None, Some(""), Some(" \n")] {
        let err = verify_manifest(doc.as_bytes(), sig, std::slice::from_ref(&key)).unwrap_err();
        assert_eq!(err, ArtifactError::Unsigned);
        assert_eq!(err.code(), "unsigned");
        assert!(err.to_string().contains("handover artifact sign"), "{err}");
    }
}

#[test]
fn a_wrong_key_is_refused() {
    let (kp_b, key_b) = keypair();
    let (_, key_a) = keypair();
    let doc = good().to_pretty_json();
    let sig = sign(&kp_b, doc.as_bytes());
    let err =
        verify_manifest(doc.as_bytes(), Some(&sig), std::slice::from_ref(&key_a)).unwrap_err();
    assert_eq!(err.code(), "untrusted_key", "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(key_b.id()) && msg.contains(key_a.id()),
        "{msg}"
    );
    let err = verify_manifest(doc.as_bytes(), Some(&sig), &[]).unwrap_err();
    assert_eq!(err.code(), "untrusted_key", "{err}");
}

#[test]
fn a_tampered_manifest_is_refused() {
    let (kp, key) = keypair();
    let doc = good().to_pretty_json();
    let sig = sign(&kp, doc.as_bytes());
    let trusted = std::slice::from_ref(&key);
    // Still a valid manifest, but not the one signed.
    let mut edited = good();
    edited.created_ms += 1;
    let err = verify_manifest(edited.to_pretty_json().as_bytes(), Some(&sig), trusted).unwrap_err();
    assert_eq!(err.code(), "bad_signature", "{err}");
    assert!(err.to_string().contains("changed after signing"), "{err}");
    // Same JSON value, other bytes: the signature covers bytes.
    let compact = serde_json::to_string(&good()).unwrap();
    let err = verify_manifest(compact.as_bytes(), Some(&sig), trusted).unwrap_err();
    assert_eq!(err.code(), "bad_signature", "{err}");
    // A corrupted signature line.
    let mut lines: Vec<String> = sig.lines().map(str::to_owned).collect();
    let mut line2 = lines[1].clone().into_bytes();
    line2[40] = if line2[40] == b'A' { b'B' } else { b'A' };
    lines[1] = String::from_utf8(line2).unwrap();
    let err = verify_manifest(doc.as_bytes(), Some(&lines.join("\n")), trusted).unwrap_err();
    assert_eq!(err.code(), "bad_signature", "{err}");
    // An edited trusted comment breaks the global signature.
    let edited_comment = sig.replace("trusted comment: ", "trusted comment: x");
    let err = verify_manifest(doc.as_bytes(), Some(&edited_comment), trusted).unwrap_err();
    assert_eq!(err.code(), "bad_signature", "{err}");
}

#[test]
fn garbage_signatures_and_signed_garbage_are_refused() {
    let (kp, key) = keypair();
    let trusted = std::slice::from_ref(&key);
    let doc = good().to_pretty_json();
    for junk in [
        "hello",
        "untrusted comment: x\nnot base64\n",
        &"x".repeat(5000),
    ] {
        let err = verify_manifest(doc.as_bytes(), Some(junk), trusted).unwrap_err();
        assert_eq!(err.code(), "bad_signature", "{junk:?}: {err}");
    }
    // A signature does not make an invalid manifest valid.
    let mut bad = good();
    bad.schema = Schema(1);
    let doc = serde_json::to_string(&bad).unwrap();
    let sig = sign(&kp, doc.as_bytes());
    let err = verify_manifest(doc.as_bytes(), Some(&sig), trusted).unwrap_err();
    assert_eq!(err.code(), "release_mismatch", "{err}");
    let big = vec![b' '; MANIFEST_BYTES_MAX + 1];
    let err = verify_manifest(&big, Some(&sig), trusted).unwrap_err();
    assert_eq!(err.code(), "too_large", "{err}");
}

#[test]
fn public_keys_parse_from_pub_files_only() {
    let (kp, key) = keypair();
    let file = kp.pk.to_box().unwrap().into_string();
    assert_eq!(PublicKey::decode(&file).unwrap(), key);
    assert_eq!(PublicKey::decode(key.to_base64()).unwrap(), key);
    assert_eq!(
        PublicKey::decode(&format!("\n{}\n\n", key.to_base64())).unwrap(),
        key
    );
    for bad in [
        "",
        "untrusted comment: nothing else\n",
        "not base64!",
        "RWQ=",
        &format!("{}\n{}\n", key.to_base64(), key.to_base64()),
        &"A".repeat(PUBLIC_KEY_BYTES_MAX + 1),
    ] {
        let err = PublicKey::decode(bad).unwrap_err();
        assert_eq!(err.code(), "bad_public_key", "{bad:?}: {err}");
    }
    // A secret key file is not a public key.
    let secret = kp.sk.to_box(None).unwrap().into_string();
    assert!(PublicKey::decode(&secret).is_err());
}

#[test]
fn signatures_are_required_unless_opted_out_on_loopback() {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let (lo, lo2, lo6) = (
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(Ipv4Addr::new(127, 201, 0, 9)),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    );
    let public = [
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        "2001:db8::1".parse().unwrap(),
    ];
    let decide = SignaturePolicy::decide;
    for ip in [lo, lo2, lo6].iter().chain(&public) {
        assert_eq!(decide(1, false, *ip), Ok(SignaturePolicy::Required), "{ip}");
        assert_eq!(decide(2, false, *ip), Ok(SignaturePolicy::Required), "{ip}");
        assert_eq!(
            decide(0, false, *ip),
            Err(SignaturePolicyError::NoTrustedKey),
            "no key, no opt-in: refused on {ip}"
        );
        assert_eq!(
            decide(1, true, *ip),
            Err(SignaturePolicyError::UnsignedWithKeys),
            "{ip}"
        );
    }
    for ip in [lo, lo2, lo6, "::ffff:127.0.0.1".parse().unwrap()] {
        assert_eq!(
            decide(0, true, ip),
            Ok(SignaturePolicy::UnsignedAllowed),
            "{ip}"
        );
    }
    for ip in public {
        assert_eq!(
            decide(0, true, ip),
            Err(SignaturePolicyError::UnsignedNotLoopback { listen: ip })
        );
    }
    let msg = SignaturePolicyError::NoTrustedKey.to_string();
    assert!(msg.contains("--trusted-key FILE") && msg.contains("--allow-unsigned-artifacts"));
}
