//! What a fal request and a fal answer say about cost: image sizes and
//! counts, and video durations, read from the JSON fal's models use.

use simd_json::prelude::*;
use simd_json::tape::Value;

use super::json::field;

/// The request fields that bound a charge.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct RequestFacts {
    /// `image_size`, a preset or `{width, height}`.
    pub image_size: Option<(u64, u64)>,
    pub num_images: Option<u64>,
    /// `duration` in thousandths of a second (`"5"`, `5`, `"5.5"`, `"8s"`).
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

fn size(v: Value) -> Option<(u64, u64)> {
    match v.as_str() {
        Some(name) => preset(name),
        None => Some((u64_field(v, "width")?, u64_field(v, "height")?)),
    }
}

fn u64_field(v: Value, key: &str) -> Option<u64> {
    field(v, key)?.as_u64()
}

/// Seconds as thousandths, from a number or a string such as `"5"`, `"5.5"` or `"8s"`.
fn duration_milli(v: Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return n.checked_mul(1000);
    }
    if let Some(f) = v.as_f64() {
        return crate::billing::decimal::to_scaled(f, 3).ok();
    }
    let text = v.as_str()?.trim().trim_end_matches('s');
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    if frac.len() > 3 || !whole.bytes().all(|b| b.is_ascii_digit()) || whole.is_empty() {
        return None;
    }
    let frac_milli: u64 = format!("{frac:0<3}").parse().ok()?;
    whole
        .parse::<u64>()
        .ok()?
        .checked_mul(1000)?
        .checked_add(frac_milli)
}

impl RequestFacts {
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

    pub fn read(v: Value) -> Self {
        Self {
            image_size: field(v, "image_size").and_then(size),
            num_images: u64_field(v, "num_images"),
            duration_milli: field(v, "duration").and_then(duration_milli),
        }
    }
}

impl ResponseFacts {
    /// `images[]`, or the single `image` object that upscalers and editors return.
    pub fn read(v: Value) -> Self {
        let one = |img: Value| Some((u64_field(img, "width")?, u64_field(img, "height")?));
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
        for (d, milli) in [
            (r#""5""#, 5000),
            ("10", 10_000),
            (r#""8s""#, 8000),
            (r#""5.5""#, 5500),
            ("2.25", 2250),
        ] {
            let r = request(&format!(r#"{{"duration":{d}}}"#));
            assert_eq!(r.duration_milli, Some(milli), "{d}");
        }
        for bad in [r#""five""#, r#""-1""#, r#""1.2345""#, "-3"] {
            let r = request(&format!(r#"{{"duration":{bad}}}"#));
            assert_eq!(r.duration_milli, None, "{bad}");
        }
        assert_eq!(request(r#"{"image_size":"huge"}"#).image_size, None);
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
