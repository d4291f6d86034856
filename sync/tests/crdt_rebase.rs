//! Rebase (history compaction) of CRDT documents: a cloud replica replaces
//! an old object's history with a single root; an edge replica that had
//! status the cloud had not folded re-asserts it on top; stragglers built
//! on the old history are discarded; log compaction folds and snapshot
//! loads follow the root. Both replicas converge with a short history.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use keel_sync::crdt::{ActorId, Applied, ObjectStore, fold_change, is_rebase};
use serde_json::{Value, json};

const KEY: &str = "pods/default/web-1";

fn cloud() -> ActorId {
    ActorId::from_name("cloudcore")
}
fn edge() -> ActorId {
    ActorId::from_name("edge-1")
}

fn pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "default", "labels": {"app": "web"}},
        "spec": {"nodeName": "edge-1", "containers": [{"name": "c", "image": "busybox"}]}})
}

fn status(i: u64) -> Value {
    json!({"status": {"phase": "Running", "conditions": [
        {"type": "Ready", "status": if i.is_multiple_of(2) { "True" } else { "False" }}],
        "restarts": i}})
}

/// A cloud and an edge replica sharing a pod; the edge writes `n` status
/// changes, of which the cloud folds the first `folded`. Returns the
/// replicas, the creation change and the edge's changes.
fn setup(n: u64, folded: usize) -> (ObjectStore, ObjectStore, Vec<u8>, Vec<Vec<u8>>) {
    let (mut c, mut e) = (ObjectStore::new(), ObjectStore::new());
    let create = c.edit_replace(KEY, &cloud(), &pod()).unwrap().unwrap();
    assert_eq!(e.apply_change(KEY, &create).unwrap(), Applied::New);
    let mut ups = Vec::new();
    for i in 0..n {
        ups.push(
            e.edit_merge_patch(KEY, &edge(), &status(i))
                .unwrap()
                .unwrap(),
        );
    }
    for u in &ups[..folded] {
        assert_eq!(c.apply_change(KEY, u).unwrap(), Applied::New);
    }
    (c, e, create, ups)
}

#[test]
fn an_edge_ahead_of_the_rebase_re_asserts_and_both_converge() {
    let (mut c, mut e, _, ups) = setup(100, 50);
    assert_eq!(c.history_len(KEY), 51);
    let before = c.get_json(KEY).unwrap();
    let root = c.rebase(KEY, &cloud()).unwrap().unwrap();
    assert!(is_rebase(&root));
    assert_eq!(c.history_len(KEY), 1);
    assert_eq!(
        c.get_json(KEY).unwrap(),
        before,
        "a rebase changes no value"
    );
    // The cloud has nothing diverged: it made the root from what it held.
    assert!(c.take_diverged(KEY, &cloud()).unwrap().is_none());

    // The edge meets the root: its last 50 changes are not in it.
    let held = e.get_json(KEY).unwrap();
    assert_eq!(e.apply_change(KEY, &root).unwrap(), Applied::New);
    assert_eq!(e.get_json(KEY).unwrap(), before);
    let again = e.take_diverged(KEY, &edge()).unwrap().unwrap();
    assert_eq!(e.get_json(KEY).unwrap(), held, "the edge keeps what it had");
    assert!(e.take_diverged(KEY, &edge()).unwrap().is_none());
    assert_eq!(e.history_len(KEY), 2);

    // The stragglers reach the cloud before the re-assertion: discarded.
    for u in &ups[50..] {
        assert_eq!(c.apply_change(KEY, u).unwrap(), Applied::Discarded);
    }
    assert_eq!(c.apply_change(KEY, &again).unwrap(), Applied::New);
    assert_eq!(c.get_json(KEY), e.get_json(KEY));
    assert_eq!(c.heads(KEY), e.heads(KEY));
    assert_eq!(c.queued(KEY), 0);

    // Both go on as usual.
    let next = e
        .edit_merge_patch(KEY, &edge(), &status(1000))
        .unwrap()
        .unwrap();
    assert_eq!(c.apply_change(KEY, &next).unwrap(), Applied::New);
    let spec = c
        .edit_merge_patch(KEY, &cloud(), &json!({"metadata": {"labels": {"v": "2"}}}))
        .unwrap()
        .unwrap();
    assert_eq!(e.apply_change(KEY, &spec).unwrap(), Applied::New);
    assert_eq!(c.get_json(KEY), e.get_json(KEY));
    assert_eq!(c.history_len(KEY), 4);
}

#[test]
fn an_edge_in_step_has_nothing_to_re_assert() {
    let (mut c, mut e, _, _) = setup(20, 20);
    let root = c.rebase(KEY, &cloud()).unwrap().unwrap();
    assert_eq!(e.apply_change(KEY, &root).unwrap(), Applied::New);
    assert!(e.take_diverged(KEY, &edge()).unwrap().is_none());
    assert_eq!(c.heads(KEY), e.heads(KEY));
    // Delivered twice: a duplicate, nothing changes.
    assert_eq!(e.apply_change(KEY, &root).unwrap(), Applied::Duplicate);
    assert_eq!(e.history_len(KEY), 1);
}

#[test]
fn waiting_changes_and_late_stragglers_are_superseded() {
    let (mut c, mut e, _, ups) = setup(10, 5);
    // Change 7 reaches the cloud without 6: it waits.
    assert_eq!(c.apply_change(KEY, &ups[7]).unwrap(), Applied::Queued);
    let root = c.rebase(KEY, &cloud()).unwrap().unwrap();
    assert_eq!(c.queued(KEY), 0, "what waited was built on the old history");
    // The rest arrives in order: each is built on dead history.
    assert_eq!(c.apply_change(KEY, &ups[5]).unwrap(), Applied::Discarded);
    assert_eq!(c.apply_change(KEY, &ups[6]).unwrap(), Applied::Discarded);
    assert_eq!(c.apply_change(KEY, &ups[7]).unwrap(), Applied::Discarded);
    assert_eq!(e.apply_change(KEY, &root).unwrap(), Applied::New);
    let again = e.take_diverged(KEY, &edge()).unwrap().unwrap();
    assert_eq!(c.apply_change(KEY, &again).unwrap(), Applied::New);
    assert_eq!(c.get_json(KEY), e.get_json(KEY));
}

#[test]
fn a_batch_with_a_root_in_it_applies_in_order() {
    let (mut c, _, create, ups) = setup(30, 30);
    let root = c.rebase(KEY, &cloud()).unwrap().unwrap();
    let after = c
        .edit_merge_patch(KEY, &cloud(), &json!({"metadata": {"labels": {"v": "3"}}}))
        .unwrap()
        .unwrap();
    // A fresh replica reads the whole stream in one run: the old history,
    // the root, what came after.
    let mut r = ObjectStore::new();
    let mut run: Vec<&[u8]> = vec![&create];
    run.extend(ups.iter().map(Vec::as_slice));
    run.push(&root);
    run.push(&after);
    let results = r.apply_changes(KEY, run);
    assert!(results.iter().all(|x| *x.as_ref().unwrap() == Applied::New));
    assert_eq!(r.get_json(KEY), c.get_json(KEY));
    assert_eq!(r.heads(KEY), c.heads(KEY));
    assert_eq!(r.history_len(KEY), 2);
}

#[test]
fn compaction_folds_and_snapshots_follow_the_root() {
    let (mut c, mut e, create, ups) = setup(40, 40);
    let root = c.rebase(KEY, &cloud()).unwrap().unwrap();
    let after = c
        .edit_merge_patch(KEY, &cloud(), &json!({"metadata": {"labels": {"v": "4"}}}))
        .unwrap()
        .unwrap();
    // Folding the stream as log compaction does.
    let mut state: Option<Vec<u8>> = None;
    for change in std::iter::once(&create).chain(&ups).chain([&root, &after]) {
        state = Some(fold_change(state.as_deref(), change).unwrap());
    }
    let state = state.unwrap();
    // Folding the root again changes nothing.
    assert_eq!(fold_change(Some(&state), &root).unwrap().len(), state.len());
    // A fresh replica and one that still holds the old history both end
    // up with the root's short history.
    let mut fresh = ObjectStore::new();
    fresh.load(KEY, &state).unwrap();
    assert_eq!(fresh.get_json(KEY), c.get_json(KEY));
    assert_eq!(fresh.history_len(KEY), 2);
    e.load(KEY, &state).unwrap();
    assert_eq!(e.get_json(KEY), c.get_json(KEY));
    assert_eq!(e.heads(KEY), c.heads(KEY));
    assert_eq!(e.history_len(KEY), 2);
    // The saved state is small: one value, not forty changes.
    let old_size: usize = ups.iter().map(Vec::len).sum();
    assert!(state.len() < old_size, "{} >= {old_size}", state.len());
}

#[test]
fn two_rebases_of_the_same_value_make_different_roots() {
    let (mut c, _, _, _) = setup(3, 3);
    let first = c.rebase(KEY, &cloud()).unwrap().unwrap();
    assert!(
        c.rebase(KEY, &cloud()).unwrap().is_none(),
        "one change: nothing to do"
    );
    c.edit_merge_patch(KEY, &cloud(), &json!({"metadata": {"labels": {"v": "5"}}}))
        .unwrap();
    c.edit_merge_patch(KEY, &cloud(), &json!({"metadata": {"labels": {"v": null}}}))
        .unwrap();
    let second = c.rebase(KEY, &cloud()).unwrap().unwrap();
    assert_ne!(first, second);
    let mut r = ObjectStore::new();
    assert_eq!(r.apply_change(KEY, &first).unwrap(), Applied::New);
    assert_eq!(r.apply_change(KEY, &second).unwrap(), Applied::New);
    assert_eq!(r.get_json(KEY), c.get_json(KEY));
    // The first root is dead history now: delivered again, it is dropped.
    assert_eq!(r.apply_change(KEY, &first).unwrap(), Applied::Discarded);
    assert_eq!(r.get_json(KEY), c.get_json(KEY));
}

#[test]
fn ordinary_changes_and_garbage_are_not_roots() {
    let (_, _, create, ups) = setup(2, 2);
    assert!(!is_rebase(&create));
    assert!(!is_rebase(&ups[0]));
    assert!(!is_rebase(b"garbage"));
    assert!(!is_rebase(&[]));
}

/// A deleted object's memory (its dead history) lasts from one
/// `forget_deleted` to the next, then goes: a straggler in between is
/// discarded, one after is only queued (it depends on the forgotten
/// history, so it never re-creates the object) and goes at the next call.
/// Live objects are never forgotten.
#[test]
fn deleted_objects_are_forgotten_after_two_sweeps_and_never_come_back() {
    let (mut c, _, _, ups) = setup(3, 1);
    let other = "pods/default/web-2";
    c.edit_replace(other, &cloud(), &pod()).unwrap().unwrap();
    c.apply_tombstone(KEY);
    assert_eq!(c.forget_deleted(), 0, "first sweep only marks");
    assert_eq!(c.apply_change(KEY, &ups[1]).unwrap(), Applied::Discarded);
    assert_eq!(c.forget_deleted(), 1);
    assert_eq!(c.get_json(KEY), None);
    // Its history is forgotten: a straggler waits for it, and is dropped.
    assert_eq!(c.apply_change(KEY, &ups[2]).unwrap(), Applied::Queued);
    assert_eq!(c.get_json(KEY), None);
    assert_eq!(c.forget_deleted(), 0, "marked again");
    assert_eq!(c.forget_deleted(), 1);
    // The live object stayed through every sweep.
    assert!(c.get_json(other).is_some());
    // The key can be created again from scratch.
    c.edit_replace(KEY, &cloud(), &pod()).unwrap().unwrap();
    assert_eq!(c.forget_deleted(), 0);
    assert_eq!(c.get_json(KEY).unwrap()["metadata"]["name"], "web-1");
}

#[test]
fn a_batch_waits_for_no_more_changes_than_one_call_per_change() {
    let (mut c, _, _, ups) = setup(301, 0);
    // The first change of the edge's never arrives: every other one waits.
    let results = c.apply_changes(KEY, ups[1..].iter().map(Vec::as_slice));
    let max = keel_sync::crdt::MAX_QUEUED_PER_OBJECT;
    assert_eq!(c.queued(KEY), max);
    for (i, r) in results.iter().enumerate() {
        if i < max {
            assert_eq!(r.as_ref().unwrap(), &Applied::Queued, "change {i}");
        } else {
            assert!(r.is_err(), "change {i} is past the bound: {r:?}");
        }
    }
    // The missing change lets the waiting ones in.
    assert_eq!(c.apply_change(KEY, &ups[0]).unwrap(), Applied::New);
    assert_eq!(c.queued(KEY), 0);
    assert_eq!(c.history_len(KEY), 1 + 1 + max);
}

/// `is_rebase` reads the header alone, but never says yes to bytes that
/// are not exactly a root: any cut or any changed byte of one is refused
/// (the checksum or the framing fails), and so is a root's message on a
/// change that has dependencies.
#[test]
fn only_whole_roots_are_roots() {
    let (mut c, _, _, _) = setup(4, 2);
    let root = c.rebase(KEY, &cloud()).unwrap().unwrap();
    assert!(is_rebase(&root));
    for cut in 0..root.len() {
        assert!(!is_rebase(&root[..cut]), "cut at {cut}");
    }
    for at in 0..root.len() {
        let mut b = root.clone();
        b[at] ^= 0x01;
        assert!(!is_rebase(&b), "byte {at} changed");
    }
    // The next change after the root depends on it.
    let next = c
        .edit_merge_patch(KEY, &cloud(), &json!({"status": {"phase": "Next"}}))
        .unwrap()
        .unwrap();
    assert!(!is_rebase(&next));
}
