//! AbhiAPI: a transparent billing proxy for fal.ai.
//!
//! A request goes accept ([`server`]) → authenticate ([`keys`]) → forward
//! ([`proxy`], [`upstream`]) → respond, with state in memory and durably in
//! SQLite ([`store`]).

pub mod admin;
pub mod app;
pub mod billing;
pub mod books;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dates;
pub mod demo;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod jobs;
pub mod keys;
pub mod log_format;
pub mod log_output;
pub mod mail;
pub mod memory;
pub mod metrics;
pub mod mock_fal;
pub mod mock_stripe;
pub mod payments;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod server;
pub mod shared_limits;
pub mod signin;
pub mod slices;
pub mod store;
pub mod tls;
pub mod upstream;
pub mod usage;
