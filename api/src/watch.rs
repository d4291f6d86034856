//! Watch history and live feed, shared by cloudcore's registry and
//! edgecore's local object view: events are published in resourceVersion
//! order once durable; a watch resumes after any resourceVersion still held,
//! older is `410 Gone`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::broadcast;

use crate::status::Status;

/// Events kept for watches to resume from (at most; see
/// [`WatchHub::set_window`] for the age bound).
pub const HISTORY: usize = 16_384;

/// What a watcher is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Added,
    Modified,
    Deleted,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Added => "ADDED",
            EventKind::Modified => "MODIFIED",
            EventKind::Deleted => "DELETED",
        }
    }
}

/// One change, as watchers see it.
#[derive(Debug)]
pub struct WatchEvent {
    pub rv: u64,
    pub kind: EventKind,
    pub key: String,
    /// The object after the change (before it, for a deletion), shared
    /// with the view that holds it (no copy per event): its
    /// `resourceVersion` is `rv`, set when it is sent ([`Self::rendered`]).
    pub object: Arc<Value>,
}

impl WatchEvent {
    /// The object as a watcher gets it, with its `resourceVersion`.
    pub fn rendered(&self) -> Value {
        crate::meta::with_rv(&self.object, self.rv)
    }
}

/// Events held after a watch's starting point, and the live feed.
pub type WatchStart = (Vec<Arc<WatchEvent>>, broadcast::Receiver<Arc<WatchEvent>>);

struct History {
    /// Each event with when it was published.
    events: VecDeque<(Instant, Arc<WatchEvent>)>,
    /// Lowest resourceVersion a watch can resume after.
    floor: u64,
    /// Events older than this are let go (`None`: only [`HISTORY`] bounds).
    window: Option<Duration>,
}

/// The kept history and the live feed.
pub struct WatchHub {
    history: Mutex<History>,
    events: broadcast::Sender<Arc<WatchEvent>>,
}

impl std::fmt::Debug for WatchHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchHub").finish_non_exhaustive()
    }
}

impl WatchHub {
    /// A hub whose watches can resume after `floor` and later.
    pub fn new(floor: u64) -> WatchHub {
        let (events, _) = broadcast::channel(4096);
        WatchHub {
            history: Mutex::new(History {
                events: VecDeque::new(),
                floor,
                window: None,
            }),
            events,
        }
    }

    /// Keeps history only as long as `window` too (the log's retention:
    /// a watch can resume from what the log still holds as history).
    pub fn set_window(&self, window: Duration) {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .window = Some(window);
    }

    /// Publishes durable events (in resourceVersion order).
    pub fn publish(&self, events: impl IntoIterator<Item = Arc<WatchEvent>>) {
        let now = Instant::now();
        let mut h = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        for e in events {
            h.events.push_back((now, e.clone()));
            let _ = self.events.send(e);
        }
        let window = h.window;
        let expired = |t: &Instant| window.is_some_and(|w| now.duration_since(*t) > w);
        while h.events.len() > HISTORY || h.events.front().is_some_and(|(t, _)| expired(t)) {
            if let Some((_, e)) = h.events.pop_front() {
                h.floor = e.rv;
            }
        }
    }

    /// Events after `rv` still held, and a receiver for the ones to come
    /// (subscribed first, so nothing falls between). `410 Gone` if `rv`
    /// is older than the history kept.
    pub fn watch(&self, rv: u64) -> Result<WatchStart, Status> {
        let rx = self.events.subscribe();
        let h = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        if rv < h.floor {
            return Err(Status::gone(format!(
                "too old resource version: {rv} ({})",
                h.floor
            )));
        }
        let past = h
            .events
            .iter()
            .filter(|(_, e)| e.rv > rv)
            .map(|(_, e)| e.clone())
            .collect();
        Ok((past, rx))
    }
}
