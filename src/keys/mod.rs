//! Who is calling: the key secrets, and the in-memory accounts and keys the
//! hot path authenticates against.

pub mod issue;
pub mod refresh;
pub mod registry;
pub mod secret;

pub use registry::{Account, ApiKey, Registry};
