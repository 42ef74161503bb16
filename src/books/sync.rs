//! Price sync: fal's price for each endpoint against the table in force,
//! and what applying it would change. An endpoint fal prices in a unit we
//! cannot meter, or in another currency, is reported and left; one under a
//! pinned rule is reported and never changed.

use serde::Serialize;

use super::platform::{FalPrice, Platform};
use crate::billing::decimal::format_scaled;
use crate::billing::pricing::{PriceTable, SyncedPrice};
use crate::config::{Config, Unit};
use crate::error::Error;
use crate::store::db::Db;
use crate::store::synced_prices;

/// Asks fal for the price of every endpoint the table in force names (and,
/// with `all`, every endpoint fal lists), compares, and with `apply` stores
/// the changed and new prices, which every running server then puts in force.
pub async fn run(
    platform: &Platform,
    db: &Db,
    config: &Config,
    all: bool,
    apply: bool,
) -> Result<Vec<Line>, Error> {
    let synced = db.run(|c| Ok(synced_prices::load(c)?)).await?;
    let table = PriceTable::new(&config.billing, &config.pricing, &synced)?;
    let mut endpoints: Vec<String> = table.endpoints().map(str::to_owned).collect();
    if all {
        endpoints.extend(platform.endpoints().await?);
    }
    endpoints.sort();
    endpoints.dedup();
    let lines = compare(&table, &platform.prices(&endpoints).await?);
    let changed = to_apply(&lines);
    if apply && !changed.is_empty() {
        let at = crate::store::now_ms();
        db.run(move |c| synced_prices::store(c, &changed, at))
            .await?;
    }
    Ok(lines)
}

/// What sync makes of one endpoint's price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The table already charges on fal's price.
    Same,
    /// The endpoint's own rule has another price (or unit): fal's replaces it.
    Changed,
    /// No rule names the endpoint itself (a prefix or nothing prices it):
    /// it gets fal's price as its own.
    New,
    /// Its rule is `pinned`: reported, never changed.
    Pinned,
    /// fal's unit (or currency) is not one we can meter, or its price is 0:
    /// left as it is.
    Unmeterable,
    /// No rule prices the endpoint: the table is what the gateway offers,
    /// and only the operator adds to it.
    NotOffered,
}

/// One endpoint's line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub endpoint: String,
    /// The rule that prices it now, if any.
    pub rule: Option<String>,
    /// The price in force, per unit, in dollars.
    pub ours: Option<String>,
    pub our_unit: Option<&'static str>,
    /// fal's price, per fal's unit, in dollars.
    pub fal: String,
    pub fal_unit: String,
    /// What a customer pays over what fal charges, at the price in force,
    /// in percent (when both are in the same unit).
    pub margin_pct: Option<String>,
    pub verdict: Verdict,
    /// Why an unmeterable price is left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip)]
    synced: Option<SyncedPrice>,
}

/// Compares fal's prices with the table in force.
pub fn compare(table: &PriceTable, fal: &[FalPrice]) -> Vec<Line> {
    let mut lines: Vec<Line> = fal.iter().map(|p| line(table, p)).collect();
    lines.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    lines.dedup_by(|a, b| a.endpoint == b.endpoint);
    lines
}

/// The prices applying the report writes: the changed and the new.
pub fn to_apply(lines: &[Line]) -> Vec<SyncedPrice> {
    lines.iter().filter_map(|l| l.synced.clone()).collect()
}

fn line(table: &PriceTable, p: &FalPrice) -> Line {
    let source = table.source(&p.endpoint);
    let ours = source.as_ref().map(|s| (s.rule.unit, s.rule.nano_per_unit));
    let unit = Unit::from_fal(&p.unit);
    let margin_pct = match (ours, unit) {
        (Some((our_unit, our_nano)), Some(u)) if u == our_unit && p.nano_usd > 0 => {
            Some(margin(our_nano, p.nano_usd, table.terms().margin_ppm()))
        }
        _ => None,
    };
    let (verdict, note) = match (unit, &source) {
        _ if !p.currency.eq_ignore_ascii_case("USD") => (
            Verdict::Unmeterable,
            Some(format!("priced in {}, the table in USD", p.currency)),
        ),
        (None, _) => (
            Verdict::Unmeterable,
            Some(format!(
                "fal bills {:?}, which no answer or request shows",
                p.unit
            )),
        ),
        (Some(_), None) => (
            Verdict::NotOffered,
            Some("no rule prices it: add one to offer it".into()),
        ),
        (Some(_), Some(s)) if s.pinned => (Verdict::Pinned, None),
        _ if p.nano_usd == 0 => (
            Verdict::Unmeterable,
            Some("fal gives a price of 0: not applied, check it with fal".into()),
        ),
        (Some(u), Some(_)) if ours == Some((u, p.nano_usd)) => (Verdict::Same, None),
        (Some(_), Some(s)) if s.rule.pattern.as_ref() == p.endpoint => (Verdict::Changed, None),
        (Some(_), _) => (Verdict::New, None),
    };
    let synced = match (verdict, unit) {
        (Verdict::Changed | Verdict::New, Some(unit)) => Some(SyncedPrice {
            endpoint: p.endpoint.clone(),
            unit,
            nano_usd: p.nano_usd,
        }),
        _ => None,
    };
    Line {
        endpoint: p.endpoint.clone(),
        rule: source.as_ref().map(|s| {
            let origin = if s.synced { " (synced)" } else { "" };
            format!("{}{origin}", s.rule.pattern)
        }),
        ours: ours.map(|(_, nano)| dollars(nano)),
        our_unit: ours.map(|(u, _)| u.name()),
        fal: dollars(p.nano_usd),
        fal_unit: p.unit.clone(),
        margin_pct,
        verdict,
        note,
        synced,
    }
}

/// `ours × (1 + margin) / fal − 1`, in percent to one decimal place.
fn margin(ours_nano: u64, fal_nano: u64, margin_ppm: u64) -> String {
    let charged = i128::from(ours_nano) * (1_000_000 + i128::from(margin_ppm));
    // Thousandths of a percent, then rounded to tenths.
    let milli_pct = (charged * 100 / i128::from(fal_nano)) - 100_000_000;
    let tenths = (milli_pct as f64 / 100_000.0).round() / 10.0;
    format!("{tenths:.1}")
}

fn dollars(nano: u64) -> String {
    format_scaled(u128::from(nano), 9)
}

/// The report as a table for a terminal.
pub fn render(lines: &[Line], margin_ppm: u64) -> String {
    let mut out = format!(
        "fal's prices against the table in force (margin {}%)\n{:<44} {:<40} {:>18} {:>20} {:>8}  {}\n",
        format_scaled(u128::from(margin_ppm), 4),
        "ENDPOINT",
        "RULE",
        "OURS",
        "FAL'S",
        "MARGIN%",
        "VERDICT"
    );
    for l in lines {
        let ours = match (&l.ours, l.our_unit) {
            (Some(p), Some(u)) => format!("{p}/{u}"),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "{:<44} {:<40} {:>18} {:>20} {:>8}  {}{}\n",
            l.endpoint,
            l.rule.as_deref().unwrap_or("-"),
            ours,
            format!("{}/{}", l.fal, l.fal_unit),
            l.margin_pct.as_deref().unwrap_or("-"),
            verdict_name(l.verdict),
            l.note
                .as_deref()
                .map(|n| format!(": {n}"))
                .unwrap_or_default()
        ));
    }
    out
}

fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Same => "same",
        Verdict::Changed => "changed",
        Verdict::New => "new",
        Verdict::Pinned => "pinned, kept",
        Verdict::Unmeterable => "left",
        Verdict::NotOffered => "not offered",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BillingConfig, PriceRuleConfig};

    fn rule(model: &str, unit: Unit, usd: f64, pinned: bool) -> PriceRuleConfig {
        PriceRuleConfig {
            pinned,
            ..PriceRuleConfig::test(model, unit, usd)
        }
    }

    fn fal(endpoint: &str, unit: &str, nano_usd: u64) -> FalPrice {
        FalPrice {
            endpoint: endpoint.into(),
            unit: unit.into(),
            nano_usd,
            currency: "USD".into(),
        }
    }

    #[test]
    fn each_endpoint_gets_its_verdict() {
        let table = PriceTable::new(
            &BillingConfig::default(),
            &[
                rule("fal-ai/flux/dev", Unit::Megapixel, 0.025, false),
                rule("fal-ai/flux/*", Unit::Megapixel, 0.025, false),
                rule("fal-ai/veo3", Unit::Second, 0.4, true),
            ],
            &[],
        )
        .unwrap();
        let lines = compare(
            &table,
            &[
                fal("fal-ai/flux/dev", "megapixels", 30_000_000),
                fal("fal-ai/flux/schnell", "megapixels", 3_000_000),
                fal("fal-ai/flux/krea", "megapixels", 25_000_000),
                fal("fal-ai/veo3", "seconds", 500_000_000),
                fal("fal-ai/any-llm", "compute seconds", 500_000),
                fal("someone/else", "images", 1_000_000),
                fal("fal-ai/flux/free", "megapixels", 0),
            ],
        );
        let verdicts: Vec<(&str, Verdict)> = lines
            .iter()
            .map(|l| (l.endpoint.as_str(), l.verdict))
            .collect();
        assert_eq!(
            verdicts,
            [
                ("fal-ai/any-llm", Verdict::Unmeterable),
                ("fal-ai/flux/dev", Verdict::Changed),
                ("fal-ai/flux/free", Verdict::Unmeterable),
                ("fal-ai/flux/krea", Verdict::Same),
                ("fal-ai/flux/schnell", Verdict::New),
                ("fal-ai/veo3", Verdict::Pinned),
                ("someone/else", Verdict::NotOffered),
            ]
        );
        // $0.025 × 1.1 against fal's $0.03: 8.3% under cost.
        assert_eq!(lines[1].margin_pct.as_deref(), Some("-8.3"));
        assert_eq!(lines[3].margin_pct.as_deref(), Some("10.0"));
        let applied: Vec<String> = to_apply(&lines).into_iter().map(|p| p.endpoint).collect();
        assert_eq!(applied, ["fal-ai/flux/dev", "fal-ai/flux/schnell"]);

        // Applied, the table charges fal's prices, but never a pinned rule's.
        let synced = [
            to_apply(&lines),
            vec![
                SyncedPrice {
                    endpoint: "fal-ai/veo3".into(),
                    unit: Unit::Second,
                    nano_usd: 500_000_000,
                },
                // Stored while a rule sold it; the rule is gone since.
                SyncedPrice {
                    endpoint: "someone/else".into(),
                    unit: Unit::Image,
                    nano_usd: 1_000_000,
                },
            ],
        ]
        .concat();
        let after = PriceTable::new(
            &BillingConfig::default(),
            &[
                rule("fal-ai/flux/dev", Unit::Megapixel, 0.025, false),
                rule("fal-ai/flux/*", Unit::Megapixel, 0.025, false),
                rule("fal-ai/veo3", Unit::Second, 0.4, true),
            ],
            &synced,
        )
        .unwrap();
        assert_eq!(
            after.rule("fal-ai/flux/dev").unwrap().nano_per_unit,
            30_000_000
        );
        assert_eq!(
            after.rule("fal-ai/flux/schnell").unwrap().nano_per_unit,
            3_000_000
        );
        assert_eq!(
            after.rule("fal-ai/veo3").unwrap().nano_per_unit,
            400_000_000
        );
        let again = compare(&after, &[fal("fal-ai/flux/dev", "megapixels", 30_000_000)]);
        assert_eq!(again[0].verdict, Verdict::Same);
        assert_eq!(again[0].rule.as_deref(), Some("fal-ai/flux/dev (synced)"));
    }
}
