//! The control-plane seam: what the rest of cloudcore (CloudHub, binding,
//! the folding of what nodes report) needs from whoever owns desired
//! state. Two implementations:
//!
//! - [`Embedded`]: cloudcore is the control plane; its [`Registry`] is the
//!   source of truth and its own Kubernetes API serves kubectl.
//! - [`crate::attach::Attached`]: a real Kubernetes cluster owns desired
//!   state; the registry is cloudcore's durable mirror of what is bound to
//!   its edge nodes, and what nodes report is written back to the cluster.
//!
//! Both keep the registry as the one place that binds objects to `N/down`
//! and folds `N/up`, so the log's guarantees are the same in both modes.

use std::sync::Arc;

use keel_log::{Cursor, Record};
use keel_sync::link::Refusal;
use keel_sync::quic::Sink;
use tracing::{info, warn};

use crate::api::registry::Registry;

/// What cloudcore's hub tells the control plane about its edge nodes.
pub trait ControlPlane: Send + Sync + 'static {
    /// Node `node` completed its handshake.
    fn node_connected(&self, node: &str);
    /// Node `node` has no live connection any more.
    fn node_disconnected(&self, node: &str);
    /// Records of node `node`'s `up` stream are durable in cloudcore's
    /// replica (fold them; write back what needs writing).
    fn node_reported(&self, node: &str, records: &[Record]);
    /// Node `node` holds `stream` (one cloudcore sends) durably up to `seq`.
    fn node_acked(&self, _node: &str, _stream: &str, _seq: u64) {}
    /// The registry both modes fold into (for checking what nodes send).
    fn registry(&self) -> &Registry;
}

/// cloudcore as the control plane (the default mode).
#[derive(Debug)]
pub struct Embedded(pub Arc<Registry>);

impl ControlPlane for Embedded {
    fn node_connected(&self, node: &str) {
        self.0.node_ready(node, true);
        crate::api::scheduler::place_pending(&self.0);
    }
    fn node_disconnected(&self, node: &str) {
        self.0.node_ready(node, false);
    }
    fn node_reported(&self, node: &str, records: &[Record]) {
        self.0.apply_from_node(node, records);
    }
    fn registry(&self) -> &Registry {
        &self.0
    }
}

/// The hub's events handed to a [`ControlPlane`].
pub struct PlaneSink(pub Arc<dyn ControlPlane>);

impl std::fmt::Debug for PlaneSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlaneSink").finish_non_exhaustive()
    }
}

impl Sink for PlaneSink {
    fn persisted(&self, node: &str, stream: &str, records: &[Record]) {
        if stream.ends_with("/up") {
            self.0.node_reported(node, records);
        }
    }
    fn snapshot_installed(&self, node: &str, stream: &str) {
        info!(%node, %stream, "a node's stream was replaced by a snapshot");
    }
    fn connected(&self, node: &str) {
        self.0.node_connected(node);
    }
    fn disconnected(&self, node: &str) {
        self.0.node_disconnected(node);
    }
    fn acked(&self, node: &str, stream: &str, cursor: Cursor) {
        self.0.node_acked(node, stream, cursor.seq);
    }
    fn room(&self) -> keel_sync::quic::Room<'_> {
        Box::pin(self.0.registry().room())
    }
    fn admit(&self, node: &str, stream: &str, records: &[Record]) -> Result<(), Refusal> {
        if stream.ends_with("/up") {
            let r = self.0.registry().admit_from_node(node, records);
            if let Err(refusal) = &r {
                warn!(%node, reason = %refusal.message, "refused a node's records");
            }
            return r;
        }
        Ok(())
    }
}
