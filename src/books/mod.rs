//! fal's own books: prices synced from fal's pricing API ([`sync`]), and our
//! ledger reconciled against fal's billing records ([`reconcile`]), both
//! read through fal's Platform API ([`platform`]).

pub mod command;
pub mod platform;
pub mod reconcile;
pub mod sync;
