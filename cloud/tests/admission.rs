//! Replicas sharing admission state (`keel_cloud::admission`): join
//! tokens, issued certificates and revocations made on one replica hold on
//! the others once they merge. The shared store here is an in-memory one
//! with the same contract as the cluster's Secrets (one atomic update per
//! shard); the Secret-backed store runs in `edge/tests/replicas.rs`
//! against a real API server.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use keel_cloud::Error;
use keel_cloud::admission::{ShardChange, SharedAdmission, SharedShard};
use keel_cloud::error::TokenError;
use keel_cloud::pki::{self, ClusterCa};
use keel_cloud::token::TokenStore;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

const SHARDS: u32 = 4;

/// Shards in memory, one atomic update at a time; `down` makes every call
/// fail as an unreachable API server does.
#[derive(Debug, Default)]
struct Memory {
    shards: Mutex<BTreeMap<u32, SharedShard>>,
    down: AtomicBool,
}

impl Memory {
    fn check(&self) -> keel_cloud::error::Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::Shared {
                what: "reading a shard".into(),
                message: "unreachable".into(),
            });
        }
        Ok(())
    }

    fn shard(node: &str) -> u32 {
        keel_cloud::attach::shards::shard_of(node, SHARDS)
    }
}

impl SharedAdmission for Memory {
    fn update(&self, node: &str, change: ShardChange<'_>) -> keel_cloud::error::Result<()> {
        self.check()?;
        let mut shards = self.shards.lock().unwrap();
        let mut s = shards.get(&Self::shard(node)).cloned().unwrap_or_default();
        if change(&mut s)? {
            shards.insert(Self::shard(node), s);
        }
        Ok(())
    }

    fn read(&self, node: &str) -> keel_cloud::error::Result<SharedShard> {
        self.check()?;
        Ok(self
            .shards
            .lock()
            .unwrap()
            .get(&Self::shard(node))
            .cloned()
            .unwrap_or_default())
    }

    fn read_all(&self) -> keel_cloud::error::Result<Vec<SharedShard>> {
        self.check()?;
        Ok(self.shards.lock().unwrap().values().cloned().collect())
    }
}

/// One replica: its data directory, CA (the cluster's) and token store.
struct Replica {
    dir: tempfile::TempDir,
    ca: ClusterCa,
    tokens: TokenStore,
}

impl Replica {
    /// Merges every shard, as the replica's merge task does; returns the
    /// nodes barred by it.
    fn merge(&self, shared: &Memory) -> Vec<String> {
        let mut barred = Vec::new();
        for s in shared.read_all().unwrap() {
            barred.extend(self.ca.revocations().merge(&s).unwrap());
        }
        barred
    }
}

/// `n` replicas of one cluster (the first one's CA) sharing `shared`.
fn replicas(n: usize, shared: &Arc<Memory>) -> Vec<Replica> {
    let first = tempfile::tempdir().unwrap();
    ClusterCa::load_or_create(first.path()).unwrap();
    let mut dirs = vec![first];
    for _ in 1..n {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("pki")).unwrap();
        for f in ["ca.pem", "ca.key"] {
            std::fs::copy(
                dirs[0].path().join("pki").join(f),
                d.path().join("pki").join(f),
            )
            .unwrap();
        }
        dirs.push(d);
    }
    dirs.into_iter()
        .map(|dir| {
            let ca = ClusterCa::load_or_create(dir.path()).unwrap();
            let tokens = TokenStore::open(dir.path(), &ca.ca_hash()).unwrap();
            ca.share(shared.clone());
            tokens.share(shared.clone());
            Replica { dir, ca, tokens }
        })
        .collect()
}

fn csr(node: &str) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    params.distinguished_name = dn;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// A certificate for `node` issued by `r`, DER.
fn issue(r: &Replica, node: &str) -> Vec<u8> {
    let issued =
        r.ca.sign_node_csr(&csr(node), node, pki::DEFAULT_NODE_CERT_VALIDITY)
            .unwrap();
    pki::certs_from_pem(&issued.cert_pem)
        .unwrap()
        .remove(0)
        .to_vec()
}

fn token_error(e: Error) -> TokenError {
    match e {
        Error::Token(t) => t,
        other => panic!("not a token error: {other}"),
    }
}

#[test]
fn a_token_made_on_one_replica_is_redeemed_once_on_any() {
    let shared = Arc::new(Memory::default());
    let r = replicas(3, &shared);
    let now = SystemTime::now();
    let t = r[0]
        .tokens
        .create("edge-a", Duration::from_secs(600), now)
        .unwrap();
    r[1].tokens.check(t.as_str(), "edge-a", now).unwrap();
    r[1].tokens.redeem(t.as_str(), "edge-a", now).unwrap();
    for other in [&r[2], &r[0], &r[1]] {
        let e = other.tokens.redeem(t.as_str(), "edge-a", now).unwrap_err();
        assert_eq!(token_error(e), TokenError::AlreadyUsed);
    }
    // A token `cloudcore token` wrote to a replica's file (no shared
    // store in that process) is unknown elsewhere until that replica
    // passes it on; then any replica redeems it, once.
    let offline = TokenStore::open(r[2].dir.path(), &r[2].ca.ca_hash()).unwrap();
    let t = offline
        .create("edge-b", Duration::from_secs(600), now)
        .unwrap();
    let e = r[0].tokens.redeem(t.as_str(), "edge-b", now).unwrap_err();
    assert_eq!(token_error(e), TokenError::Unknown);
    assert_eq!(r[2].tokens.publish_local().unwrap(), 1);
    assert_eq!(r[2].tokens.publish_local().unwrap(), 0);
    r[0].tokens.redeem(t.as_str(), "edge-b", now).unwrap();
    let e = r[2].tokens.redeem(t.as_str(), "edge-b", now).unwrap_err();
    assert_eq!(token_error(e), TokenError::AlreadyUsed);
    // Deleting a node's unused tokens on one replica deletes them for all.
    let t = r[0]
        .tokens
        .create("edge-c", Duration::from_secs(600), now)
        .unwrap();
    assert_eq!(r[1].tokens.delete_unused_for("edge-c").unwrap(), 1);
    let e = r[2].tokens.redeem(t.as_str(), "edge-c", now).unwrap_err();
    assert_eq!(token_error(e), TokenError::Unknown);
    // And by id.
    let t = r[0]
        .tokens
        .create("edge-d", Duration::from_secs(600), now)
        .unwrap();
    assert!(r[2].tokens.delete(t.id()).unwrap());
    let e = r[1].tokens.redeem(t.as_str(), "edge-d", now).unwrap_err();
    assert_eq!(token_error(e), TokenError::Unknown);
}

#[test]
fn a_node_revoked_on_one_replica_is_refused_by_all_and_may_join_again() {
    let shared = Arc::new(Memory::default());
    let r = replicas(3, &shared);
    // Certificates of the node from two replicas, and one of another node.
    let a = issue(&r[0], "edge-x");
    let b = issue(&r[1], "edge-x");
    let other = issue(&r[2], "edge-y");
    for x in &r {
        x.merge(&shared);
        for der in [&a, &b, &other] {
            assert!(!x.ca.is_cert_revoked(der));
        }
    }
    // Revoked through the third replica, which issued neither.
    let serials = r[2].ca.revoke_node("edge-x").unwrap();
    assert_eq!(serials.len(), 2, "{serials:?}");
    assert!(r[2].ca.is_cert_revoked(&a) && r[2].ca.is_cert_revoked(&b));
    // The others refuse both once they merge, and are told to close its
    // connection; the other node is untouched.
    for x in &r[..2] {
        assert_eq!(x.merge(&shared), vec!["edge-x".to_owned()]);
        assert!(x.ca.is_cert_revoked(&a) && x.ca.is_cert_revoked(&b));
        assert!(x.ca.is_node_shut_out("edge-x"));
        assert!(!x.ca.is_cert_revoked(&other));
        // Merging again changes nothing.
        assert!(x.merge(&shared).is_empty());
    }
    // A new join after the revocation (on any replica) is accepted
    // everywhere once merged.
    let again = issue(&r[1], "edge-x");
    for x in &r {
        x.merge(&shared);
        assert!(!x.ca.is_cert_revoked(&again), "refused after a new join");
        assert!(x.ca.is_cert_revoked(&a));
        assert!(!x.ca.is_node_shut_out("edge-x"));
    }
    // A restart keeps it all (the local files hold the merge).
    let ca = ClusterCa::load_or_create(r[0].dir.path()).unwrap();
    assert!(ca.is_cert_revoked(&a) && ca.is_cert_revoked(&b));
    assert!(!ca.is_cert_revoked(&again));
}

#[test]
fn a_renewal_on_one_replica_retires_the_old_certificate_on_all() {
    let shared = Arc::new(Memory::default());
    let r = replicas(2, &shared);
    let old = issue(&r[0], "edge-z");
    r[1].merge(&shared);
    assert!(!r[1].ca.is_cert_revoked(&old));
    let new = r[0]
        .ca
        .sign_node_renewal(&csr("edge-z"), "edge-z", pki::DEFAULT_NODE_CERT_VALIDITY)
        .unwrap();
    r[0].ca.revoke_replaced(&old).unwrap();
    r[1].merge(&shared);
    assert!(r[1].ca.is_cert_revoked(&old));
    let new = pki::certs_from_pem(&new.cert_pem).unwrap().remove(0);
    assert!(!r[1].ca.is_cert_revoked(&new));
    // The renewal's time is known on the other replica (its rate limit).
    assert!(r[1].ca.last_renewal("edge-z").is_some());
}

#[test]
fn without_the_shared_store_nothing_is_admitted() {
    let shared = Arc::new(Memory::default());
    let r = replicas(2, &shared);
    let now = SystemTime::now();
    let t = r[0]
        .tokens
        .create("edge-q", Duration::from_secs(600), now)
        .unwrap();
    shared.down.store(true, Ordering::SeqCst);
    assert!(matches!(
        r[1].tokens.redeem(t.as_str(), "edge-q", now),
        Err(Error::Shared { .. })
    ));
    assert!(matches!(
        r[1].ca
            .sign_node_csr(&csr("edge-q"), "edge-q", pki::DEFAULT_NODE_CERT_VALIDITY),
        Err(Error::Shared { .. })
    ));
    assert!(matches!(
        r[0].ca.revoke_node("edge-q"),
        Err(Error::Shared { .. })
    ));
    shared.down.store(false, Ordering::SeqCst);
    r[1].tokens.redeem(t.as_str(), "edge-q", now).unwrap();
}
