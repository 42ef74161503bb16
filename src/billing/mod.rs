//! Money: what a request costs ([`pricing`]), what it is read from
//! ([`facts`], parsed by [`json`]), how credits are held and settled ([`ledger`], [`journal`], put on
//! disk off the request threads by `flusher`),
//! also from answers too large to buffer ([`stream_facts`]), and how the
//! figures reach the client ([`splice`]); what fal says it billed ([`receipt`]).

pub mod decimal;
pub mod facts;
mod flusher;
pub mod journal;
pub mod json;
pub mod lax;
pub mod lease;
pub mod ledger;
pub mod pricing;
pub mod receipt;
pub mod splice;
pub mod stream_facts;
