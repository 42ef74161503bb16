//! Money: what a request costs ([`pricing`]), what it is read from
//! ([`facts`], parsed by [`json`]), how credits are held and settled ([`ledger`], [`journal`]),
//! and how the figures reach the client ([`splice`]).

pub mod decimal;
pub mod facts;
pub mod journal;
pub mod json;
pub mod lax;
pub mod ledger;
pub mod pricing;
pub mod splice;
