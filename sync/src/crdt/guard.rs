//! Defences against hostile bytes: chunk splitting, structural checks of
//! changes, and a panic guard around automerge.
//!
//! automerge verifies a change's checksum and column encoding, but a
//! well-formed change with a valid checksum can still be semantically broken
//! (an op on an object that does not exist, a map key on a list, ...) and some
//! of those make automerge 0.12 panic instead of returning an error. Every
//! call that feeds foreign bytes or foreign changes into automerge therefore
//! goes through [`guarded`], and [`check_change`] rejects the common broken
//! shapes up front so that the guard is rarely needed.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};

use automerge::{Automerge, Change, ExpandedChange, ObjType};

use super::CrdtError;

/// Run `f`, turning a panic inside automerge into [`CrdtError::Panicked`].
/// Callers only ever let `f` mutate values they throw away on error (a clone
/// or a freshly loaded document), so no half-updated state survives a panic.
/// With `panic = "abort"` this guard cannot help; keel builds with unwinding.
pub(crate) fn guarded<T>(what: &'static str, f: impl FnOnce() -> T) -> Result<T, CrdtError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|_| {
        tracing::warn!(what, "automerge panicked on input; rejected");
        CrdtError::Panicked(what)
    })
}

/// Parse the bytes of one automerge change (plain or compressed chunk).
/// automerge's parser does not verify the chunk checksum (bytes 4..8: the
/// first 4 bytes of the change hash), so it is checked here: a corrupted
/// change must not be accepted as a different, "new" change.
pub(crate) fn parse_change(bytes: &[u8]) -> Result<Change, CrdtError> {
    // A compressed chunk would be inflated by automerge without a limit (a
    // few KiB can become gigabytes); keel never writes one.
    if bytes.get(..4) == Some(&MAGIC[..]) && bytes.get(8) == Some(&CHUNK_COMPRESSED) {
        return Err(CrdtError::Compressed);
    }
    let change = guarded("parsing a change", || Change::try_from(bytes))?
        .map_err(CrdtError::MalformedChange)?;
    if bytes.get(4..8) != change.hash().0.get(..4) {
        return Err(CrdtError::BadChecksum);
    }
    Ok(change)
}

/// The author of one change, from its header alone: the chunk must be one
/// uncompressed change chunk of exactly these bytes, and the author is the
/// actor named in its header, the one automerge attributes the change to.
/// Neither the checksum nor the ops are checked: both are, with every
/// other check, when the change is applied. This is the check on the sync
/// path, once per record received. There the record's chain hash has
/// already vouched for the bytes in transit, and a sender can seal any
/// bytes it likes with a valid checksum, so hashing the change once more
/// would refuse nothing that applying it does not.
pub(crate) fn header_actor(bytes: &[u8]) -> Result<&[u8], CrdtError> {
    header_unsealed(bytes).map(|h| h.actor)
}

/// [`header_unsealed`] of a change whose checksum matches its contents.
pub(crate) fn header(bytes: &[u8]) -> Result<Header<'_>, CrdtError> {
    use sha2::Digest;
    let h = header_unsealed(bytes)?;
    // The change hash: SHA-256 of type, length and body.
    let hash = sha2::Sha256::new()
        .chain_update(bytes.get(8..).unwrap_or_default())
        .finalize();
    if bytes.get(4..8) != hash.get(..4) {
        return Err(CrdtError::BadChecksum);
    }
    Ok(h)
}

/// A change's header: framing checked (one uncompressed change chunk of
/// exactly these bytes), then read up to the actor. The checksum is not.
fn header_unsealed(bytes: &[u8]) -> Result<Header<'_>, CrdtError> {
    let bad = |why: &'static str| CrdtError::MalformedHeader(why);
    if bytes.get(..4) != Some(&MAGIC[..]) {
        return Err(bad("bad magic bytes"));
    }
    let kind = *bytes.get(8).ok_or_else(|| bad("truncated chunk header"))?;
    match kind {
        CHUNK_CHANGE => {}
        CHUNK_COMPRESSED => return Err(CrdtError::Compressed),
        _ => return Err(bad("not a change chunk")),
    }
    let rest = bytes.get(9..).unwrap_or_default();
    let (len, rest) = uleb(rest).ok_or_else(|| bad("bad chunk length"))?;
    if usize::try_from(len).ok() != Some(rest.len()) {
        return Err(bad("chunk length does not match the bytes"));
    }
    let body = rest;
    let (deps, rest) = uleb(body).ok_or_else(|| bad("bad dependency count"))?;
    let deps = usize::try_from(deps).map_err(|_| bad("bad dependency count"))?;
    let rest = deps
        .checked_mul(32)
        .and_then(|n| rest.get(n..))
        .ok_or_else(|| bad("truncated dependencies"))?;
    let (actor_len, rest) = uleb(rest).ok_or_else(|| bad("bad actor length"))?;
    let n = usize::try_from(actor_len).map_err(|_| bad("truncated actor"))?;
    let (actor, rest) = rest
        .split_at_checked(n)
        .ok_or_else(|| bad("truncated actor"))?;
    Ok(Header { deps, actor, rest })
}

/// A change's header as far as [`header`] reads it.
pub(crate) struct Header<'a> {
    pub deps: usize,
    pub actor: &'a [u8],
    /// The body after the actor.
    rest: &'a [u8],
}

impl<'a> Header<'a> {
    /// The change's message (empty if none), read on from the actor.
    pub(crate) fn message(&self) -> Result<&'a [u8], CrdtError> {
        let bad = |why: &'static str| CrdtError::MalformedHeader(why);
        // seq and start_op (unsigned), time (signed): skipped.
        let rest = skip_leb(self.rest).ok_or_else(|| bad("bad seq"))?;
        let rest = skip_leb(rest).ok_or_else(|| bad("bad start op"))?;
        let rest = skip_leb(rest).ok_or_else(|| bad("bad time"))?;
        let (len, rest) = uleb(rest).ok_or_else(|| bad("bad message length"))?;
        usize::try_from(len)
            .ok()
            .and_then(|n| rest.get(..n))
            .ok_or_else(|| bad("truncated message"))
    }
}

/// What follows one LEB128 number (signed or not, at most ten bytes).
fn skip_leb(bytes: &[u8]) -> Option<&[u8]> {
    let end = bytes.iter().take(10).position(|b| b & 0x80 == 0)?;
    bytes.get(end + 1..)
}

/// One unsigned LEB128 number (at most 64 bits) and what follows it.
fn uleb(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value: u64 = 0;
    for (i, b) in bytes.iter().enumerate().take(10) {
        let bits = u64::from(b & 0x7f);
        let shift = 7 * u32::try_from(i).ok()?;
        if shift == 63 && bits > 1 {
            return None;
        }
        value |= bits << shift;
        if b & 0x80 == 0 {
            return Some((value, bytes.get(i + 1..).unwrap_or_default()));
        }
    }
    None
}

/// Parse saved state: zero or more document chunks and change chunks, in any
/// order (the output of `save`, of `fold_change`, or a concatenation of change
/// bytes). Returns the chunks in order; nothing is applied.
pub(crate) fn parse_state(bytes: &[u8]) -> Result<Vec<Chunk<'_>>, CrdtError> {
    let mut out = Vec::new();
    for (kind, raw) in split_chunks(bytes)? {
        match kind {
            CHUNK_DOCUMENT => {
                let doc = guarded("loading a document chunk", || Automerge::load(raw))?
                    .map_err(|e| CrdtError::MalformedSnapshot(e.to_string()))?;
                out.push(Chunk::Document(Box::new(doc), raw));
            }
            CHUNK_CHANGE => out.push(Chunk::Change(Box::new(parse_change(raw)?))),
            CHUNK_COMPRESSED => return Err(CrdtError::Compressed),
            other => {
                return Err(CrdtError::MalformedSnapshot(format!(
                    "unsupported chunk type {other}"
                )));
            }
        }
    }
    Ok(out)
}

#[derive(Debug)]
pub(crate) enum Chunk<'a> {
    /// A document, and the bytes of its chunk.
    Document(Box<Automerge>, &'a [u8]),
    Change(Box<Change>),
}

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_DOCUMENT: u8 = 0;
const CHUNK_CHANGE: u8 = 1;
const CHUNK_COMPRESSED: u8 = 2;

/// Split concatenated automerge chunks: each is `magic(4) checksum(4) type(1)
/// uleb128(len) body(len)`. Only framing is checked here; the contents are
/// verified by automerge when each chunk is parsed.
fn split_chunks(mut rest: &[u8]) -> Result<Vec<(u8, &[u8])>, CrdtError> {
    let bad = |why: &str| CrdtError::MalformedSnapshot(why.to_owned());
    let mut out = Vec::new();
    if rest.is_empty() {
        return Err(bad("empty input"));
    }
    while !rest.is_empty() {
        if rest.get(..4) != Some(&MAGIC[..]) {
            return Err(bad("bad magic bytes"));
        }
        let kind = *rest.get(8).ok_or_else(|| bad("truncated chunk header"))?;
        let mut len: u64 = 0;
        let mut header = 9usize;
        let mut shift = 0u32;
        loop {
            let b = *rest
                .get(header)
                .ok_or_else(|| bad("truncated chunk length"))?;
            header += 1;
            let bits = u64::from(b & 0x7f);
            if shift >= 64 || (shift == 63 && bits > 1) {
                return Err(bad("chunk length overflows"));
            }
            len |= bits << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let total = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_add(header))
            .ok_or_else(|| bad("chunk length overflows"))?;
        let chunk = rest
            .get(..total)
            .ok_or_else(|| bad("truncated chunk body"))?;
        out.push((kind, chunk));
        rest = rest.get(total..).unwrap_or_default();
    }
    Ok(out)
}

/// Rich-text marks have no place in a keel document (objects are JSON; text
/// is read as a plain string), and automerge 0.12 accepts a change whose mark
/// ends before it begins, then saves a document it cannot load again. So a
/// mark op is refused wherever a change is checked.
fn refuse_marks(i: usize, action: &automerge::legacy::OpType) -> Result<(), CrdtError> {
    use automerge::legacy::OpType;
    match action {
        OpType::MarkBegin(_) | OpType::MarkEnd(_) => Err(CrdtError::InvalidChange(format!(
            "op {i}: a rich-text mark (keel documents hold none)"
        ))),
        _ => Ok(()),
    }
}

/// The checks of [`check_change`] that need no document: for a change
/// whose dependencies are missing, kept aside until they arrive.
pub(crate) fn check_alone(change: &Change) -> Result<(), CrdtError> {
    let expanded: ExpandedChange = guarded("decoding a change", || change.decode())?;
    for (i, op) in expanded.operations.iter().enumerate() {
        refuse_marks(i, &op.action)?;
    }
    Ok(())
}

/// Structural checks of `change` against the document it is about to be
/// applied to (`None`: a fresh document): every op must target the root, an
/// object created earlier in the same change, or an object that exists in
/// `doc`; map keys only on maps, list positions only on lists/text; only list
/// ops may insert; no rich-text marks.
pub(crate) fn check_change(doc: Option<&Automerge>, change: &Change) -> Result<(), CrdtError> {
    check_in_batch(doc, change, &mut HashMap::new())
}

/// Objects created by the changes of a batch checked so far.
pub(crate) type Created = HashMap<automerge::legacy::OpId, ObjType>;

/// [`check_change`] for one change of a batch applied together: objects
/// created by earlier changes of the batch (recorded in `created`) count as
/// existing.
pub(crate) fn check_in_batch(
    doc: Option<&Automerge>,
    change: &Change,
    created: &mut Created,
) -> Result<(), CrdtError> {
    use automerge::legacy::{Key, ObjectId, OpId, OpType};

    let expanded: ExpandedChange = guarded("decoding a change", || change.decode())?;
    let invalid = |i: usize, why: String| CrdtError::InvalidChange(format!("op {i}: {why}"));
    let start = expanded.start_op.get();
    for (i, op) in expanded.operations.iter().enumerate() {
        refuse_marks(i, &op.action)?;
        let obj_type = match &op.obj {
            ObjectId::Root => Some(ObjType::Map),
            ObjectId::Id(id) => created.get(id).copied().or_else(|| {
                doc.and_then(|d| {
                    d.import(&format!("{}@{}", id.counter(), id.actor()))
                        .ok()
                        .map(|(_, t)| t)
                })
            }),
        };
        let Some(obj_type) = obj_type else {
            return Err(invalid(i, "targets an object that does not exist".into()));
        };
        let key_ok = match (&op.key, obj_type) {
            (Key::Map(_), ObjType::Map | ObjType::Table) => !op.insert,
            (Key::Seq(_), ObjType::List | ObjType::Text) => true,
            _ => false,
        };
        if !key_ok {
            return Err(invalid(
                i,
                format!("key {:?} does not fit a {obj_type:?}", op.key),
            ));
        }
        if let OpType::Make(t) = op.action {
            let counter = u64::try_from(i)
                .ok()
                .and_then(|i| start.checked_add(i))
                .ok_or_else(|| invalid(i, "op counter overflows".into()))?;
            created.insert(OpId(counter, expanded.actor_id.clone()), t);
        }
    }
    Ok(())
}
