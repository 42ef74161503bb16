//! Stripe's webhook signature, checked as Stripe documents it: the header
//! `Stripe-Signature: t=<unix seconds>,v1=<hex>,v1=<hex>,…`; each `v1` is
//! HMAC-SHA256 of `"{t}.{raw body}"` under the endpoint's secret. Any one
//! `v1` may match (several during a secret's rotation); the timestamp may
//! be no older than the tolerance; the comparison takes constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Stripe's libraries' default tolerance.
pub const TOLERANCE_SECS: i64 = 300;

/// Why a signature was refused; each is the client's 400.
pub fn verify(header: &str, body: &[u8], secret: &[u8], now_secs: i64) -> Result<(), &'static str> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for item in header.split(',') {
        match item.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", v1)) => signatures.push(v1),
            _ => {}
        }
    }
    let Some(t) = timestamp else {
        return Err("no timestamp");
    };
    if signatures.is_empty() {
        return Err("no v1 signature");
    }
    // Too old, as Stripe's own libraries check it: a timestamp ahead of our
    // clock passes, so a clock running behind does not refuse every event.
    // Saturating: a client's `t` may be anything, i64::MIN included.
    if now_secs.saturating_sub(t) > TOLERANCE_SECS {
        return Err("timestamp outside the tolerance");
    }
    let expected = hex(&sign(secret, t, body));
    let matched = signatures.iter().fold(subtle::Choice::from(0), |any, v1| {
        any | expected.as_bytes().ct_eq(v1.as_bytes())
    });
    if bool::from(matched) {
        Ok(())
    } else {
        Err("no signature matches")
    }
}

/// HMAC-SHA256 of `"{t}.{body}"`.
pub fn sign(secret: &[u8], t: i64, body: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_test";

    fn header(t: i64, body: &[u8]) -> String {
        format!("t={t},v1={}", hex(&sign(SECRET, t, body)))
    }

    #[test]
    fn a_signature_stripe_would_send_is_accepted_and_anything_else_refused() {
        let body = br#"{"id":"evt_1"}"#;
        assert_eq!(verify(&header(1000, body), body, SECRET, 1000), Ok(()));
        // Any one of several v1 values, and v0 ignored.
        let several = format!("t=1000,v0=abc,v1=00,{}", &header(1000, body)[7..]);
        assert_eq!(verify(&several, body, SECRET, 1100), Ok(()));
        assert!(verify(&header(1000, body), b"{\"id\":\"evt_2\"}", SECRET, 1000).is_err());
        assert!(verify(&header(1000, body), body, b"whsec_other", 1000).is_err());
        assert!(verify(&header(1000, body), body, SECRET, 1000 + TOLERANCE_SECS + 1).is_err());
        assert_eq!(
            verify(&header(1000, body), body, SECRET, 1000 - TOLERANCE_SECS - 1),
            Ok(())
        );
        assert!(verify("v1=00", body, SECRET, 1000).is_err());
        assert!(verify("t=1000", body, SECRET, 1000).is_err());
        assert!(verify("", body, SECRET, 1000).is_err());
    }

    #[test]
    fn any_timestamp_a_client_sends_is_refused_without_a_panic() {
        let body = br#"{"id":"evt_1"}"#;
        for t in [
            "-9223372036854775808",
            "9223372036854775807",
            "99999999999999999999",
            "1e3",
            " ",
            "",
        ] {
            assert!(
                verify(&format!("t={t},v1=00"), body, SECRET, 1000).is_err(),
                "{t}"
            );
        }
        assert!(verify("t=1000,t=x,v1=00", body, SECRET, 1000).is_err());
        assert!(verify("t=1000,v1=", body, SECRET, 1000).is_err());
    }
}
