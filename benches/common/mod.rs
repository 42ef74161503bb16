//! What the whole-proxy benches share.

use std::path::Path;

use abhiapi::mock_fal::MockFal;

/// A flux request: a 1024×1024 image, priced per megapixel.
pub const FLUX: &str = r#"{"prompt":"a red fox","image_size":"square_hd"}"#;

/// AbhiAPI in front of `mock`, on a plain port 0, with a plan too high to
/// deny and prices for the mock's models.
pub fn config_toml(mock: &MockFal, db: &Path) -> String {
    format!(
        r#"[server]
plain_listen = "127.0.0.1:0"
[upstream]
run = "{mock}"
queue = "{mock}/_queue"
storage = "{mock}/_rest"
[store]
path = "{db}"
[plans.free]
requests_per_minute = 1000000000
[[pricing]]
model = "mock/canned"
unit = "megapixel"
usd = 0.025
[[pricing]]
model = "mock/*"
unit = "request"
usd = 0.001
"#,
        mock = mock.url(false),
        db = db.display()
    )
}
