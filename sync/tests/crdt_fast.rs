//! The fold's fast path: a change that is causally next is folded without
//! automerge, and whatever path a change takes, every store renders what
//! automerge renders from the same changes.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use keel_sync::crdt::{ActorId, Applied, ObjectStore, render_saved};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const KEY: &str = "pods/default/web-0";

fn cloud() -> ActorId {
    ActorId::from_name("cloud")
}
fn edge() -> ActorId {
    ActorId::from_name("edge-1")
}

/// What automerge alone renders for the object `store` holds: its saved
/// state (document, then the fast path's tail as loose changes) loaded
/// into a fresh store, whose view is read from the document.
fn automerge_view(store: &ObjectStore) -> Option<Value> {
    let saved = store.save(KEY)?;
    let rendered = render_saved(&saved).unwrap();
    // A store that loads it (its shadow read from the document) agrees.
    let mut fresh = ObjectStore::new();
    fresh.load(KEY, &saved).unwrap();
    assert_eq!(fresh.fast_tail(KEY), 0);
    assert_eq!(fresh.get_json(KEY), rendered);
    rendered
}

fn status(i: u64) -> Value {
    json!({"status": {
        "phase": if i.is_multiple_of(2) { "Running" } else { "Pending" },
        "podIP": format!("10.42.0.{}", i % 250),
        "conditions": [
            {"type": "Ready", "status": if i.is_multiple_of(2) { "True" } else { "False" }},
            {"type": "ContainersReady", "status": "True"}
        ],
        "containerStatuses": [{"name": "app", "ready": i.is_multiple_of(2), "restartCount": i}]
    }})
}

#[test]
fn pod_status_changes_take_the_fast_path_until_the_document_is_needed() {
    let mut cloud_store = ObjectStore::new();
    let create = cloud_store
        .edit_merge_patch(
            KEY,
            &cloud(),
            &json!({"kind": "Pod", "spec": {"nodeName": "edge-1"}}),
        )
        .unwrap()
        .unwrap();
    let mut node = ObjectStore::new();
    node.apply_change(KEY, &create).unwrap();
    let (statuses, views): (Vec<Vec<u8>>, Vec<Option<Value>>) = (0..10)
        .map(|i| {
            let c = node
                .edit_merge_patch(KEY, &edge(), &status(i))
                .unwrap()
                .unwrap();
            (c, node.get_json(KEY))
        })
        .unzip();
    for (i, c) in statuses.iter().enumerate() {
        assert_eq!(cloud_store.apply_change(KEY, c).unwrap(), Applied::New);
        assert_eq!(
            cloud_store.fast_tail(KEY),
            i + 1,
            "change {i} took the slow path"
        );
        assert_eq!(cloud_store.get_json(KEY), views[i]);
    }
    assert_eq!(cloud_store.heads(KEY), node.heads(KEY));
    assert_eq!(cloud_store.history_len(KEY), 11);
    assert!(cloud_store.has_change(KEY, &node.heads(KEY)[0]));
    assert_eq!(automerge_view(&cloud_store), node.get_json(KEY));
    // A duplicate is a duplicate, whichever path holds the original.
    assert_eq!(
        cloud_store.apply_change(KEY, &statuses[9]).unwrap(),
        Applied::Duplicate
    );
    assert_eq!(
        cloud_store.apply_change(KEY, &statuses[3]).unwrap(),
        Applied::Duplicate
    );
    // An edit needs the document: the tail goes to automerge first.
    let spec = cloud_store
        .edit_merge_patch(
            KEY,
            &cloud(),
            &json!({"spec": {"nodeName": "edge-1", "x": 1}}),
        )
        .unwrap()
        .unwrap();
    assert_eq!(cloud_store.fast_tail(KEY), 0);
    assert_eq!(node.apply_change(KEY, &spec).unwrap(), Applied::New);
    assert_eq!(node.fast_tail(KEY), 1);
    assert_eq!(node.get_json(KEY), cloud_store.get_json(KEY));
    assert_eq!(automerge_view(&node), cloud_store.get_json(KEY));
    // A batch: all fast.
    let more: Vec<Vec<u8>> = (10..20)
        .map(|i| {
            node.edit_merge_patch(KEY, &edge(), &status(i))
                .unwrap()
                .unwrap()
        })
        .collect();
    let r = cloud_store.apply_changes(KEY, more.iter().map(Vec::as_slice));
    assert!(r.iter().all(|r| matches!(r, Ok(Applied::New))));
    assert_eq!(cloud_store.fast_tail(KEY), 10);
    assert_eq!(cloud_store.get_json(KEY), node.get_json(KEY));
    // A preview sees the same.
    let next = node
        .edit_merge_patch(KEY, &edge(), &status(99))
        .unwrap()
        .unwrap();
    assert_eq!(
        cloud_store.preview(KEY, [next.as_slice()]).unwrap(),
        node.get_json(KEY)
    );
    assert_eq!(cloud_store.fast_tail(KEY), 10);
}

#[test]
fn a_full_tail_goes_to_automerge_and_the_fast_path_goes_on() {
    let (mut a, mut b) = created(&json!({"n": 0}));
    let mut max_tail = 0;
    for i in 1..300 {
        let c = a
            .edit_merge_patch(KEY, &edge(), &json!({"n": i}))
            .unwrap()
            .unwrap();
        assert_eq!(b.apply_change(KEY, &c).unwrap(), Applied::New);
        max_tail = max_tail.max(b.fast_tail(KEY));
    }
    assert!(max_tail > 1 && max_tail <= 64, "{max_tail}");
    assert_eq!(b.get_json(KEY), Some(json!({"n": 299})));
    assert_eq!(automerge_view(&b), Some(json!({"n": 299})));
    assert_eq!(b.history_len(KEY), 300);
}

/// A document of many objects (past the number the shadow finds by a
/// scan, so that it finds them through an index) folds changes that make
/// and change objects as automerge does.
#[test]
fn documents_of_many_objects_take_the_fast_path() {
    let items = |n: u64, v: u64| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"name": format!("c{i}"), "v": v, "sub": {"x": i}}))
            .collect()
    };
    let (mut a, mut b) = created(&json!({"list": items(20, 0)}));
    for (i, n) in [(1u64, 30u64), (2, 40), (3, 40), (4, 10), (5, 60)] {
        let c = a
            .edit_merge_patch(KEY, &edge(), &json!({"list": items(n, i), "m": {"k": i}}))
            .unwrap()
            .unwrap();
        assert_eq!(b.apply_change(KEY, &c).unwrap(), Applied::New);
        assert!(b.fast_tail(KEY) > 0, "change {i} took the fast path");
        let want = json!({"list": items(n, i), "m": {"k": i}});
        assert_eq!(b.get_json(KEY), Some(want.clone()));
        assert_eq!(automerge_view(&b), Some(want));
    }
}

#[test]
fn many_actors_taking_turns_take_the_fast_path() {
    // Many writers of one object, one change each in turn: each one's
    // change is known by the shadow's actor index as that actor's next.
    let (mut a, mut b) = created(&json!({"n": 0}));
    let actors: Vec<ActorId> = (0..40)
        .map(|i| ActorId::from_name(&format!("edge-{i}")))
        .collect();
    let mut last = Vec::new();
    let mut max_tail = 0;
    for round in 0..3u64 {
        for (i, actor) in actors.iter().enumerate() {
            let n = round * 100 + i as u64;
            let c = a
                .edit_merge_patch(KEY, actor, &json!({"n": n, "by": i}))
                .unwrap()
                .unwrap();
            assert_eq!(b.apply_change(KEY, &c).unwrap(), Applied::New);
            max_tail = max_tail.max(b.fast_tail(KEY));
            last = c;
        }
    }
    // Folded without automerge, a full tail at a time.
    assert!(max_tail >= 60, "{max_tail}");
    // A change already held is one, by whichever path it was folded.
    assert_eq!(b.apply_change(KEY, &last).unwrap(), Applied::Duplicate);
    let want = json!({"n": 239, "by": 39});
    assert_eq!(b.get_json(KEY), Some(want.clone()));
    assert_eq!(automerge_view(&b), Some(want));
    assert_eq!(b.history_len(KEY), 1 + 3 * actors.len());
    assert_eq!(b.heads(KEY), a.heads(KEY));
}

#[test]
fn a_tombstone_and_a_rebase_drop_the_tail_with_the_history() {
    let mut a = ObjectStore::new();
    let mut b = ObjectStore::new();
    let first = a
        .edit_merge_patch(KEY, &cloud(), &json!({"n": 0}))
        .unwrap()
        .unwrap();
    b.apply_change(KEY, &first).unwrap();
    let second = a
        .edit_merge_patch(KEY, &edge(), &json!({"n": 1}))
        .unwrap()
        .unwrap();
    b.apply_change(KEY, &second).unwrap();
    assert_eq!(b.fast_tail(KEY), 1);
    b.apply_tombstone(KEY);
    assert!(!b.contains(KEY));
    assert_eq!(b.fast_tail(KEY), 0);
    assert_eq!(b.apply_change(KEY, &second).unwrap(), Applied::Discarded);
    // Rebase with a tail.
    let mut c = ObjectStore::new();
    c.apply_change(KEY, &first).unwrap();
    c.apply_change(KEY, &second).unwrap();
    let root = c.rebase(KEY, &cloud()).unwrap().unwrap();
    assert_eq!(c.get_json(KEY), Some(json!({"n": 1})));
    assert_eq!(c.history_len(KEY), 1);
    let after = a
        .edit_merge_patch(KEY, &edge(), &json!({"n": 2}))
        .unwrap()
        .unwrap();
    assert_eq!(c.apply_change(KEY, &after).unwrap(), Applied::Discarded);
    let mut d = ObjectStore::new();
    d.apply_change(KEY, &root).unwrap();
    let on_root = d
        .edit_merge_patch(KEY, &edge(), &json!({"n": 3}))
        .unwrap()
        .unwrap();
    assert_eq!(c.apply_change(KEY, &on_root).unwrap(), Applied::New);
    assert_eq!(c.fast_tail(KEY), 1);
    assert_eq!(c.get_json(KEY), Some(json!({"n": 3})));
}

/// A cloud and a node apart: the cloud changes the pod's labels, the
/// node its status (the first time making it, lists and all), each on
/// top of what it last heard of the other. Each
/// side's changes are concurrent with the other's when they arrive, and
/// disjoint: every one takes the fast path, and both sides end with what
/// automerge renders.
#[test]
fn concurrent_edits_of_other_fields_take_the_fast_path() {
    let mut cloud_store = ObjectStore::new();
    let create = cloud_store
        .edit_merge_patch(
            KEY,
            &cloud(),
            &json!({"kind": "Pod", "metadata": {"labels": {"rev": "0"}}, "spec": {"nodeName": "edge-1"}}),
        )
        .unwrap()
        .unwrap();
    let mut node = ObjectStore::new();
    node.apply_change(KEY, &create).unwrap();
    // Round 0: the node's first status makes its lists (inserts into lists
    // the change itself made).
    for round in 0..20u64 {
        let label = cloud_store
            .edit_merge_patch(
                KEY,
                &cloud(),
                &json!({"metadata": {"labels": {"rev": (round + 1).to_string()}}}),
            )
            .unwrap()
            .unwrap();
        let st = node
            .edit_merge_patch(KEY, &edge(), &status(round))
            .unwrap()
            .unwrap();
        let (cloud_tail, node_tail) = (cloud_store.fast_tail(KEY), node.fast_tail(KEY));
        assert_eq!(cloud_store.apply_change(KEY, &st).unwrap(), Applied::New);
        assert_eq!(node.apply_change(KEY, &label).unwrap(), Applied::New);
        assert_eq!(
            cloud_store.fast_tail(KEY),
            cloud_tail + 1,
            "round {round}: slow path"
        );
        assert_eq!(
            node.fast_tail(KEY),
            node_tail + 1,
            "round {round}: slow path"
        );
        let want = automerge_view(&cloud_store);
        assert_eq!(cloud_store.get_json(KEY), want);
        assert_eq!(node.get_json(KEY), want);
        assert_eq!(automerge_view(&node), want);
        assert_eq!(
            want.as_ref().and_then(|v| v
                .pointer("/status/containerStatuses/0/restartCount")
                .cloned()),
            Some(json!(round))
        );
        assert_eq!(cloud_store.heads(KEY), node.heads(KEY));
    }
}

/// Concurrent edits of the same field are automerge's to merge (the
/// fast path refuses them), and the merge is the same on both sides.
#[test]
fn concurrent_edits_of_one_field_go_to_automerge() {
    let mut a = ObjectStore::new();
    let create = a
        .edit_merge_patch(KEY, &cloud(), &json!({"kind": "Pod", "spec": {"n": 0}}))
        .unwrap()
        .unwrap();
    let mut b = ObjectStore::new();
    b.apply_change(KEY, &create).unwrap();
    let from_a = a
        .edit_merge_patch(KEY, &cloud(), &json!({"spec": {"n": 1}}))
        .unwrap()
        .unwrap();
    let from_b = b
        .edit_merge_patch(KEY, &edge(), &json!({"spec": {"n": 2}}))
        .unwrap()
        .unwrap();
    let (ta, tb) = (a.fast_tail(KEY), b.fast_tail(KEY));
    assert_eq!(a.apply_change(KEY, &from_b).unwrap(), Applied::New);
    assert_eq!(b.apply_change(KEY, &from_a).unwrap(), Applied::New);
    // Neither went on a fast-path tail (each side's tail is handed to
    // automerge with the change, or stays as it was).
    assert!(a.fast_tail(KEY) <= ta && b.fast_tail(KEY) <= tb);
    let want = automerge_view(&a);
    assert_eq!(a.get_json(KEY), want);
    assert_eq!(b.get_json(KEY), want);
    assert_eq!(automerge_view(&b), want);
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        (i64::MAX as u64..=u64::MAX).prop_map(|u| json!(u)),
        prop::num::f64::NORMAL.prop_map(|f| json!(f)),
        Just(json!(0.0)),
        Just(json!(-0.0)),
        "[a-z0-9é ]{0,12}".prop_map(Value::String),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-e]", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<String, Value>>())),
        ]
    })
}

/// A writer that created the pod, and a reader that applied the creation.
fn writer_and_reader() -> (ObjectStore, ObjectStore) {
    created(&json!({"kind": "Pod"}))
}

/// A writer that created the object with `patch`, and a reader that
/// applied its creation.
fn created(patch: &Value) -> (ObjectStore, ObjectStore) {
    let mut writer = ObjectStore::new();
    let mut reader = ObjectStore::new();
    let create = writer
        .edit_merge_patch(KEY, &cloud(), patch)
        .unwrap()
        .unwrap();
    reader.apply_change(KEY, &create).unwrap();
    (writer, reader)
}

/// A map wider than the fold keeps in its small form, with nulls (a merge
/// patch deletes those keys).
fn wide() -> impl Strategy<Value = Value> {
    prop::collection::btree_map("[a-z]{1,2}", leaf(), 0..80)
        .prop_map(|m| Value::Object(m.into_iter().collect::<Map<String, Value>>()))
}

/// One edit: who writes, which field, the value, and whether the other
/// writer hears of it (and of everything before it) right away.
fn edit() -> impl Strategy<Value = (bool, u8, Value, bool)> {
    (any::<bool>(), 0u8..3, value(), any::<bool>())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Two writers edit one object, sometimes in step, sometimes
    /// concurrently; an observer applies every change in the order it was
    /// made (fast path or automerge, as each change allows). All three, and
    /// automerge alone, render the same object in the end, and the
    /// observer renders what automerge renders after every change.
    #[test]
    fn every_store_renders_what_automerge_renders(edits in prop::collection::vec(edit(), 1..24)) {
        let mut writers = [ObjectStore::new(), ObjectStore::new()];
        let actors = [cloud(), edge()];
        let mut observer = ObjectStore::new();
        let create = writers[0].edit_merge_patch(KEY, &actors[0], &json!({"kind": "Pod"})).unwrap().unwrap();
        writers[1].apply_change(KEY, &create).unwrap();
        observer.apply_change(KEY, &create).unwrap();
        let mut unheard: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
        let mut fast = 0;
        for (who, field, v, sync) in edits {
            let w = usize::from(who);
            let field = ["spec", "status", "metadata"][usize::from(field)];
            let Some(c) = writers[w].edit_merge_patch(KEY, &actors[w], &json!({ field: v })).unwrap() else {
                continue;
            };
            let before = observer.fast_tail(KEY);
            prop_assert_eq!(observer.apply_change(KEY, &c).unwrap(), Applied::New);
            if observer.fast_tail(KEY) > before {
                fast += 1;
            }
            prop_assert_eq!(observer.get_json(KEY), automerge_view(&observer));
            unheard[w].push(c);
            if sync {
                for c in std::mem::take(&mut unheard[w]) {
                    writers[1 - w].apply_change(KEY, &c).unwrap();
                    // Concurrent changes too: whatever path they took,
                    // automerge's view.
                    prop_assert_eq!(writers[1 - w].get_json(KEY), automerge_view(&writers[1 - w]));
                }
            }
        }
        for w in 0..2 {
            for c in std::mem::take(&mut unheard[w]) {
                writers[1 - w].apply_change(KEY, &c).unwrap();
            }
        }
        let want = automerge_view(&writers[0]);
        prop_assert_eq!(writers[0].get_json(KEY), want.clone());
        prop_assert_eq!(writers[1].get_json(KEY), want.clone());
        prop_assert_eq!(observer.get_json(KEY), want.clone());
        prop_assert_eq!(automerge_view(&writers[1]), want);
        prop_assert_eq!(observer.heads(KEY), writers[0].heads(KEY));
        let _ = fast;
    }

    /// A writer's changes in order, all causally next: every one is folded
    /// by the fast path, and the result is automerge's.
    #[test]
    fn sequential_changes_all_take_the_fast_path(values in prop::collection::vec(value(), 1..16)) {
        let (mut writer, mut reader) = writer_and_reader();
        let mut made = 0;
        for (i, v) in values.into_iter().enumerate() {
            let actor = if i % 3 == 0 { cloud() } else { edge() };
            if let Some(c) = writer.edit_merge_patch(KEY, &actor, &json!({"status": v})).unwrap() {
                made += 1;
                prop_assert_eq!(reader.apply_change(KEY, &c).unwrap(), Applied::New);
                prop_assert_eq!(reader.fast_tail(KEY), made, "change {} took the slow path", i);
            }
        }
        prop_assert_eq!(reader.get_json(KEY), writer.get_json(KEY));
        prop_assert_eq!(automerge_view(&reader), writer.get_json(KEY));
    }

    /// Maps that grow past the fold's small form and shrink again (keys
    /// added and deleted by merge patches): the fast path still renders
    /// what automerge renders.
    #[test]
    fn wide_maps_render_what_automerge_renders(values in prop::collection::vec(wide(), 1..8)) {
        let (mut writer, mut reader) = writer_and_reader();
        for v in values {
            if let Some(c) = writer.edit_merge_patch(KEY, &edge(), &json!({"status": v})).unwrap() {
                prop_assert_eq!(reader.apply_change(KEY, &c).unwrap(), Applied::New);
                prop_assert_eq!(reader.get_json(KEY), writer.get_json(KEY));
            }
        }
        prop_assert!(reader.fast_tail(KEY) > 0);
        prop_assert_eq!(automerge_view(&reader), writer.get_json(KEY));
    }
}
