//! What fal says about a call it answered: its own request id (how our
//! ledger meets fal's billing records) and, where fal reports them, the
//! units it billed. Kept with the charge beside the units we metered; never
//! used to price it.

use http::header::{HeaderMap, HeaderName};

use super::decimal::parse_scaled;

/// fal's id for a request its app received: only fal's app sends one.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-fal-request-id");
/// Units fal billed for the call, in the endpoint's priced unit (not
/// documented by fal; recorded where present).
pub const BILLABLE_UNITS: HeaderName = HeaderName::from_static("x-fal-billable-units");

/// The longest request id kept: fal's are UUIDs.
const MAX_ID: usize = 128;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FalReceipt {
    pub request_id: Option<String>,
    /// Thousandths of fal's unit, as our `units_milli`.
    pub units_milli: Option<u64>,
}

impl FalReceipt {
    /// What fal's answer headers say. A value that is not a plain id or
    /// number is left out: it goes into journal lines and reports.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
        Self {
            request_id: text(REQUEST_ID).and_then(request_id),
            units_milli: text(BILLABLE_UNITS).and_then(units_milli),
        }
    }

    /// A queued job's: fal's `request_id` for it.
    pub fn job(request_id: &str) -> Self {
        Self {
            request_id: self::request_id(request_id),
            units_milli: None,
        }
    }

    /// What fal reported later (a queued job's result) fills what is missing.
    pub fn merge(&mut self, later: FalReceipt) {
        self.request_id = self.request_id.take().or(later.request_id);
        self.units_milli = later.units_milli.or(self.units_milli);
    }
}

/// `id` if it is a plausible fal request id: visible ASCII, no separators
/// our journal or reports use.
pub fn request_id(id: &str) -> Option<String> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    ok.then(|| id.to_owned())
}

/// A non-negative decimal with at most three places, in thousandths.
pub fn units_milli(text: &str) -> Option<u64> {
    parse_scaled(text.trim(), 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_fal_sends_and_nothing_else() {
        let mut h = HeaderMap::new();
        h.insert(
            REQUEST_ID,
            "0b7c1d2e-3f40-4a5b-8c6d-7e8f9a0b1c2d".parse().unwrap(),
        );
        h.insert(BILLABLE_UNITS, "2.5".parse().unwrap());
        let r = FalReceipt::from_headers(&h);
        assert_eq!(
            r.request_id.as_deref(),
            Some("0b7c1d2e-3f40-4a5b-8c6d-7e8f9a0b1c2d")
        );
        assert_eq!(r.units_milli, Some(2500));
        h.insert(REQUEST_ID, "a\tb".parse().unwrap());
        h.insert(BILLABLE_UNITS, "1e3".parse().unwrap());
        assert_eq!(FalReceipt::from_headers(&h), FalReceipt::default());
        assert_eq!(units_milli("3"), Some(3000));
        assert_eq!(units_milli("0.001"), Some(1));
        assert_eq!(units_milli("0.0001"), None);
        assert_eq!(units_milli("-1"), None);
        assert_eq!(units_milli("99999999999999999999"), None);
        assert_eq!(request_id(&"x".repeat(129)), None);
    }
}
