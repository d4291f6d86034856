//! The queue between writers that hold a lock and the task that publishes
//! their commits once durable (cloudcore's registry, edgecore's metadata).
//!
//! A writer appends to the log and queues the commit while it holds its
//! lock, so it cannot wait there. The bound is kept one step earlier:
//! whatever feeds writers from a socket (the sync driver before it
//! persists a segment, the API before a write) first waits for
//! [`CommitQueue::room`]. With the queue full, the driver persists nothing
//! more, grants the peer no more window, and QUIC flow control slows the
//! peer; nothing grows. The queue then holds at most its capacity plus one
//! commit per writer that passed the check at the same moment.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, mpsc};

struct Shared {
    len: AtomicUsize,
    cap: usize,
    room: Notify,
}

/// The writers' end (cheap to clone).
pub struct CommitQueue<T> {
    tx: mpsc::UnboundedSender<T>,
    shared: Arc<Shared>,
}

impl<T> Clone for CommitQueue<T> {
    fn clone(&self) -> Self {
        CommitQueue {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<T> std::fmt::Debug for CommitQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitQueue")
            .field("len", &self.len())
            .field("cap", &self.shared.cap)
            .finish()
    }
}

/// The publisher's end.
pub struct Commits<T> {
    rx: mpsc::UnboundedReceiver<T>,
    shared: Arc<Shared>,
}

impl<T> std::fmt::Debug for Commits<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commits").finish_non_exhaustive()
    }
}

/// A queue whose feeders wait while `cap` commits are queued.
pub fn commit_queue<T>(cap: usize) -> (CommitQueue<T>, Commits<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        len: AtomicUsize::new(0),
        cap: cap.max(1),
        room: Notify::new(),
    });
    (
        CommitQueue {
            tx,
            shared: shared.clone(),
        },
        Commits { rx, shared },
    )
}

impl<T> CommitQueue<T> {
    /// Queues a commit; never waits (the caller holds a lock). Dropped if
    /// the publisher is gone.
    pub fn push(&self, commit: T) {
        self.shared.len.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(commit).is_err() {
            self.shared.len.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Commits queued and not yet taken by the publisher.
    pub fn len(&self) -> usize {
        self.shared.len.load(Ordering::SeqCst)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves once fewer than the capacity are queued (at once if so).
    pub async fn room(&self) {
        loop {
            let notified = self.shared.room.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a publisher's take between
            // the check and the wait is not missed.
            notified.as_mut().enable();
            if self.len() < self.shared.cap || self.tx.is_closed() {
                return;
            }
            notified.await;
        }
    }
}

impl<T> Commits<T> {
    /// The next commit, in the order queued; `None` once every writer's
    /// end is gone.
    pub async fn recv(&mut self) -> Option<T> {
        let c = self.rx.recv().await?;
        self.shared.len.fetch_sub(1, Ordering::SeqCst);
        self.shared.room.notify_waiters();
        Some(c)
    }
}

/// Runs `f`, which does CPU work (CRDT folding) or holds a lock a while,
/// without holding up the async tasks of this worker: on a multi-threaded
/// runtime they move to another worker meanwhile. Elsewhere (a
/// current-thread runtime, no runtime) it just runs `f`.
pub fn off_workers<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn feeders_wait_while_full_and_go_once_taken() {
        let (q, mut rx) = commit_queue::<u32>(2);
        q.push(1);
        tokio::time::timeout(Duration::from_millis(50), q.room())
            .await
            .unwrap();
        q.push(2);
        assert_eq!(q.len(), 2);
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { q.room().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "a full queue must hold feeders back"
        );
        assert_eq!(rx.recv().await, Some(1));
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(q.len(), 1);
        assert_eq!(rx.recv().await, Some(2));
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn a_gone_publisher_holds_nobody_back() {
        let (q, rx) = commit_queue::<u32>(1);
        q.push(1);
        drop(rx);
        q.push(2);
        tokio::time::timeout(Duration::from_secs(5), q.room())
            .await
            .unwrap();
    }
}
