//! The replicas' shared admission state (see [`crate::admission`]) on the
//! cluster: one Secret per shard, `keel-admission-<shard>` in the
//! replicas' namespace, labelled `keel.io/admission`, its `state.json` the
//! shard's [`SharedShard`]. Written by compare-and-swap on the Secret's
//! `resourceVersion`; watched by every replica and merged into its local
//! files as they change, closing the connections of nodes another replica
//! barred.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ListParams, ObjectMeta, PostParams};
use tracing::{debug, info, warn};

use super::shards::{ReplicaConfig, shard_of};
use crate::admission::{ShardChange, SharedAdmission, SharedShard};
use crate::error::{Error, Result};
use crate::hub::HubHandle;
use crate::pki::ClusterCa;
use crate::token::TokenStore;

/// The label on every shard's Secret.
pub const LABEL: &str = "keel.io/admission";
const KEY: &str = "state.json";
/// How often a replica passes on the tokens `cloudcore token` wrote.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(2);
/// Longest a request to the API server may take here.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Writes tried before giving up on a contended shard.
const ATTEMPTS: usize = 16;
/// Largest state a shard's Secret may hold (the API server takes 1 MiB).
const MAX_STATE: usize = 900 * 1024;

/// [`SharedAdmission`] on Secrets of the cluster.
#[derive(Debug)]
pub struct SecretAdmission {
    api: Api<Secret>,
    shards: u32,
    runtime: tokio::runtime::Handle,
}

fn shared(what: impl Into<String>, message: impl ToString) -> Error {
    Error::Shared {
        what: what.into(),
        message: message.to_string(),
    }
}

fn name_of(shard: u32) -> String {
    format!("keel-admission-{shard}")
}

fn decode(secret: &Secret) -> Result<SharedShard> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    match secret.data.as_ref().and_then(|d| d.get(KEY)) {
        Some(bytes) => serde_json::from_slice(&bytes.0)
            .map_err(|e| shared(format!("reading the Secret {name}"), e)),
        None => Ok(SharedShard::default()),
    }
}

impl SecretAdmission {
    /// The store in `replica.namespace`, reached with `client`. Must run
    /// inside a tokio runtime (its calls are run there).
    #[must_use]
    pub fn new(client: kube::Client, replica: &ReplicaConfig) -> Self {
        SecretAdmission {
            api: Api::namespaced(client, &replica.namespace),
            shards: replica.shards.max(1),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Runs `f` on the runtime and waits for it on this (blocking) thread,
    /// within [`REQUEST_TIMEOUT`]. Never called on an async worker.
    fn wait<T: Send + 'static>(
        &self,
        what: &str,
        f: impl Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let task = self.runtime.spawn(async move {
            let _ = tx.send(f.await);
        });
        match rx.recv_timeout(REQUEST_TIMEOUT) {
            Ok(v) => Ok(v),
            Err(_) => {
                task.abort();
                Err(shared(what, "the API server did not answer in time"))
            }
        }
    }

    fn get(&self, shard: u32) -> Result<Option<Secret>> {
        let (api, name) = (self.api.clone(), name_of(shard));
        let what = format!("reading the Secret {name}");
        self.wait(&what, async move { api.get_opt(&name).await })?
            .map_err(|e| shared(what, e))
    }

    /// Every shard's Secret, by shard.
    async fn list(api: &Api<Secret>) -> Result<BTreeMap<String, Secret>> {
        let list = api
            .list(&ListParams::default().labels(LABEL))
            .await
            .map_err(|e| shared("listing the admission Secrets", e))?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|s| Some((s.metadata.name.clone()?, s)))
            .collect())
    }
}

impl SharedAdmission for SecretAdmission {
    fn update(&self, node: &str, change: ShardChange<'_>) -> Result<()> {
        let shard = shard_of(node, self.shards);
        let name = name_of(shard);
        for _ in 0..ATTEMPTS {
            let found = self.get(shard)?;
            let mut state = match &found {
                Some(s) => decode(s)?,
                None => SharedShard::default(),
            };
            if !change(&mut state)? {
                return Ok(());
            }
            let bytes = serde_json::to_vec(&state)
                .map_err(|e| shared(format!("writing the Secret {name}"), e))?;
            if bytes.len() > MAX_STATE {
                return Err(shared(
                    format!("writing the Secret {name}"),
                    format!(
                        "the shard's state would take {} bytes, past the {MAX_STATE} a Secret holds",
                        bytes.len()
                    ),
                ));
            }
            let mut data = BTreeMap::new();
            data.insert(KEY.to_owned(), ByteString(bytes));
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(BTreeMap::from([(LABEL.to_owned(), "true".to_owned())])),
                    resource_version: found
                        .as_ref()
                        .and_then(|s| s.metadata.resource_version.clone()),
                    ..ObjectMeta::default()
                },
                data: Some(data),
                ..Secret::default()
            };
            let (api, n, create) = (self.api.clone(), name.clone(), found.is_none());
            let what = format!("writing the Secret {name}");
            let written = self.wait(&what, async move {
                if create {
                    api.create(&PostParams::default(), &secret).await
                } else {
                    api.replace(&n, &PostParams::default(), &secret).await
                }
            })?;
            match written {
                Ok(_) => return Ok(()),
                // Another replica wrote first: read again.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    debug!(secret = %name, "admission state changed meanwhile; again");
                }
                Err(e) => return Err(shared(what, e)),
            }
        }
        Err(shared(
            format!("writing the Secret {name}"),
            format!("{ATTEMPTS} other writes came first"),
        ))
    }

    fn read(&self, node: &str) -> Result<SharedShard> {
        match self.get(shard_of(node, self.shards))? {
            Some(s) => decode(&s),
            None => Ok(SharedShard::default()),
        }
    }

    fn read_all(&self) -> Result<Vec<SharedShard>> {
        let api = self.api.clone();
        let all = self.wait("listing the admission Secrets", async move {
            Self::list(&api).await
        })??;
        all.values().map(decode).collect()
    }
}

/// Merges one shard's Secret into the local files if it changed since
/// it was last merged; returns the nodes barred by it.
fn merge_one(
    ca: &ClusterCa,
    secret: &Secret,
    seen: &mut BTreeMap<String, String>,
) -> Result<Vec<String>> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let version = secret.metadata.resource_version.clone().unwrap_or_default();
    if seen.get(&name) == Some(&version) {
        return Ok(Vec::new());
    }
    let barred = ca.revocations().merge(&decode(secret)?)?;
    seen.insert(name, version);
    Ok(barred)
}

/// The first merge, before this replica admits anyone: every shard, and
/// the tokens `cloudcore token` left in the local file.
///
/// # Errors
/// The Secrets cannot be read, or the merge cannot be persisted.
pub async fn merge_now(
    store: &SecretAdmission,
    ca: &Arc<ClusterCa>,
    tokens: &Arc<TokenStore>,
) -> Result<BTreeMap<String, String>> {
    let all = SecretAdmission::list(&store.api).await?;
    let (ca, tokens) = (Arc::clone(ca), Arc::clone(tokens));
    tokio::task::spawn_blocking(move || {
        let mut seen = BTreeMap::new();
        for secret in all.values() {
            merge_one(&ca, secret, &mut seen)?;
        }
        tokens.publish_local()?;
        Ok(seen)
    })
    .await
    .map_err(|e| shared("merging the admission state", e))?
}

/// Merges what the other replicas change as the API server reports it (a
/// watch on the shards' Secrets), closing the connection of each node one
/// of them barred; every [`PUBLISH_INTERVAL`], passes on the tokens
/// `cloudcore token` wrote to the local file.
pub async fn run(
    store: Arc<SecretAdmission>,
    ca: Arc<ClusterCa>,
    tokens: Arc<TokenStore>,
    hub: HubHandle,
    seen: BTreeMap<String, String>,
) {
    use futures::StreamExt as _;
    use kube::runtime::WatchStreamExt as _;
    use kube::runtime::watcher;
    let seen = Arc::new(std::sync::Mutex::new(seen));
    let cfg = watcher::Config::default().labels(LABEL);
    let mut events = watcher(store.api.clone(), cfg).default_backoff().boxed();
    let mut tick = tokio::time::interval(PUBLISH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let secret = tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s))) => s,
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    warn!(error = %e, "watch of the replicas' admission state failed; retrying");
                    continue;
                }
                None => return,
            },
            _ = tick.tick() => {
                let t = Arc::clone(&tokens);
                match tokio::task::spawn_blocking(move || t.publish_local()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => warn!(error = %e, "cannot pass join tokens on to the replicas"),
                    Err(e) => warn!(error = %e, "token task failed"),
                }
                continue;
            }
        };
        let (c, s) = (Arc::clone(&ca), Arc::clone(&seen));
        let merged = tokio::task::spawn_blocking(move || {
            let mut seen = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            merge_one(&c, &secret, &mut seen)
        })
        .await;
        match merged {
            Ok(Ok(nodes)) => {
                for node in nodes {
                    info!(%node, "closing the connection of a node revoked on another replica");
                    hub.disconnect(&node, crate::grpc::REVOKED_REASON);
                }
            }
            Ok(Err(e)) => warn!(error = %e, "cannot merge the replicas' admission state"),
            Err(e) => warn!(error = %e, "admission merge task failed"),
        }
    }
}
