//! Card payments through Stripe. Credits arrive only from Stripe's signed
//! webhook (`POST /v1/stripe/webhook`): a paid Checkout Session credits its
//! account once, a refund takes its share back.

pub mod checkout;
pub mod signature;
mod webhook;

use crate::config::Config;
use crate::error::Error;

pub use webhook::Applied;

pub const WEBHOOK_ROUTE: &str = "/v1/stripe/webhook";
/// Stripe's events are a few kilobytes; this is ample and still bounded.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

/// What the webhook needs, from the config and the environment.
pub struct Webhook {
    secret: Vec<u8>,
    currency: String,
    /// Credits per smallest currency unit (10 at $0.001 a credit).
    credits_per_minor: i64,
}

impl Webhook {
    /// `None` (the webhook answers 404) while the secret's variable is unset.
    pub fn from_config(config: &Config) -> Result<Option<Self>, Error> {
        let p = &config.payments;
        let secret = match p.secret(&p.webhook_secret_env, |d| &d.webhook_secret) {
            Some(s) => s.into_bytes(),
            None => {
                tracing::info!(
                    "payments off: set {} to the Stripe webhook's signing secret to turn them on",
                    p.webhook_secret_env
                );
                return Ok(None);
            }
        };
        Ok(Some(Self {
            secret,
            currency: p.currency.to_ascii_lowercase(),
            credits_per_minor: credits_per_minor(config.billing.usd_per_credit)?,
        }))
    }
}

/// A hundredth of the currency in credits, exactly: a price per credit that
/// does not divide a cent would make some payments worth a fraction of one.
fn credits_per_minor(per_credit: f64) -> Result<i64, Error> {
    const NANO_PER_MINOR: i64 = 10_000_000;
    let nano = (per_credit * 1e9).round() as i64;
    if nano <= 0 || NANO_PER_MINOR % nano != 0 {
        return Err(Error::Config(format!(
            "[billing] usd_per_credit = {per_credit} does not divide a hundredth of the currency: payments could not be credited exactly"
        )));
    }
    Ok(NANO_PER_MINOR / nano)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cent_is_a_whole_number_of_credits_or_the_config_is_refused() {
        assert_eq!(credits_per_minor(0.001).unwrap(), 10);
        assert_eq!(credits_per_minor(0.01).unwrap(), 1);
        assert_eq!(credits_per_minor(0.0001).unwrap(), 100);
        assert!(credits_per_minor(0.003).is_err());
        assert!(credits_per_minor(0.02).is_err());
    }
}
