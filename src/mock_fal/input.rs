//! A model's input as fal validates it: the body is JSON whatever its
//! content type, and the fields that decide what fal produces are coerced as
//! pydantic's lax mode coerces them. What the mock serves follows from this,
//! so a test can price what "fal" ran from the requests it recorded.

use simd_json::prelude::*;
use simd_json::OwnedValue;

use crate::billing::facts::preset;
use crate::billing::lax;

/// The most images one of the mock's models makes in a call (fal's own
/// models take a handful; this only keeps a hostile input from exhausting the mock).
const MAX_IMAGES: i64 = 100;
/// The largest image side the mock's models accept.
const MAX_SIDE: i64 = 16_384;

/// What a model is asked to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    pub num_images: u64,
    pub image_size: (u64, u64),
    /// Seconds of video in thousandths, where the request gives a duration.
    pub duration_milli: Option<u64>,
    /// `"mock_billed_units": N`: fal bills N units (in thousandths) for the
    /// call, whatever it would count, so that tests can make fal's books
    /// and ours disagree.
    pub billed_units_milli: Option<u64>,
}

impl Default for Input {
    /// fal's defaults: one `landscape_4_3` image.
    fn default() -> Self {
        Self {
            num_images: 1,
            image_size: (1024, 768),
            duration_milli: None,
            billed_units_milli: None,
        }
    }
}

impl Input {
    /// The input fal would run for `body`, or why fal would refuse it (a 422).
    /// An empty body takes every default.
    pub fn read(body: &[u8]) -> Result<Self, String> {
        let mut input = Self::default();
        if body.is_empty() {
            return Ok(input);
        }
        let mut copy = body.to_vec();
        let v = simd_json::to_owned_value(&mut copy)
            .map_err(|_| "the body is not valid JSON".to_owned())?;
        let given = |key: &str| v.get(key).filter(|f| !f.is_null());
        if let Some(n) = given("num_images") {
            input.num_images = whole(n, "num_images", MAX_IMAGES)?;
        }
        if let Some(size) = given("image_size") {
            input.image_size = match size.as_str() {
                Some(name) => preset(name).ok_or("image_size: unknown preset")?,
                None => (
                    whole(
                        size.get("width").ok_or("image_size: no width")?,
                        "width",
                        MAX_SIDE,
                    )?,
                    whole(
                        size.get("height").ok_or("image_size: no height")?,
                        "height",
                        MAX_SIDE,
                    )?,
                ),
            };
        }
        input.billed_units_milli = given("mock_billed_units")
            .and_then(|n| n.cast_f64())
            .filter(|n| n.is_finite() && *n >= 0.0)
            .map(|n| (n * 1000.0).round() as u64);
        if let Some(d) = given("duration") {
            let milli = lax::seconds_milli(d).filter(|&m| m > 0);
            input.duration_milli = Some(milli.ok_or("duration: not a positive number of seconds")?);
        }
        Ok(input)
    }
}

/// A lax integer from 1 to `max`.
fn whole(v: &OwnedValue, field: &str, max: i64) -> Result<u64, String> {
    lax::int(v)
        .filter(|n| (1..=max).contains(n))
        .map(|n| n as u64)
        .ok_or_else(|| format!("{field}: not an integer from 1 to {max}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_fal_would_run() {
        let read = |body: &str| Input::read(body.as_bytes());
        assert_eq!(read(""), Ok(Input::default()));
        assert_eq!(read("{}"), Ok(Input::default()));
        for n in [r#""4""#, "4.0", "4", r#"" 4 ""#] {
            assert_eq!(
                read(&format!(r#"{{"num_images":{n}}}"#))
                    .unwrap()
                    .num_images,
                4
            );
        }
        let sized = read(r#"{"image_size":{"width":"1025","height":1024.0}}"#).unwrap();
        assert_eq!(sized.image_size, (1025, 1024));
        assert_eq!(
            read(r#"{"duration":"10"}"#).unwrap().duration_milli,
            Some(10_000)
        );
        for bad in [
            "not json",
            r#"{"num_images":0}"#,
            r#"{"num_images":2305843009213693952}"#,
            r#"{"num_images":"many"}"#,
            r#"{"image_size":"huge"}"#,
            r#"{"image_size":{"width":10}}"#,
            r#"{"duration":"-5"}"#,
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
    }
}
