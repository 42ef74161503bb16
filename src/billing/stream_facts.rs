//! What an answer too large to buffer says about cost, read as it streams
//! past a chunk at a time: the same facts as [`ResponseFacts::read`] (the
//! sizes in `images[]`, or of the single `image`), without holding the
//! document. A client can make an answer large at will (`sync_mode` inlines
//! images as base64), so a large answer must cost what a small one does.

use super::facts::ResponseFacts;

/// Where a container sits in the answer, as far as cost is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The answer itself.
    Root,
    /// The root's `images` array.
    Images,
    /// One image: an element of `images`, or the root's `image`.
    Image,
    Other,
}

/// The key whose value comes next, in an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    None,
    Images,
    Image,
    Width,
    Height,
    Other,
}

/// Where a string is in an escape (`\n`, `\u0077`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    /// Right after the `\`.
    Started,
    /// In `\uXXXX`, with the hex digits read so far and their value.
    Unicode {
        digits: u8,
        value: u32,
    },
}

struct Frame {
    object: bool,
    role: Role,
    key: Key,
    expect_key: bool,
    /// A key was read; its `:` has not come yet.
    expect_colon: bool,
    width: Option<u64>,
    height: Option<u64>,
}

/// Longest key worth reading: the ones that matter are shorter.
const KEY_MAX: usize = 8;
/// Longest number worth reading (a `u64` has 20 digits).
const NUMBER_MAX: usize = 24;

pub struct FactScanner {
    stack: Vec<Frame>,
    in_string: bool,
    escape: Escape,
    string_is_key: bool,
    key: Vec<u8>,
    /// A number being read, if its value may matter.
    number: Option<Vec<u8>>,
    /// Inside `true`, `false`, `null` or a number that does not matter.
    in_scalar: bool,
    images: Option<Vec<Option<(u64, u64)>>>,
    image: Option<Option<(u64, u64)>>,
    /// The root closed: anything but white space after it is not JSON.
    done: bool,
    broken: bool,
}

impl Default for FactScanner {
    fn default() -> Self {
        Self {
            stack: Vec::new(),
            in_string: false,
            escape: Escape::None,
            string_is_key: false,
            key: Vec::with_capacity(KEY_MAX),
            number: None,
            in_scalar: false,
            images: None,
            image: None,
            done: false,
            broken: false,
        }
    }
}

impl FactScanner {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.broken {
                return;
            }
            self.byte(b);
        }
    }

    /// The facts, if what was fed is one JSON object, read whole.
    pub fn finish(mut self) -> Option<ResponseFacts> {
        self.end_scalar();
        if self.broken || !self.done {
            return None;
        }
        let images = match (self.images, self.image) {
            (Some(list), _) => list,
            (None, Some(one)) => vec![one],
            (None, None) => Vec::new(),
        };
        Some(ResponseFacts { images })
    }

    fn byte(&mut self, b: u8) {
        if self.in_string {
            self.string_byte(b);
            return;
        }
        if self.in_scalar || self.number.is_some() {
            if b.is_ascii_alphanumeric() || b"+-.".contains(&b) {
                if let Some(n) = &mut self.number {
                    if n.len() < NUMBER_MAX {
                        n.push(b);
                    }
                }
                return;
            }
            self.end_scalar();
        }
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => {}
            _ if self.done => self.broken = true,
            b'{' => self.open(true),
            b'[' => self.open(false),
            b'}' => self.close(true),
            b']' => self.close(false),
            b'"' => {
                let is_key = self.stack.last().is_some_and(|f| f.object && f.expect_key);
                if !is_key {
                    self.value_starts(false);
                }
                self.in_string = true;
                self.string_is_key = is_key;
                self.key.clear();
            }
            b':' => match self.stack.last_mut() {
                Some(f) if f.expect_colon => f.expect_colon = false,
                _ => self.broken = true,
            },
            b',' => match self.stack.last_mut() {
                Some(f) if f.object => {
                    f.expect_key = true;
                    f.key = Key::None;
                }
                Some(_) => {}
                None => self.broken = true,
            },
            b'-' | b'0'..=b'9' => {
                self.value_starts(false);
                let matters = self.stack.last().is_some_and(|f| {
                    f.role == Role::Image && matches!(f.key, Key::Width | Key::Height)
                });
                if matters {
                    self.number = Some(vec![b]);
                } else {
                    self.in_scalar = true;
                }
            }
            b't' | b'f' | b'n' => {
                self.value_starts(false);
                self.in_scalar = true;
            }
            _ => self.broken = true,
        }
    }

    fn string_byte(&mut self, b: u8) {
        match self.escape {
            Escape::None => {}
            Escape::Started => {
                self.escape = Escape::None;
                if b == b'u' {
                    self.escape = Escape::Unicode {
                        digits: 0,
                        value: 0,
                    };
                } else {
                    // `\"`, `\\`, `\/` and the control characters: never a letter.
                    self.key_byte(b'\\');
                }
                return;
            }
            Escape::Unicode { digits, value } => {
                let Some(digit) = (b as char).to_digit(16) else {
                    // Not JSON; the byte is read as if the escape had ended.
                    self.escape = Escape::None;
                    self.key_byte(0x80);
                    return self.string_byte(b);
                };
                let value = value << 4 | digit;
                if digits < 3 {
                    self.escape = Escape::Unicode {
                        digits: digits + 1,
                        value,
                    };
                } else {
                    // A key is matched once unescaped, as simd-json (and fal)
                    // unescape it: `\u0077idth` is `width`. Anything beyond
                    // ASCII matches no key of ours.
                    self.escape = Escape::None;
                    self.key_byte(
                        u8::try_from(value)
                            .ok()
                            .filter(u8::is_ascii)
                            .unwrap_or(0x80),
                    );
                }
                return;
            }
        }
        match b {
            b'\\' => self.escape = Escape::Started,
            b'"' => {
                self.in_string = false;
                if self.string_is_key {
                    let key = match self.key.as_slice() {
                        b"images" => Key::Images,
                        b"image" => Key::Image,
                        b"width" => Key::Width,
                        b"height" => Key::Height,
                        _ => Key::Other,
                    };
                    if let Some(f) = self.stack.last_mut() {
                        f.key = key;
                        f.expect_key = false;
                        f.expect_colon = true;
                    }
                }
            }
            _ => self.key_byte(b),
        }
    }

    /// A character of the key being read, unescaped; beyond `KEY_MAX` it
    /// only matters that there are more.
    fn key_byte(&mut self, b: u8) {
        if self.string_is_key && self.key.len() <= KEY_MAX {
            self.key.push(b);
        }
    }

    /// A value begins in the current container; `container` if it is an object or array.
    fn value_starts(&mut self, container: bool) {
        let Some(f) = self.stack.last_mut() else {
            // Only an object is an answer we price.
            if !container {
                self.broken = true;
            }
            return;
        };
        if f.object && (f.expect_key || f.expect_colon) {
            self.broken = true;
            return;
        }
        // An element of `images` that is not an object is an image of
        // unknown size (an array opening here says so by `container` being
        // set while the frame to come is no object: see `open`).
        if !container && !f.object && f.role == Role::Images {
            if let Some(list) = &mut self.images {
                list.push(None);
            }
        }
        // A size given again counts as its last value, read or not.
        if f.object && f.role == Role::Image {
            match f.key {
                Key::Width => f.width = None,
                Key::Height => f.height = None,
                _ => {}
            }
        }
        // A repeated key counts as its last occurrence.
        if f.object && f.role == Role::Root {
            match f.key {
                Key::Images => self.images = None,
                Key::Image => self.image = None,
                _ => {}
            }
        }
    }

    fn open(&mut self, object: bool) {
        self.value_starts(true);
        if self.broken {
            return;
        }
        if !object && self.stack.last().is_some_and(|f| f.role == Role::Images) {
            if let Some(list) = &mut self.images {
                list.push(None);
            }
        }
        let role = match self.stack.last() {
            None if object => Role::Root,
            None => {
                self.broken = true;
                return;
            }
            Some(f) => match (f.role, f.key, object, f.object) {
                (Role::Root, Key::Images, false, true) => Role::Images,
                (Role::Root, Key::Image, true, true) => Role::Image,
                (Role::Images, _, true, false) => Role::Image,
                _ => Role::Other,
            },
        };
        if role == Role::Images {
            self.images = Some(Vec::new());
        }
        self.stack.push(Frame {
            object,
            role,
            key: Key::None,
            expect_key: object,
            expect_colon: false,
            width: None,
            height: None,
        });
    }

    fn close(&mut self, object: bool) {
        let Some(f) = self.stack.pop() else {
            self.broken = true;
            return;
        };
        if f.object != object {
            self.broken = true;
            return;
        }
        if f.role == Role::Image {
            let size = f.width.zip(f.height);
            match self.stack.last().map(|p| p.role) {
                Some(Role::Images) => {
                    if let Some(list) = &mut self.images {
                        list.push(size);
                    }
                }
                Some(Role::Root) => self.image = Some(size),
                _ => {}
            }
        }
        if self.stack.is_empty() {
            self.done = true;
        }
    }

    fn end_scalar(&mut self) {
        self.in_scalar = false;
        let Some(digits) = self.number.take() else {
            return;
        };
        // Only a whole number is a size, as `as_u64` reads it.
        let value = std::str::from_utf8(&digits)
            .ok()
            .filter(|d| d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<u64>().ok());
        if let Some(f) = self.stack.last_mut() {
            match f.key {
                Key::Width => f.width = value,
                Key::Height => f.height = value,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(doc: &str) -> Option<ResponseFacts> {
        crate::billing::json::read(doc.as_bytes(), |v| {
            v.is_object().then(|| ResponseFacts::read(v))
        })
        .ok()
        .flatten()
    }

    fn scanned(doc: &str, split: usize) -> Option<ResponseFacts> {
        let mut scan = FactScanner::default();
        let (a, b) = doc.as_bytes().split_at(split);
        scan.feed(a);
        scan.feed(b);
        scan.finish()
    }

    #[test]
    fn reads_what_the_whole_document_says_however_it_is_cut() {
        let docs = [
            r#"{"images":[{"url":"data:image/png;base64,iVBO\"RK","width":2048,"height":1024},{"width":5,"height":6}],"seed":42}"#,
            r#"{"image":{"url":"x","width":2048,"height":2048,"content_type":"image/png"},"seed":42}"#,
            r#"{"video":{"url":"x"},"n":[1,2,{"width":3}]}"#,
            r#"{"images":[{"url":"x"},"y",7,null,{"width":1.5,"height":2}],"image":{"width":1,"height":1}}"#,
            r#"{"images":[{"width":1,"height":1}],"images":[]}"#,
            r#"{"images":{"width":1,"height":1},"image":{"width":2,"height":3}}"#,
            r#" { "images" : [ { "height" : 768 , "width" : 1024 } ] , "has_nsfw_concepts" : [ false ] , "ok" : true } "#,
            r#"{"other":{"images":[{"width":9,"height":9}]}}"#,
            r#"{"images":[{"width":-4,"height":2e3}],"\u0077idth":1}"#,
            r#"{"images":[[1,2],{"width":1,"height":1},[]]}"#,
            r#"{"images":[{"width":1024,"height":1024,"width":"big"}]}"#,
            // Keys as simd-json reads them: unescaped (found by fuzz/request_facts).
            r#"{"images":[{"url":"x","\u0077idth":1024,"h\u0065ight":768}]}"#,
            r#"{"imag\u0065s":[{"width":1,"height":1}],"\u0069mage":{"width":2,"height":3}}"#,
            r#"{"images":[{"w\u00e9idth":1,"width":2,"wid\"th":3,"height":4,"\ud83d\ude00":5}]}"#,
            r#"{"\u0000images":[{"width":1,"height":1}],"images\n":[]}"#,
            r#"{"image":{"width":1024,"width":null,"height":2}}"#,
        ];
        for doc in docs {
            let expected = whole(doc);
            assert!(expected.is_some(), "{doc}");
            for split in 0..=doc.len() {
                assert_eq!(scanned(doc, split), expected, "{doc} cut at {split}");
            }
        }
    }

    #[test]
    fn what_is_not_one_whole_object_says_nothing() {
        for doc in [
            r#"[{"width":1,"height":1}]"#,
            r#"{"images":[{"width":1,"height":1}]"#,
            r#"{"images":[]}}"#,
            r#"{"a":1} {"b":2}"#,
            r#"{"a" 1}"#,
            "",
        ] {
            assert_eq!(scanned(doc, doc.len() / 2), None, "{doc}");
        }
    }
}
