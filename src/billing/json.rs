//! Reading a JSON body on the request path: simd-json's tape (a flat list
//! of nodes, no maps built) on buffers each thread keeps between calls, so
//! a request's body and fal's answer are read without allocating. Building
//! a `BorrowedValue` for each was about 7% of the proxy's CPU under load
//! (BENCHMARKS.md).

use std::cell::RefCell;

use simd_json::tape::{Tape, Value};
use simd_json::Buffers;

/// Buffers grown past this by one large body are freed after it, so that a
/// rare large body does not stay resident on every worker thread.
const KEEP_BYTES: usize = 256 * 1024;

struct Scratch {
    /// The copy simd-json parses: it rewrites its input in place, and the
    /// caller's bytes are forwarded as they are.
    input: Vec<u8>,
    buffers: Buffers,
    /// Empty between calls; `Tape::reset` frees it of the last input's lifetime.
    tape: Tape<'static>,
}

impl Scratch {
    fn new() -> Self {
        Self {
            input: Vec::new(),
            buffers: Buffers::default(),
            tape: Tape(Vec::new()),
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::new());
}

/// Parses `bytes` and hands the document to `read`.
pub fn read<T>(bytes: &[u8], read: impl FnOnce(Value<'_, '_>) -> T) -> simd_json::Result<T> {
    SCRATCH.with(|cell| {
        let Ok(mut scratch) = cell.try_borrow_mut() else {
            // Only if `read` itself parsed JSON: fresh buffers for the inner call.
            return read_with(&mut Scratch::new(), bytes, read);
        };
        let result = read_with(&mut scratch, bytes, read);
        if scratch.input.capacity() > KEEP_BYTES {
            *scratch = Scratch::new();
        }
        result
    })
}

/// The member `key` of an object; where the key repeats, the last one, as
/// fal's JSON parser (and the value tree this replaced) reads it. The
/// tape's own `get` takes the first, which would let a request be
/// estimated on a different value than fal runs it with.
pub fn field<'t, 'i>(object: Value<'t, 'i>, key: &str) -> Option<Value<'t, 'i>> {
    let mut found = None;
    for (k, v) in object.as_object()?.iter() {
        if k == key {
            found = Some(v);
        }
    }
    found
}

fn read_with<T>(
    scratch: &mut Scratch,
    bytes: &[u8],
    read: impl FnOnce(Value<'_, '_>) -> T,
) -> simd_json::Result<T> {
    let Scratch {
        input,
        buffers,
        tape,
    } = scratch;
    input.clear();
    input.extend_from_slice(bytes);
    let mut parsed = std::mem::replace(tape, Tape(Vec::new())).reset();
    let result =
        simd_json::fill_tape(input, buffers, &mut parsed).map(|()| read(parsed.as_value()));
    *tape = parsed.reset();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use simd_json::prelude::*;

    #[test]
    fn reads_documents_one_after_another_on_the_same_buffers() {
        let long = format!(r#"{{"a":"{}","n":7}}"#, "x".repeat(KEEP_BYTES * 2));
        for doc in [r#"{"a":"b\"c","n":1}"#, long.as_str(), r#"{"n":3}"#] {
            let n = read(doc.as_bytes(), |v| v.get_u64("n")).unwrap();
            assert!(n.is_some(), "{doc:.40}");
        }
        assert_eq!(
            read(br#"{"a":"b\"c"}"#, |v| v.get_str("a").map(str::to_owned)).unwrap(),
            Some("b\"c".to_owned())
        );
        assert!(read(br#"{"a":"#, |_| ()).is_err());
        let last = read(br#"{"n":1,"m":{"n":5},"n":2}"#, |v| {
            field(v, "n").and_then(|n| n.as_u64())
        });
        assert_eq!(last.unwrap(), Some(2));
        // Nested use (a reader that parses again) works on buffers of its own.
        let inner = read(br#"{"x":1}"#, |_| read(br#"{"y":2}"#, |v| v.get_u64("y")));
        assert_eq!(inner.unwrap().unwrap(), Some(2));
    }
}
