//! Algebraic laws of the CRDT object store, checked with proptest.
//!
//! Random edits by 2–3 writers from a common base (with random partial syncs
//! between replicas, so the change graph has real concurrency and merges)
//! produce a change set; then:
//! - any permutation of the change set, with duplicates inserted, yields the
//!   same JSON (and the same serialized bytes and heads) on every replica
//!   (commutativity + idempotence, including out-of-order delivery that has to
//!   queue changes);
//! - merging replica states with save/load is associative and commutative,
//!   and agrees with applying the union of the changes;
//! - re-applying any change is `Applied::Duplicate` and changes nothing;
//! - folding the changes (in a shuffled order) with `fold_change` gives a state
//!   that loads to the same JSON.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use keel_sync::crdt::{ActorId, Applied, ObjectStore, fold_change};
use proptest::prelude::*;
use serde_json::{Value, json};

const KEY: &str = "pods/default/web-1";
const REPLICAS: usize = 3;

fn actor(i: usize) -> ActorId {
    ActorId::from_name(["cloud", "edge/node-1", "edge/node-2"][i])
}

fn base() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-1", "labels": {"app": "web"}, "resourceVersion": "1"},
        "spec": {"containers": [{"name": "c", "image": "nginx:1", "ports": [{"containerPort": 80}]}],
                 "tolerations": []},
        "status": {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}]}
    })
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (-3i64..4).prop_map(Value::from),
        Just(json!(18_446_744_073_709_551_615u64)),
        prop::sample::select(vec![0.5f64, 1.0, -2.25, 1e10]).prop_map(Value::from),
        "[a-c]{0,2}".prop_map(Value::from),
        Just(json!({})),
        Just(json!([])),
        prop::collection::vec(0i64..3, 0..4).prop_map(|v| json!(v)),
        prop::collection::btree_map("[xy]", 0i64..3, 0..3).prop_map(|m| json!(m)),
    ]
}

fn path() -> impl Strategy<Value = Vec<&'static str>> {
    prop::collection::vec(
        prop::sample::select(vec![
            "spec", "status", "metadata", "labels", "phase", "a", "l",
        ]),
        1..=3,
    )
}

#[derive(Debug, Clone)]
enum Step {
    /// RFC 7386 merge patch `{p0: {p1: ... value}}` by writer `actor`.
    Patch {
        actor: usize,
        path: Vec<&'static str>,
        value: Value,
    },
    /// Whole-object replace: the writer's current view with `path` set to
    /// `value` (or removed when `None`).
    Replace {
        actor: usize,
        path: Vec<&'static str>,
        value: Option<Value>,
    },
    /// List surgery at `path` (push, pop, or overwrite element 0).
    List {
        actor: usize,
        path: Vec<&'static str>,
        op: u8,
        value: Value,
    },
    /// Replica `to` receives every change replica `from` has.
    Sync { from: usize, to: usize },
}

fn step(writers: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..writers, path(), leaf()).prop_map(|(actor, path, value)| Step::Patch { actor, path, value }),
        3 => (0..writers, path(), prop::option::weighted(0.8, leaf()))
            .prop_map(|(actor, path, value)| Step::Replace { actor, path, value }),
        2 => (0..writers, path(), 0u8..3, leaf()).prop_map(|(actor, path, op, value)| Step::List { actor, path, op, value }),
        2 => (0..REPLICAS, 0..REPLICAS).prop_map(|(from, to)| Step::Sync { from, to }),
    ]
}

fn scenario() -> impl Strategy<Value = (Vec<Step>, u64)> {
    (2usize..=3)
        .prop_flat_map(|writers| (prop::collection::vec(step(writers), 1..12), any::<u64>()))
}

/// Set (or remove) the value at `path`, turning non-object intermediates into objects.
fn set_path(root: &mut Value, path: &[&str], value: Option<Value>) {
    let (last, init) = path.split_last().unwrap();
    let mut cur = root;
    for p in init {
        if !cur.is_object() {
            *cur = json!({});
        }
        cur = cur
            .as_object_mut()
            .unwrap()
            .entry(p.to_string())
            .or_insert(json!({}));
    }
    if !cur.is_object() {
        *cur = json!({});
    }
    let obj = cur.as_object_mut().unwrap();
    match value {
        Some(v) => {
            obj.insert(last.to_string(), v);
        }
        None => {
            obj.remove(*last);
        }
    }
}

fn get_path<'a>(root: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(root, |cur, p| cur.get(p))
}

struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

struct World {
    replicas: Vec<ObjectStore>,
    /// Change bytes each replica holds, in the order it got them (causal).
    known: Vec<Vec<Vec<u8>>>,
    /// Every change produced, once, in production order.
    all: Vec<Vec<u8>>,
}

impl World {
    fn new() -> Self {
        let mut creator = ObjectStore::new();
        let c0 = creator
            .edit_replace(KEY, &actor(0), &base())
            .unwrap()
            .unwrap();
        let mut replicas = vec![creator];
        for _ in 1..REPLICAS {
            let mut r = ObjectStore::new();
            assert_eq!(r.apply_change(KEY, &c0).unwrap(), Applied::New);
            replicas.push(r);
        }
        World {
            replicas,
            known: vec![vec![c0.clone()]; REPLICAS],
            all: vec![c0],
        }
    }

    fn record(&mut self, r: usize, change: Option<Vec<u8>>) {
        if let Some(c) = change {
            self.known[r].push(c.clone());
            self.all.push(c);
        }
    }

    fn run(&mut self, step: &Step) {
        match step {
            Step::Patch {
                actor: a,
                path,
                value,
            } => {
                let mut patch = json!({});
                set_path(&mut patch, path, Some(value.clone()));
                let c = self.replicas[*a]
                    .edit_merge_patch(KEY, &actor(*a), &patch)
                    .unwrap();
                self.record(*a, c);
            }
            Step::Replace {
                actor: a,
                path,
                value,
            } => {
                let mut v = self.replicas[*a].get_json(KEY).unwrap();
                set_path(&mut v, path, value.clone());
                let c = self.replicas[*a].edit_replace(KEY, &actor(*a), &v).unwrap();
                // A replace must leave exactly the requested value behind.
                assert_eq!(self.replicas[*a].get_json(KEY).unwrap(), v);
                self.record(*a, c);
            }
            Step::List {
                actor: a,
                path,
                op,
                value,
            } => {
                let mut v = self.replicas[*a].get_json(KEY).unwrap();
                let mut list = match get_path(&v, path) {
                    Some(Value::Array(l)) => l.clone(),
                    _ => vec![],
                };
                match op {
                    0 => list.push(value.clone()),
                    1 => {
                        list.pop();
                    }
                    _ => match list.first_mut() {
                        Some(first) => *first = value.clone(),
                        None => list.push(value.clone()),
                    },
                }
                set_path(&mut v, path, Some(Value::Array(list)));
                let c = self.replicas[*a].edit_replace(KEY, &actor(*a), &v).unwrap();
                assert_eq!(self.replicas[*a].get_json(KEY).unwrap(), v);
                self.record(*a, c);
            }
            Step::Sync { from, to } => {
                if from == to {
                    return;
                }
                for c in self.known[*from].clone() {
                    let applied = self.replicas[*to].apply_change(KEY, &c).unwrap();
                    assert!(
                        matches!(applied, Applied::New | Applied::Duplicate),
                        "causal sync gave {applied:?}"
                    );
                    if applied == Applied::New {
                        self.known[*to].push(c);
                    }
                }
            }
        }
    }
}

/// Everything observable about one object on one replica.
fn observe(store: &ObjectStore) -> (Value, String, Vec<[u8; 32]>) {
    let v = store.get_json(KEY).unwrap();
    let s = serde_json::to_string(&v).unwrap();
    let mut heads = store.heads(KEY);
    heads.sort();
    (v, s, heads)
}

fn merged(into: &ObjectStore, from: &ObjectStore) -> ObjectStore {
    let mut out = into.clone();
    out.load(KEY, &from.save(KEY).unwrap()).unwrap();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn crdt_laws((steps, seed) in scenario()) {
        let mut world = World::new();
        for s in &steps {
            world.run(s);
        }
        let mut rng = SplitMix(seed);

        // Reference: the union of all changes, applied in production order.
        let mut reference = ObjectStore::new();
        for c in &world.all {
            prop_assert_eq!(reference.apply_change(KEY, c).unwrap(), Applied::New);
        }
        let expected = observe(&reference);

        // Idempotence: every change again is a Duplicate and changes nothing.
        for c in &world.all {
            prop_assert_eq!(reference.apply_change(KEY, c).unwrap(), Applied::Duplicate);
        }
        prop_assert_eq!(&observe(&reference), &expected);

        // Commutativity + idempotence: shuffled delivery with duplicates.
        for _ in 0..3 {
            let mut delivery = world.all.clone();
            for _ in 0..rng.below(world.all.len() + 1) {
                let dup = world.all[rng.below(world.all.len())].clone();
                delivery.push(dup);
            }
            rng.shuffle(&mut delivery);
            let mut replica = ObjectStore::new();
            let mut applied_hashes = 0usize;
            for c in &delivery {
                match replica.apply_change(KEY, c).unwrap() {
                    Applied::New | Applied::Queued => applied_hashes += 1,
                    Applied::Duplicate => {}
                    Applied::Discarded => prop_assert!(false, "nothing was deleted"),
                    _ => prop_assert!(false, "unknown variant"),
                }
            }
            prop_assert_eq!(replica.queued(KEY), 0);
            // Each distinct change is counted once as New or Queued, unless a
            // duplicate of a still-queued change was delivered (Queued again).
            prop_assert!(applied_hashes >= world.all.len());
            prop_assert_eq!(&observe(&replica), &expected);
        }

        // Batched delivery (shuffled, with duplicates, in random-sized
        // batches) ends in the same object as one change at a time.
        let mut delivery = world.all.clone();
        for _ in 0..rng.below(world.all.len() + 1) {
            let dup = world.all[rng.below(world.all.len())].clone();
            delivery.push(dup);
        }
        rng.shuffle(&mut delivery);
        let mut batched = ObjectStore::new();
        let mut rest = &delivery[..];
        while !rest.is_empty() {
            let n = 1 + rng.below(rest.len());
            let (batch, tail) = rest.split_at(n);
            for r in batched.apply_changes(KEY, batch.iter().map(Vec::as_slice)) {
                prop_assert!(!matches!(r, Ok(Applied::Discarded) | Err(_)), "{:?}", r);
            }
            rest = tail;
        }
        prop_assert_eq!(batched.queued(KEY), 0);
        prop_assert_eq!(&observe(&batched), &expected);

        // Every writer's replica converges once it has everything.
        for r in 0..REPLICAS {
            for c in &world.all {
                world.replicas[r].apply_change(KEY, c).unwrap();
            }
        }
        for r in &world.replicas {
            prop_assert_eq!(&observe(r), &expected);
        }

        // Merge via save/load: associative, commutative, agrees with the union.
        let mut states: Vec<ObjectStore> = Vec::new();
        for known in &world.known {
            let mut s = ObjectStore::new();
            for c in known {
                s.apply_change(KEY, c).unwrap();
            }
            states.push(s);
        }
        let (a, b, c) = (&states[0], &states[1], &states[2]);
        let left = merged(&merged(a, b), c);
        let right = merged(a, &merged(b, c));
        prop_assert_eq!(observe(&left), observe(&right));
        prop_assert_eq!(observe(&merged(a, b)), observe(&merged(b, a)));
        prop_assert_eq!(&observe(&left), &expected);
        let mut union_ab = a.clone();
        for ch in &world.known[1] {
            union_ab.apply_change(KEY, ch).unwrap();
        }
        prop_assert_eq!(observe(&union_ab), observe(&merged(a, b)));

        // Folding shuffled changes gives a state that loads to the same JSON.
        let mut order = world.all.clone();
        rng.shuffle(&mut order);
        let mut state: Option<Vec<u8>> = None;
        for ch in &order {
            state = Some(fold_change(state.as_deref(), ch).unwrap());
        }
        let mut from_fold = ObjectStore::new();
        from_fold.load(KEY, &state.unwrap()).unwrap();
        prop_assert_eq!(from_fold.queued(KEY), 0);
        prop_assert_eq!(&observe(&from_fold), &expected);
    }
}
