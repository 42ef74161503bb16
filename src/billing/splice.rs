//! `_billing` into fal's JSON: inserted before the object's closing brace,
//! every other byte of fal's body left exactly as it was.

use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::push_json_string;

/// The figures a client sees for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Billing<'a> {
    pub model: &'a str,
    pub credits_used: u64,
    /// Exact decimal text (`0.012`), written into the JSON as a number.
    pub cost_usd: String,
    pub balance_remaining: i64,
}

impl Billing<'_> {
    fn write_json(&self, out: &mut String) {
        out.push_str("\"_billing\":{\"model\":");
        push_json_string(out, self.model);
        // Into `out` directly: a `format!` here was a second allocation per answer.
        let _ = write!(
            out,
            ",\"credits_used\":{},\"cost_usd\":{},\"balance_remaining\":{}}}",
            self.credits_used, self.cost_usd, self.balance_remaining
        );
    }
}

/// Returns `body` with `_billing` as its last field, or `None` when `body`
/// is not a JSON object (then it must be sent as it is). `body` is assumed
/// to be valid JSON; only its outer braces are looked at.
pub fn splice(body: &[u8], billing: &Billing) -> Option<Bytes> {
    let is_ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let open = body.iter().position(|b| !is_ws(b))?;
    let close = body.iter().rposition(|b| !is_ws(b))?;
    if body[open] != b'{' || body[close] != b'}' || close == open {
        return None;
    }
    let empty = body[open + 1..close].iter().all(is_ws);
    let mut field = String::with_capacity(128);
    if !empty {
        field.push(',');
    }
    billing.write_json(&mut field);
    let mut out = BytesMut::with_capacity(body.len() + field.len());
    out.put_slice(&body[..close]);
    out.put_slice(field.as_bytes());
    out.put_slice(&body[close..]);
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn billing() -> Billing<'static> {
        Billing {
            model: "fal-ai/flux/dev",
            credits_used: 12,
            cost_usd: "0.012".into(),
            balance_remaining: 4988,
        }
    }

    #[test]
    fn inserts_before_the_last_brace_and_touches_nothing_else() {
        let fal = b"{\"images\": [{\"url\": \"x}\"}],\n \"seed\": 42 }\n";
        let out = splice(fal, &billing()).unwrap();
        let expected = b"{\"images\": [{\"url\": \"x}\"}],\n \"seed\": 42 ,\"_billing\":{\"model\":\"fal-ai/flux/dev\",\"credits_used\":12,\"cost_usd\":0.012,\"balance_remaining\":4988}}\n";
        assert_eq!(&out[..], &expected[..]);
        let mut copy = out.to_vec();
        assert!(simd_json::to_borrowed_value(&mut copy).is_ok());
    }

    #[test]
    fn handles_empty_objects_and_refuses_non_objects() {
        let out = splice(b" {  } ", &billing()).unwrap();
        assert!(out.starts_with(b" {  \"_billing\":{"), "{out:?}");
        for not_object in [&b"[1,2]"[..], b"\"text\"", b"42", b"", b"   "] {
            assert!(splice(not_object, &billing()).is_none());
        }
    }
}
