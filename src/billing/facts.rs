//! What a fal request and a fal answer say about cost: image sizes and
//! counts, and video durations, read from the JSON fal's models use.
//!
//! A request's fields are read as fal's validation reads them ([`lax`]), so
//! that the hold is an upper bound of what fal runs; a field fal could read
//! in a way we cannot, or an absurd one, refuses the request instead.

use simd_json::prelude::*;
use simd_json::tape::Value;

use super::json::field;
use super::lax;
use crate::error::ApiError;

/// The most images one request may ask for. fal's models take a handful;
/// the bound keeps a hold finite, not fal's limit.
const MAX_IMAGES: i64 = 100;
/// The largest `image_size` width or height, in pixels.
const MAX_SIDE: i64 = 16_384;
/// The longest `duration`, in thousandths of a second (an hour).
const MAX_DURATION_MILLI: u64 = 3_600_000;

/// The request fields that bound a charge.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct RequestFacts {
    /// `image_size`, a preset or `{width, height}`.
    pub image_size: Option<(u64, u64)>,
    pub num_images: Option<u64>,
    /// `duration` in thousandths of a second, rounded up (`"5"`, `5`, `"5.5"`, `"8s"`).
    pub duration_milli: Option<u64>,
}

/// The images an answer returned, with their sizes where it gives them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ResponseFacts {
    pub images: Vec<Option<(u64, u64)>>,
}

/// fal's `image_size` presets.
pub fn preset(name: &str) -> Option<(u64, u64)> {
    Some(match name {
        "square_hd" => (1024, 1024),
        "square" => (512, 512),
        "portrait_4_3" => (768, 1024),
        "portrait_16_9" => (576, 1024),
        "landscape_4_3" => (1024, 768),
        "landscape_16_9" => (1024, 576),
        _ => return None,
    })
}

/// A preset, or `{width, height}`.
fn size(v: Value) -> Result<(u64, u64), ApiError> {
    if let Some(name) = v.as_str() {
        return preset(name).ok_or_else(|| {
            invalid(
                "image_size",
                "one of fal's presets (square_hd, square, portrait_4_3, portrait_16_9, landscape_4_3, landscape_16_9) or {width, height}",
            )
        });
    }
    let side = |key: &str, name: &str| match field(v, key) {
        Some(n) => count(n, name, MAX_SIDE),
        None => Err(invalid("image_size", "a preset or {width, height}")),
    };
    Ok((
        side("width", "image_size.width")?,
        side("height", "image_size.height")?,
    ))
}

/// A lax integer from 1 to `max`.
fn count(v: Value, name: &str, max: i64) -> Result<u64, ApiError> {
    lax::int(&v)
        .filter(|n| (1..=max).contains(n))
        .map(|n| n as u64)
        .ok_or_else(|| invalid(name, &format!("an integer from 1 to {max}")))
}

fn duration_milli(v: Value) -> Result<u64, ApiError> {
    lax::seconds_milli(&v)
        .filter(|m| (1..=MAX_DURATION_MILLI).contains(m))
        .ok_or_else(|| {
            let most = MAX_DURATION_MILLI / 1000;
            invalid(
                "duration",
                &format!("a number of seconds above 0 and at most {most}"),
            )
        })
}

fn invalid(name: &str, expected: &str) -> ApiError {
    ApiError::InvalidInput(format!("`{name}` must be {expected}"))
}

impl RequestFacts {
    /// Every cost field at the smallest value fal's validation (and ours)
    /// accepts: no request can be held for less, bar one with defaults
    /// that are smaller still.
    pub const SMALLEST: RequestFacts = RequestFacts {
        image_size: Some((1, 1)),
        num_images: Some(1),
        duration_milli: Some(1),
    };

    /// A compact text form (`width,height,num_images,duration_milli`, empty
    /// for absent) for a queued job's row: its price is decided later.
    pub fn encode(&self) -> String {
        let field = |v: Option<u64>| v.map_or(String::new(), |n| n.to_string());
        let (w, h) = self.image_size.unzip();
        format!(
            "{},{},{},{}",
            field(w),
            field(h),
            field(self.num_images),
            field(self.duration_milli)
        )
    }

    pub fn decode(text: &str) -> Self {
        let mut f = text.split(',').map(|v| v.parse::<u64>().ok());
        let mut next = || f.next().flatten();
        let (w, h) = (next(), next());
        Self {
            image_size: w.zip(h),
            num_images: next(),
            duration_milli: next(),
        }
    }

    /// The cost fields of a request body; a `null` one is absent (fal's default).
    pub fn read(v: Value) -> Result<Self, ApiError> {
        let given = |key| field(v, key).filter(|f| !f.is_null());
        Ok(Self {
            image_size: given("image_size").map(size).transpose()?,
            num_images: given("num_images")
                .map(|n| count(n, "num_images", MAX_IMAGES))
                .transpose()?,
            duration_milli: given("duration").map(duration_milli).transpose()?,
        })
    }
}

impl ResponseFacts {
    /// `images[]`, or the single `image` object that upscalers and editors return.
    pub fn read(v: Value) -> Self {
        let side = |img: Value, key| field(img, key)?.as_u64();
        let one = |img: Value| Some((side(img, "width")?, side(img, "height")?));
        // Not `get_array`: simd-json 0.14's tape version cuts the array's last node off.
        let images = match (
            field(v, "images").and_then(|a| a.as_array()),
            field(v, "image"),
        ) {
            (Some(list), _) => list.iter().map(one).collect(),
            (None, Some(img)) if img.is_object() => vec![one(img)],
            _ => Vec::new(),
        };
        Self { images }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> RequestFacts {
        try_request(json).unwrap()
    }

    fn try_request(json: &str) -> Result<RequestFacts, ApiError> {
        crate::billing::json::read(json.as_bytes(), RequestFacts::read).unwrap()
    }

    fn response(json: &str) -> ResponseFacts {
        crate::billing::json::read(json.as_bytes(), ResponseFacts::read).unwrap()
    }

    #[test]
    fn reads_request_fields_in_every_spelling() {
        let r = request(r#"{"image_size":"portrait_16_9","num_images":3}"#);
        assert_eq!(r.image_size, Some((576, 1024)));
        assert_eq!(r.num_images, Some(3));
        // A repeated key counts as fal reads it: the last one.
        let r = request(r#"{"num_images":1,"image_size":"square","num_images":4}"#);
        assert_eq!(r.num_images, Some(4));
        let r = request(r#"{"image_size":{"width":1025,"height":1024}}"#);
        assert_eq!(r.image_size, Some((1025, 1024)));
        // Spelled as fal's validation accepts them: the same numbers.
        let r = request(r#"{"image_size":{"width":"1025","height":1024.0},"num_images":" 4 "}"#);
        assert_eq!((r.image_size, r.num_images), (Some((1025, 1024)), Some(4)));
        assert_eq!(request(r#"{"num_images":true}"#).num_images, Some(1));
        // A key is matched once unescaped, as fal's JSON parser unescapes it.
        assert_eq!(request(r#"{"num\u005fimages":3}"#).num_images, Some(3));
        assert_eq!(request(r#"{"num_images":null}"#), RequestFacts::default());
        for (d, milli) in [
            (r#""5""#, 5000),
            ("10", 10_000),
            (r#""8s""#, 8000),
            (r#""5.5""#, 5500),
            ("2.25", 2250),
            (r#""1.2345""#, 1235),
            ("3600", 3_600_000),
        ] {
            let r = request(&format!(r#"{{"duration":{d}}}"#));
            assert_eq!(r.duration_milli, Some(milli), "{d}");
        }
        // Present but unreadable, out of range or absurd: refused, never the default.
        for bad in [
            r#"{"duration":"five"}"#,
            r#"{"duration":"-1"}"#,
            r#"{"duration":-3}"#,
            r#"{"duration":0}"#,
            r#"{"duration":3600.001}"#,
            r#"{"num_images":0}"#,
            r#"{"num_images":101}"#,
            r#"{"num_images":2305843009213693952}"#,
            r#"{"num_images":4.5}"#,
            r#"{"num_images":"4 images"}"#,
            r#"{"num_images":{}}"#,
            r#"{"image_size":"huge"}"#,
            r#"{"image_size":7}"#,
            r#"{"image_size":{"width":1024}}"#,
            r#"{"image_size":{"width":16385,"height":1}}"#,
        ] {
            let err = try_request(bad).unwrap_err();
            assert_eq!(err.error_type(), "invalid_input", "{bad}");
        }
        // Not an object: no cost fields, fal's defaults (fal refuses such input anyway).
        assert_eq!(request("[1, 2]"), RequestFacts::default());
    }

    #[test]
    fn encodes_and_decodes_for_storage() {
        for facts in [
            RequestFacts::default(),
            RequestFacts {
                image_size: Some((1025, 1024)),
                num_images: Some(2),
                duration_milli: None,
            },
            RequestFacts {
                image_size: None,
                num_images: None,
                duration_milli: Some(5500),
            },
        ] {
            assert_eq!(RequestFacts::decode(&facts.encode()), facts);
        }
    }

    #[test]
    fn reads_images_or_the_single_image() {
        let r = response(r#"{"images":[{"width":1024,"height":768},{"url":"x"}]}"#);
        assert_eq!(r.images, vec![Some((1024, 768)), None]);
        let r = response(r#"{"image":{"width":2048,"height":2048}}"#);
        assert_eq!(r.images, vec![Some((2048, 2048))]);
        assert!(response(r#"{"video":{}}"#).images.is_empty());
    }
}
