//! The operator's `prices sync` and `reconcile` commands: fal's Platform
//! API with the operator's key, and the store the config names.

use super::platform::Platform;
use super::reconcile::{self, Period};
use super::sync;
use crate::billing::pricing::PriceTable;
use crate::cli::{PricesCommand, ReconcileCommand};
use crate::config::Config;
use crate::error::Error;
use crate::store::db::Db;

/// What `prices sync` prints.
pub fn prices(config: &Config, command: PricesCommand) -> Result<String, Error> {
    let (apply, all, json) = match command {
        PricesCommand::Sync { apply, all, json } => (apply, all, json),
        PricesCommand::Forget { endpoints } => {
            let mut conn = crate::store::open(&config.store)?;
            let at = crate::store::now_ms();
            let dropped = crate::store::synced_prices::forget(&mut conn, &endpoints, at)?;
            return Ok(format!(
                "dropped {dropped} synced prices: the table's rules price those endpoints from the next request"
            ));
        }
    };
    let lines = with_fal(config, |platform, db| async move {
        sync::run(&platform, &db, config, all, apply).await
    })?;
    if json {
        return simd_json::to_string_pretty(&lines).map_err(|e| Error::Usage(e.to_string()));
    }
    let margin = PriceTable::new(&config.billing, &config.pricing, &[])?
        .terms()
        .margin_ppm();
    let mut out = sync::render(&lines, margin);
    let applied = sync::to_apply(&lines).len();
    out.push_str(&match (apply, applied) {
        (_, 0) => "nothing to apply\n".to_owned(),
        (true, n) => {
            format!("applied {n} prices: running servers charge them from their next request\n")
        }
        (false, n) => format!("{n} prices would change: run again with --apply\n"),
    });
    Ok(out)
}

/// What `reconcile` prints, and whether the unbilled cost is within the tolerance.
pub fn reconcile(config: &Config, command: ReconcileCommand) -> Result<(String, bool), Error> {
    let period = Period::parse(
        Some(&command.since),
        command.until.as_deref(),
        command.tolerance_usd.as_deref(),
    )?;
    let report = with_fal(config, |platform, db| async move {
        reconcile::run(&platform, &db, config, period.since, period.until).await
    })?;
    let judged = period.judged(report);
    let within = !judged.over_tolerance;
    let text = match command.json {
        true => simd_json::to_string_pretty(&judged).map_err(|e| Error::Usage(e.to_string()))?,
        false => {
            let mut text = reconcile::render(&judged.report);
            if !within {
                text.push_str(&format!(
                    "\nunbilled ${} is more than the tolerance ${}\n",
                    judged.report.total.unbilled_usd, judged.tolerance_usd
                ));
            }
            text
        }
    };
    Ok((text, within))
}

/// Runs `work` with fal's Platform API and the store, on a runtime of its own.
fn with_fal<T, F, Fut>(config: &Config, work: F) -> Result<T, Error>
where
    F: FnOnce(Platform, Db) -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let fal_key = config.upstream.fal_key()?;
    // Opened outside the runtime: PostgreSQL's connection runs on one of its own.
    let db = Db::open(&config.store)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let platform = Platform::new(&config.upstream, &fal_key)?;
        work(platform, db).await
    })
}
