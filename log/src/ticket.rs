//! A one-shot completion that can be waited on from a plain thread or
//! awaited from async code, with no runtime dependency.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use crate::{Error, Result};

struct Slot<T> {
    value: Option<Result<T>>,
    dropped: bool,
    waker: Option<Waker>,
}

struct Shared<T> {
    slot: Mutex<Slot<T>>,
    cv: Condvar,
}

/// The pending result of a write: completes once the write is durable (or
/// failed). Wait with [`Ticket::wait`] or `.await` it.
pub struct Ticket<T> {
    shared: Arc<Shared<T>>,
}

impl<T> fmt::Debug for Ticket<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket").finish_non_exhaustive()
    }
}

pub(crate) struct Completer<T> {
    shared: Arc<Shared<T>>,
}

pub(crate) fn ticket<T>() -> (Completer<T>, Ticket<T>) {
    let shared = Arc::new(Shared {
        slot: Mutex::new(Slot {
            value: None,
            dropped: false,
            waker: None,
        }),
        cv: Condvar::new(),
    });
    (
        Completer {
            shared: shared.clone(),
        },
        Ticket { shared },
    )
}

impl<T> Completer<T> {
    pub(crate) fn complete(self, value: Result<T>) {
        let mut slot = self
            .shared
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        slot.value = Some(value);
        if let Some(w) = slot.waker.take() {
            w.wake();
        }
        self.shared.cv.notify_all();
        // `Drop` below sees the value is set and does nothing more.
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        let mut slot = self
            .shared
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        slot.dropped = true;
        if let Some(w) = slot.waker.take() {
            w.wake();
        }
        self.shared.cv.notify_all();
    }
}

impl<T> Ticket<T> {
    /// Whether the write has completed (or can no longer complete).
    pub(crate) fn is_done(&self) -> bool {
        let slot = self
            .shared
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        slot.value.is_some() || slot.dropped
    }

    /// Block the current thread until the write completes.
    pub fn wait(self) -> Result<T> {
        let mut slot = self
            .shared
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(v) = slot.value.take() {
                return v;
            }
            if slot.dropped {
                return Err(Error::Closed);
            }
            slot = self
                .shared
                .cv
                .wait(slot)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl<T> Future for Ticket<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let mut slot = self
            .shared
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = slot.value.take() {
            return Poll::Ready(v);
        }
        if slot.dropped {
            return Poll::Ready(Err(Error::Closed));
        }
        slot.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}
