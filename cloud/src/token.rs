//! Single-use, node-bound, expiring join tokens.
//!
//! A token string is `keel1.<node>.<id>.<secret>.<ca-sha256-hex>`:
//! `<id>` is 16 hex digits, `<secret>` 32 hex digits (128 random bits),
//! `<ca-sha256-hex>` the 64 hex digits of the cluster CA's SHA-256, which the
//! edge checks against the CA the server presents before trusting it.
//! Node names may contain dots, so the string is split from the right.
//!
//! Only SHA-256 of the secret is stored, in `data_dir/tokens.json` (mode
//! 0600, written atomically). A token is redeemed at most once: it is marked
//! used and the file persisted before [`TokenStore::redeem`] returns.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::admission::SharedAdmission;
use crate::error::{Error, Result, TokenError};
use crate::pki::{hex, random_bytes, validate_node_name, write_atomic};

/// Prefix (and version) of every join token.
pub const TOKEN_PREFIX: &str = "keel1.";
const ID_HEX_LEN: usize = 16;
const SECRET_HEX_LEN: usize = 32;
const CA_HASH_HEX_LEN: usize = 64;
/// Longest accepted token string.
pub const MAX_TOKEN_LEN: usize = 256;
/// How long expired or used tokens are kept (for operators) before pruning.
const RETAIN_AFTER_EXPIRY: Duration = Duration::from_secs(24 * 3600);
const TOKENS_FILE: &str = "tokens.json";

/// A freshly created join token. `Debug` does not show the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    token: String,
    id: String,
    node: String,
    expires_at: SystemTime,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("node", &self.node)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl JoinToken {
    /// The token string to hand to the edge node (contains the secret).
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.token
    }

    /// The token's public id.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node the token is bound to.
    #[must_use]
    pub fn node(&self) -> &str {
        &self.node
    }

    /// When the token stops being accepted.
    #[must_use]
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }
}

/// The fields of a syntactically valid token string.
#[derive(Clone, PartialEq, Eq)]
pub struct ParsedToken<'a> {
    /// The node the token names.
    pub node: &'a str,
    /// The token id (16 hex digits).
    pub id: &'a str,
    /// The secret (32 hex digits).
    pub secret: &'a str,
    /// The CA pin, `"sha256:<hex>"`.
    pub ca_hash: String,
}

impl fmt::Debug for ParsedToken<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedToken")
            .field("node", &self.node)
            .field("id", &self.id)
            .field("ca_hash", &self.ca_hash)
            .finish_non_exhaustive()
    }
}

/// Parses a token string without consulting any store.
///
/// # Errors
/// [`TokenError::Malformed`] with the reason.
pub fn parse_token(token: &str) -> std::result::Result<ParsedToken<'_>, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed("too long"));
    }
    let rest = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(TokenError::Malformed("does not start with \"keel1.\""))?;
    let mut fields = rest.rsplitn(4, '.');
    let (Some(ca), Some(secret), Some(id), Some(node)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(TokenError::Malformed(
            "expected keel1.<node>.<id>.<secret>.<ca-hash>",
        ));
    };
    if !is_lower_hex(id, ID_HEX_LEN) {
        return Err(TokenError::Malformed("id is not 16 lowercase hex digits"));
    }
    if !is_lower_hex(secret, SECRET_HEX_LEN) {
        return Err(TokenError::Malformed(
            "secret is not 32 lowercase hex digits",
        ));
    }
    if !is_lower_hex(ca, CA_HASH_HEX_LEN) {
        return Err(TokenError::Malformed(
            "CA hash is not 64 lowercase hex digits",
        ));
    }
    if validate_node_name(node).is_err() {
        return Err(TokenError::Malformed("node name is not valid"));
    }
    Ok(ParsedToken {
        node,
        id,
        secret,
        ca_hash: format!("sha256:{ca}"),
    })
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A join token as stored: the node it is bound to and its secret's hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub(crate) node: String,
    /// Hex SHA-256 of the secret.
    pub(crate) secret_sha256: String,
    /// Unix seconds.
    pub(crate) created_at: u64,
    /// Unix seconds.
    pub(crate) expires_at: u64,
    /// Unix seconds of redemption, if redeemed.
    pub(crate) used_at: Option<u64>,
}

impl TokenRecord {
    /// Whether it is still kept at `now` (Unix seconds): until a day past
    /// its expiry, for operators.
    pub(crate) fn retained_at(&self, now: u64) -> bool {
        self.expires_at
            .saturating_add(RETAIN_AFTER_EXPIRY.as_secs())
            > now
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    version: u32,
    tokens: BTreeMap<String, TokenRecord>,
}

/// The persisted set of join tokens of one cluster.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    ca_hash: String,
    state: Mutex<TokenFile>,
    /// Set when this cloudcore is one of several replicas: tokens live
    /// there, and `tokens.json` only passes on those `cloudcore token`
    /// writes to it (see [`TokenStore::publish_local`]).
    shared: OnceLock<Arc<dyn SharedAdmission>>,
}

impl TokenStore {
    /// Opens (or starts) the store at `data_dir/tokens.json`. `ca_hash` is the
    /// cluster CA pin ([`crate::pki::ClusterCa::ca_hash`]) embedded in every
    /// token created.
    ///
    /// # Errors
    /// I/O errors, an unparseable file, or a `ca_hash` that is not
    /// `"sha256:"` followed by 64 lowercase hex digits.
    pub fn open(data_dir: &Path, ca_hash: &str) -> Result<Self> {
        let valid_hash = ca_hash
            .strip_prefix("sha256:")
            .is_some_and(|h| is_lower_hex(h, CA_HASH_HEX_LEN));
        if !valid_hash {
            return Err(Error::InvalidCertificate(format!(
                "CA hash {ca_hash:?} is not sha256:<64 hex digits>"
            )));
        }
        std::fs::create_dir_all(data_dir).map_err(|e| Error::io(data_dir, e))?;
        let path = data_dir.join(TOKENS_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<TokenFile>(&bytes).map_err(|e| Error::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => TokenFile {
                version: 1,
                tokens: BTreeMap::new(),
            },
            Err(e) => return Err(Error::io(&path, e)),
        };
        Ok(Self {
            path,
            ca_hash: ca_hash.to_owned(),
            state: Mutex::new(state),
            shared: OnceLock::new(),
        })
    }

    /// Creates a token for `node`, valid from `now` for `ttl`, and persists it.
    /// Tokens that expired more than a day before `now` are pruned.
    ///
    /// # Errors
    /// [`Error::InvalidNodeName`], an out-of-range `ttl`, or an I/O error.
    pub fn create(&self, node: &str, ttl: Duration, now: SystemTime) -> Result<JoinToken> {
        validate_node_name(node)?;
        let now_s = unix_secs(now);
        let expires_s = now_s
            .checked_add(ttl.as_secs())
            .ok_or_else(|| Error::InvalidValidity(format!("ttl {ttl:?} is too long")))?;
        let id = hex(&random_bytes::<8>()?);
        let secret = hex(&random_bytes::<16>()?);
        let ca_hex = self.ca_hash.trim_start_matches("sha256:");
        let token = format!("{TOKEN_PREFIX}{node}.{id}.{secret}.{ca_hex}");
        let record = TokenRecord {
            node: node.to_owned(),
            secret_sha256: sha256_hex(secret.as_bytes()),
            created_at: now_s,
            expires_at: expires_s,
            used_at: None,
        };
        if let Some(shared) = self.shared.get() {
            shared.update(node, &mut |s| {
                s.prune(now_s);
                s.tokens.insert(id.clone(), record.clone());
                Ok(true)
            })?;
        } else {
            let (mut state, _file) = self.lock_synced()?;
            state.tokens.retain(|_, r| r.retained_at(now_s));
            state.tokens.insert(id.clone(), record);
            self.persist(&state)?;
        }
        tracing::info!(node, token_id = %id, ttl_secs = ttl.as_secs(), "created join token");
        Ok(JoinToken {
            token,
            id,
            node: node.to_owned(),
            expires_at: UNIX_EPOCH + Duration::from_secs(expires_s),
        })
    }

    /// Checks that `token` would be accepted for `node` at `now`, without
    /// using it up.
    ///
    /// # Errors
    /// [`Error::Token`] with the reason.
    pub fn check(&self, token: &str, node: &str, now: SystemTime) -> Result<()> {
        if let Some(shared) = self.shared.get() {
            self.publish_local()?;
            let s = shared.read(node)?;
            self.validate(&s.tokens, token, node, now)?;
            return Ok(());
        }
        let (state, _file) = self.lock_synced()?;
        self.validate(&state.tokens, token, node, now)?;
        Ok(())
    }

    /// Redeems `token` for `node` at `now`: checks it and marks it used,
    /// durably, before returning `Ok`.
    ///
    /// Checks, in order: syntax ([`TokenError::Malformed`]), issued by this
    /// cluster with this secret ([`TokenError::Unknown`]), bound to `node`
    /// ([`TokenError::WrongNode`]), not used ([`TokenError::AlreadyUsed`]),
    /// not expired ([`TokenError::Expired`]).
    ///
    /// # Errors
    /// [`Error::Token`] with the reason, or an I/O error persisting the use
    /// (the token then stays used in memory: it fails closed).
    pub fn redeem(&self, token: &str, node: &str, now: SystemTime) -> Result<()> {
        if let Some(shared) = self.shared.get() {
            self.publish_local()?;
            let mut used = String::new();
            shared.update(node, &mut |s| {
                used = self.validate(&s.tokens, token, node, now)?;
                if let Some(record) = s.tokens.get_mut(&used) {
                    record.used_at = Some(unix_secs(now));
                }
                Ok(true)
            })?;
            tracing::info!(node, token_id = %used, "redeemed join token");
            return Ok(());
        }
        let (mut state, _file) = self.lock_synced()?;
        let id = self.validate(&state.tokens, token, node, now)?;
        if let Some(record) = state.tokens.get_mut(&id) {
            record.used_at = Some(unix_secs(now));
        }
        self.persist(&state)?;
        tracing::info!(node, token_id = %id, "redeemed join token");
        Ok(())
    }

    /// Deletes a token by id; returns whether it existed.
    ///
    /// # Errors
    /// An I/O error persisting the change.
    pub fn delete(&self, id: &str) -> Result<bool> {
        let (mut state, _file) = self.lock_synced()?;
        let mut existed = state.tokens.remove(id).is_some();
        if existed {
            self.persist(&state)?;
        }
        drop(state);
        if let Some(shared) = self.shared.get() {
            let holder = shared
                .read_all()?
                .into_iter()
                .find_map(|s| s.tokens.get(id).map(|t| t.node.clone()));
            if let Some(node) = holder {
                shared.update(&node, &mut |s| Ok(s.tokens.remove(id).is_some()))?;
                existed = true;
            }
        }
        Ok(existed)
    }

    /// Deletes every unused token bound to `node` (revoking a node must
    /// not leave it a way back in); returns how many there were.
    ///
    /// # Errors
    /// An I/O error persisting the change.
    pub fn delete_unused_for(&self, node: &str) -> Result<usize> {
        let (mut state, _file) = self.lock_synced()?;
        let before = state.tokens.len();
        state
            .tokens
            .retain(|_, r| r.node != node || r.used_at.is_some());
        let mut deleted = before - state.tokens.len();
        if deleted > 0 {
            self.persist(&state)?;
        }
        drop(state);
        if let Some(shared) = self.shared.get() {
            let mut there = 0;
            shared.update(node, &mut |s| {
                let before = s.tokens.len();
                s.tokens
                    .retain(|_, r| r.node != node || r.used_at.is_some());
                there = before - s.tokens.len();
                Ok(there > 0)
            })?;
            deleted += there;
        }
        if deleted > 0 {
            tracing::info!(node, deleted, "deleted the node's unused join tokens");
        }
        Ok(deleted)
    }

    /// Makes this the token store of one of several replicas: tokens are
    /// created, redeemed and deleted in `shared` from now on. Set once.
    pub fn share(&self, shared: Arc<dyn SharedAdmission>) {
        let _ = self.shared.set(shared);
    }

    /// One of several replicas: moves the unused tokens `cloudcore token`
    /// wrote to this replica's `tokens.json` into the shared state, where
    /// every replica finds them, and returns how many it moved. Does
    /// nothing for a single cloudcore.
    ///
    /// # Errors
    /// The shared state or the file cannot be read or written; what was
    /// not moved stays in the file for the next call.
    pub fn publish_local(&self) -> Result<usize> {
        let Some(shared) = self.shared.get() else {
            return Ok(0);
        };
        let (mut state, _file) = self.lock_synced()?;
        let now = unix_secs(SystemTime::now());
        let waiting: Vec<(String, TokenRecord)> = state
            .tokens
            .iter()
            .filter(|(_, r)| r.used_at.is_none() && r.expires_at > now)
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect();
        let mut moved = 0;
        let mut outcome = Ok(());
        for (id, record) in waiting {
            let put = shared.update(&record.node, &mut |s| {
                if s.tokens.contains_key(&id) {
                    return Ok(false);
                }
                s.prune(now);
                s.tokens.insert(id.clone(), record.clone());
                Ok(true)
            });
            if let Err(e) = put {
                outcome = Err(e);
                break;
            }
            state.tokens.remove(&id);
            moved += 1;
        }
        if moved > 0 {
            self.persist(&state)?;
            tracing::info!(moved, "join tokens passed on to the replicas");
        }
        outcome.map(|()| moved)
    }

    fn validate(
        &self,
        tokens: &BTreeMap<String, TokenRecord>,
        token: &str,
        node: &str,
        now: SystemTime,
    ) -> std::result::Result<String, TokenError> {
        let parsed = parse_token(token)?;
        if parsed.ca_hash != self.ca_hash {
            return Err(TokenError::Unknown);
        }
        let record = tokens.get(parsed.id).ok_or(TokenError::Unknown)?;
        let presented = sha256_hex(parsed.secret.as_bytes());
        if !constant_time_eq(presented.as_bytes(), record.secret_sha256.as_bytes())
            || parsed.node != record.node
        {
            return Err(TokenError::Unknown);
        }
        if record.node != node {
            return Err(TokenError::WrongNode {
                bound: record.node.clone(),
                requested: node.chars().take(80).collect(),
            });
        }
        if record.used_at.is_some() {
            return Err(TokenError::AlreadyUsed);
        }
        if unix_secs(now) >= record.expires_at {
            return Err(TokenError::Expired);
        }
        Ok(parsed.id.to_owned())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TokenFile> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state, locked in this process and (with an advisory file lock,
    /// held until the returned file is dropped) against other processes
    /// sharing the data directory — `cloudcore token` issues tokens while
    /// cloudcore runs — and refreshed from disk. A use recorded only in
    /// memory (its persisting failed) is kept: tokens fail closed.
    fn lock_synced(&self) -> Result<(std::sync::MutexGuard<'_, TokenFile>, std::fs::File)> {
        let mut state = self.lock();
        let lock_path = self.path.with_extension("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        file.lock().map_err(|e| Error::io(&lock_path, e))?;
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let mut disk =
                    serde_json::from_slice::<TokenFile>(&bytes).map_err(|e| Error::Corrupt {
                        path: self.path.clone(),
                        reason: e.to_string(),
                    })?;
                for (id, rec) in &state.tokens {
                    if let (Some(used), Some(d)) = (rec.used_at, disk.tokens.get_mut(id)) {
                        d.used_at.get_or_insert(used);
                    }
                }
                *state = disk;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&self.path, e)),
        }
        Ok((state, file))
    }

    fn persist(&self, state: &TokenFile) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| Error::Corrupt {
            path: self.path.clone(),
            reason: format!("cannot serialise tokens: {e}"),
        })?;
        write_atomic(&self.path, &bytes, 0o600)
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
