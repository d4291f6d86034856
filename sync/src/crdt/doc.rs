//! An object's automerge document, held as the bytes it was loaded from
//! until something needs the document itself.
//!
//! A loaded object (a cloud restarting from a snapshot, a replica taking
//! a snapshot over) is read once — its shadow is folded from the loaded
//! document — and the document is then dropped for its saved bytes: the
//! fold's fast path needs only the shadow, and automerge's in-memory
//! document of a long history is tens of times larger than its saved form.
//! The first reader that needs the document (handing a full tail over, an
//! edit, a concurrent change, a rebase, the history) loads it again from
//! the same bytes, which give the same document.

use std::sync::{Arc, OnceLock};

use automerge::Automerge;

use super::CrdtError;
use super::guard::guarded;

/// (automerge's document is some 3.5 KB before it holds anything: it is
/// boxed, so that an object's entry in the store is a few hundred bytes
/// and the store's map nodes hold their entries' fields close together.)
#[derive(Debug, Clone)]
pub(super) enum Doc {
    /// In memory.
    Live(Box<Automerge>),
    /// The saved form of a document that loaded from these bytes before;
    /// loaded on the first read (and kept), made live on the first write.
    Saved {
        bytes: Arc<[u8]>,
        loaded: OnceLock<Box<Automerge>>,
    },
}

impl Doc {
    /// A document in memory.
    pub(super) fn live(doc: Automerge) -> Doc {
        Doc::Live(Box::new(doc))
    }

    /// A document held as `bytes` (one document chunk that loaded).
    pub(super) fn saved(bytes: &[u8]) -> Doc {
        Doc::Saved {
            bytes: bytes.into(),
            loaded: OnceLock::new(),
        }
    }

    /// The document, loaded if it is not yet.
    pub(super) fn get(&self) -> &Automerge {
        match self {
            Doc::Live(doc) => doc,
            Doc::Saved { bytes, loaded } => loaded.get_or_init(|| Box::new(load(bytes))),
        }
    }

    /// The document to change: live from now on (the bytes are dropped).
    pub(super) fn get_mut(&mut self) -> &mut Automerge {
        if let Doc::Saved { bytes, loaded } = self {
            let doc = loaded.take().unwrap_or_else(|| Box::new(load(bytes)));
            *self = Doc::Live(doc);
        }
        match self {
            Doc::Live(doc) => doc,
            Doc::Saved { loaded, bytes } => loaded.get_mut().unwrap_or_else(|| {
                unreachable!("a saved document of {} bytes was made live", bytes.len())
            }),
        }
    }

    pub(super) fn into_doc(self) -> Automerge {
        match self {
            Doc::Live(doc) => *doc,
            Doc::Saved { bytes, loaded } => {
                loaded.into_inner().map_or_else(|| load(&bytes), |doc| *doc)
            }
        }
    }

    /// A copy of the document to change (the caller replaces this one with
    /// it): a saved one not read yet is loaded into the copy alone.
    pub(super) fn to_doc(&self) -> Automerge {
        match self {
            Doc::Live(doc) => (**doc).clone(),
            Doc::Saved { bytes, loaded } => loaded
                .get()
                .map_or_else(|| load(bytes), |doc| (**doc).clone()),
        }
    }

    /// The saved form: the bytes it came from while it is not live.
    pub(super) fn save(&self) -> Vec<u8> {
        match self {
            Doc::Live(doc) => doc.save(),
            Doc::Saved { bytes, .. } => bytes.to_vec(),
        }
    }

    /// Whether the document is in memory.
    #[cfg(test)]
    pub(super) fn is_loaded(&self) -> bool {
        match self {
            Doc::Live(_) => true,
            Doc::Saved { loaded, .. } => loaded.get().is_some(),
        }
    }
}

/// Load bytes that loaded before. Loading is deterministic, so this does
/// not fail; were it to (memory corrupted under the process), the object
/// reads as empty and says so.
fn load(bytes: &[u8]) -> Automerge {
    let loaded = guarded("loading a saved document again", || Automerge::load(bytes))
        .and_then(|r| r.map_err(CrdtError::from));
    loaded.unwrap_or_else(|error| {
        tracing::error!(%error, "a saved document that loaded before did not load again");
        Automerge::new()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use serde_json::json;

    use super::super::{ActorId, Applied, ObjectStore, render_saved};

    const KEY: &str = "pods/default/web-0";

    fn loaded(store: &ObjectStore) -> bool {
        store
            .entries
            .get(KEY)
            .and_then(|e| e.doc.as_ref())
            .is_some_and(super::Doc::is_loaded)
    }

    fn status(i: u64) -> serde_json::Value {
        json!({"status": {"phase": if i.is_multiple_of(2) { "Running" } else { "Pending" }, "restartCount": i}})
    }

    #[test]
    fn a_loaded_document_stays_saved_until_it_is_needed() {
        let (cloud, node) = (ActorId::from_name("cloud"), ActorId::from_name("edge-1"));
        let mut source = ObjectStore::new();
        source
            .edit_merge_patch(
                KEY,
                &cloud,
                &json!({"kind": "Pod", "spec": {"nodeName": "edge-1"}}),
            )
            .unwrap();
        for i in 0..20 {
            source.edit_merge_patch(KEY, &node, &status(i)).unwrap();
        }
        source.settle(KEY);
        let saved = source.save(KEY).unwrap();

        let mut store = ObjectStore::new();
        store.load(KEY, &saved).unwrap();
        assert!(!loaded(&store), "held as its bytes after loading");
        assert_eq!(store.get_json(KEY), source.get_json(KEY));
        assert_eq!(store.save(KEY).unwrap(), saved, "saved as it came");

        // The node's next changes fold on the shadow alone.
        let next: Vec<Vec<u8>> = (20..25)
            .map(|i| {
                source
                    .edit_merge_patch(KEY, &node, &status(i))
                    .unwrap()
                    .unwrap()
            })
            .collect();
        for c in &next {
            assert_eq!(store.apply_change(KEY, c).unwrap(), Applied::New);
        }
        assert!(!loaded(&store));
        assert_eq!(store.get_json(KEY), source.get_json(KEY));
        assert_eq!(store.heads(KEY), source.heads(KEY));
        // What it saves now (its bytes, then the tail) is the same object.
        let again = store.save(KEY).unwrap();
        assert_eq!(render_saved(&again).unwrap(), source.get_json(KEY));

        // Reading the history loads it; an edit makes it live.
        assert_eq!(store.history_len(KEY), 26);
        assert!(loaded(&store));
        let edit = store
            .edit_merge_patch(KEY, &cloud, &json!({"spec": {"nodeName": "edge-2"}}))
            .unwrap()
            .unwrap();
        assert!(matches!(
            store.entries.get(KEY).and_then(|e| e.doc.as_ref()),
            Some(super::Doc::Live(_))
        ));
        assert_eq!(source.apply_change(KEY, &edit).unwrap(), Applied::New);
        assert_eq!(store.get_json(KEY), source.get_json(KEY));
        assert_eq!(store.heads(KEY), source.heads(KEY));
    }

    #[test]
    fn a_saved_document_is_copied_whole_and_edited_apart() {
        let cloud = ActorId::from_name("cloud");
        let mut source = ObjectStore::new();
        source
            .edit_merge_patch(
                KEY,
                &cloud,
                &json!({"kind": "Pod", "metadata": {"name": "web-0"}}),
            )
            .unwrap();
        let saved = source.save(KEY).unwrap();
        let mut a = ObjectStore::new();
        a.load(KEY, &saved).unwrap();
        let mut b = a.clone();
        a.edit_merge_patch(KEY, &cloud, &json!({"metadata": {"labels": {"x": "1"}}}))
            .unwrap();
        assert!(!loaded(&b), "a copy's edit leaves the other saved");
        assert_eq!(b.get_json(KEY), source.get_json(KEY));
        b.edit_merge_patch(KEY, &cloud, &json!({"metadata": {"labels": {"y": "2"}}}))
            .unwrap();
        assert_eq!(
            a.get_json(KEY).unwrap()["metadata"]["labels"],
            json!({"x": "1"})
        );
        assert_eq!(
            b.get_json(KEY).unwrap()["metadata"]["labels"],
            json!({"y": "2"})
        );
    }
}
