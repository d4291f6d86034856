//! Admission state shared by the replicas of one cluster: join tokens,
//! the ledger of issued node certificates, revoked certificates and
//! barred nodes, so that any replica can admit any node and a revocation
//! made on one replica holds on all of them.
//!
//! One cloudcore keeps these in its data directory (`tokens.json`,
//! `issued.log`, `revoked`; see [`crate::token`] and [`crate::pki`]).
//! Replicas keep the same state per shard of nodes ([`SharedShard`]) in a
//! store they all reach ([`SharedAdmission`]; on a Kubernetes cluster, a
//! Secret per shard, `crate::attach::admission`), and change it by
//! compare-and-swap: read a shard, change it, write it back naming the
//! version read, and start again when another replica wrote in between.
//! A node's tokens, certificates and bar live in the one shard its name
//! falls in, so every decision about a node (redeem a token once, number a
//! certificate above the node's bar, bar the node and drop its unused
//! tokens) is one atomic write.
//!
//! Each replica still keeps its local files: what it issues or revokes is
//! written to the shared shard first and then to them, and what other
//! replicas did is merged into them ([`crate::pki::Revocations::merge`]).
//! The TLS verifier reads only the local copy, so a handshake never waits
//! for the cluster; a revocation made elsewhere holds here once merged.
//! Certificate numbers come from the shard's counter, which starts above
//! the writer's local ledger, so that a bar compares numbers of one
//! sequence.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::pki::IssuedRecord;
use crate::token::TokenRecord;

/// The admission state of one shard of nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SharedShard {
    /// Number of the last certificate issued in this shard.
    #[serde(default)]
    pub last: u64,
    /// Serial → the unexpired node certificate issued under it.
    #[serde(default)]
    pub issued: BTreeMap<String, IssuedRecord>,
    /// Revoked serials → when the certificate expires (Unix seconds); gone
    /// from here once it has.
    #[serde(default)]
    pub revoked: BTreeMap<String, u64>,
    /// Barred node → the number of the last certificate issued before its
    /// bar: its certificates up to it, and any this shard does not know,
    /// are refused.
    #[serde(default)]
    pub barred: BTreeMap<String, u64>,
    /// Token id → the join token (only its secret's hash).
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenRecord>,
}

impl SharedShard {
    /// Drops what has expired: certificates and revocations past their
    /// expiry, tokens a day past theirs (as `tokens.json` does).
    pub fn prune(&mut self, now_secs: u64) {
        self.issued.retain(|_, r| r.not_after > now_secs);
        self.revoked.retain(|_, not_after| *not_after > now_secs);
        self.tokens.retain(|_, t| t.retained_at(now_secs));
    }
}

/// A change to one shard: returns whether it changed anything (nothing is
/// written otherwise). Called again on the shard as read anew when
/// another replica wrote it in between.
pub type ShardChange<'a> = &'a mut dyn FnMut(&mut SharedShard) -> Result<bool>;

/// The store replicas share admission state through. Its methods block:
/// they are called from blocking threads (the bootstrap endpoint's
/// workers, admin requests), never from an async task.
pub trait SharedAdmission: Send + Sync + fmt::Debug {
    /// Reads the shard that holds `node`, applies `change`, and writes the
    /// result back if it changed, retrying from a fresh read when another
    /// writer came first.
    ///
    /// # Errors
    /// [`crate::Error::Shared`] when the store cannot be reached, or what
    /// `change` returns.
    fn update(&self, node: &str, change: ShardChange<'_>) -> Result<()>;

    /// The shard that holds `node`, read fresh.
    ///
    /// # Errors
    /// [`crate::Error::Shared`] when the store cannot be reached.
    fn read(&self, node: &str) -> Result<SharedShard>;

    /// Every shard, read fresh (for an operation that names no node).
    ///
    /// # Errors
    /// [`crate::Error::Shared`] when the store cannot be reached.
    fn read_all(&self) -> Result<Vec<SharedShard>>;
}
