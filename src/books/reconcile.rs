//! Reconciliation: fal's billing events for a period matched to our
//! charges by fal's request id. What fal billed, what we charged and the
//! margin, per model and in total; every call fal billed that we did not
//! charge (the operator's loss), every charge fal has no record of, and
//! units that disagree. Where the key may not read billing events, fal's
//! usage totals stand in: the totals are compared, calls cannot be listed.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::platform::{FalEvent, FalUsage, Platform, PlatformError};
use crate::billing::decimal::{format_scaled, parse_scaled};
use crate::billing::pricing::PriceTable;
use crate::config::{Config, Unit};
use crate::dates;
use crate::error::Error;
use crate::store::books::{self, OurCharge};
use crate::store::db::Db;
use crate::store::synced_prices;

/// Our charges are read this far either side of the period: a call fal
/// billed just inside it may have settled with us just outside.
const SLACK_SECS: i64 = 86_400;
/// Calls fal billed whose charge is not near the period are looked up by
/// id, up to this many; past it they are reported as unbilled.
const LOOKUPS: usize = 10_000;
/// The longest period one report covers.
const MAX_PERIOD_SECS: i64 = 366 * 86_400;

/// fal's side of the books for the period.
pub enum FalSide {
    Events {
        /// The calls fal billed in the period.
        inside: Vec<FalEvent>,
        /// Calls fal billed just either side of it, and those of our
        /// charges of the period that it billed outside it: they match our
        /// charges (which then count in their own period), never count here.
        edges: Vec<FalEvent>,
    },
    /// Billing events were refused to the key: usage totals only.
    Usage(Vec<FalUsage>),
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub since: String,
    pub until: String,
    /// `billing_events`, or `usage` where events were refused to the key.
    pub source: &'static str,
    pub models: Vec<ModelLine>,
    pub total: Total,
    /// Calls fal billed that we did not charge: the operator paid for them alone.
    pub unbilled: Vec<Unbilled>,
    /// Charges fal has no billing record of.
    pub not_billed_by_fal: Vec<NotBilled>,
    pub unit_mismatches: Vec<Mismatch>,
    #[serde(skip)]
    pub unbilled_nano_usd: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct ModelLine {
    pub model: String,
    pub fal_requests: u64,
    pub fal_usd: String,
    pub charged_requests: u64,
    pub charged_usd: String,
    pub margin_pct: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Total {
    pub fal_usd: String,
    pub charged_usd: String,
    pub margin_pct: Option<String>,
    pub unbilled_usd: String,
    pub unbilled_requests: u64,
    pub not_billed_by_fal: u64,
    pub unit_mismatches: u64,
    /// Calls matched to a charge without fal's id by model and time (charges
    /// from before ids were kept, holds recovered after a crash).
    pub matched_by_time: u64,
}

#[derive(Debug, Serialize)]
pub struct Unbilled {
    pub request_id: String,
    pub model: String,
    pub fal_usd: String,
    /// Our charge for the call, if there is one (released), else none.
    pub our_charge: Option<String>,
    pub our_outcome: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct NotBilled {
    pub charge_id: String,
    pub fal_request_id: Option<String>,
    pub model: String,
    pub charged_usd: String,
}

#[derive(Debug, Serialize)]
pub struct Mismatch {
    pub request_id: String,
    pub model: String,
    /// Units fal billed, in fal's unit.
    pub fal_units: String,
    /// Units we metered, in our rule's unit.
    pub our_units: String,
    /// What fal's answer said it billed (`x-fal-billable-units`), where it did.
    pub reported_units: Option<String>,
}

/// A period to reconcile, as the operator gives it, and the unbilled cost
/// tolerated in it.
#[derive(Debug, Clone, Copy)]
pub struct Period {
    /// Unix seconds; `until` exclusive.
    pub since: i64,
    pub until: i64,
    pub tolerance_nano_usd: u64,
}

/// The report and whether its unbilled cost is within the tolerance.
#[derive(Debug, Serialize)]
pub struct Judged {
    #[serde(flatten)]
    pub report: Report,
    pub tolerance_usd: String,
    /// More went unbilled than the tolerance: `reconcile` exits non-zero.
    pub over_tolerance: bool,
}

impl Period {
    /// `since` and `until` as `YYYY-MM-DD` (midnight UTC) or an RFC 3339
    /// instant in UTC; `until` defaults to now, the tolerance to nothing.
    pub fn parse(
        since: Option<&str>,
        until: Option<&str>,
        tolerance_usd: Option<&str>,
    ) -> Result<Self, Error> {
        let date = |name: &str, text: &str| {
            dates::parse_instant(text).ok_or_else(|| {
                Error::Usage(format!(
                    "{name} {text:?}: give a date (YYYY-MM-DD) or a UTC time (YYYY-MM-DDTHH:MM:SSZ)"
                ))
            })
        };
        let since = date(
            "since",
            since.ok_or_else(|| Error::Usage("since is required".into()))?,
        )?;
        // The end is exclusive: the current second is in the period, and
        // nothing later is.
        let now = crate::store::now_secs() + 1;
        let until = match until {
            Some(text) => date("until", text)?.min(now),
            None => now,
        };
        if until <= since {
            return Err(Error::Usage("the period ends before it starts".into()));
        }
        if until - since > MAX_PERIOD_SECS {
            return Err(Error::Usage(
                "a period is at most 366 days: reconcile a year in parts".into(),
            ));
        }
        let tolerance_nano_usd = match tolerance_usd {
            Some(text) => parse_scaled(text.trim(), 9).ok_or_else(|| {
                Error::Usage(format!("tolerance {text:?}: give dollars, such as 0.50"))
            })?,
            None => 0,
        };
        Ok(Self {
            since,
            until,
            tolerance_nano_usd,
        })
    }

    pub fn judged(&self, report: Report) -> Judged {
        Judged {
            over_tolerance: report.unbilled_nano_usd > self.tolerance_nano_usd,
            tolerance_usd: usd(self.tolerance_nano_usd),
            report,
        }
    }
}

/// Reads both sides of the period `since`..`until` (unix seconds, `until`
/// exclusive), builds the report, and records its unbilled total. Prices
/// and units are the table in force: `config.toml`'s with the synced prices.
pub async fn run(
    platform: &Platform,
    db: &Db,
    config: &Config,
    since: i64,
    until: i64,
) -> Result<Report, Error> {
    let synced = db.run(|c| Ok(synced_prices::load(c)?)).await?;
    let table = PriceTable::new(&config.billing, &config.pricing, &synced)?;
    let (from_ms, to_ms) = ((since - SLACK_SECS) * 1000, (until + SLACK_SECS) * 1000);
    let inside = match platform.billing_events(since, until, &[]).await {
        Ok(events) => merged(events),
        Err(PlatformError::Refused { .. }) => {
            let usage = platform.usage(since, until).await?;
            let ours = db
                .run(move |c| Ok(books::charges_between(c, from_ms, to_ms)?))
                .await?;
            let report = build(since, until, FalSide::Usage(usage), &ours, &table);
            return recorded(db, report, since, until).await;
        }
        Err(e) => return Err(e.into()),
    };
    let now = crate::store::now_secs() + 1;
    let mut edges = platform
        .billing_events(since - BY_TIME_SECS, since, &[])
        .await?;
    if until < now {
        let after = (until + BY_TIME_SECS).min(now);
        edges.extend(platform.billing_events(until, after, &[]).await?);
    }
    let mut ours = db
        .run(move |c| Ok(books::charges_between(c, from_ms, to_ms)?))
        .await?;
    let known: HashSet<&str> = ours
        .iter()
        .filter_map(|c| c.fal_request_id.as_deref())
        .collect();
    let missing: Vec<String> = inside
        .iter()
        .map(|e| e.request_id.clone())
        .filter(|id| !known.contains(id.as_str()))
        .take(LOOKUPS)
        .collect();
    if !missing.is_empty() {
        let found = db.run(move |c| Ok(books::charges_of(c, &missing)?)).await?;
        ours.extend(found);
    }
    // Charges of the period fal has no event for near it: fal may have
    // billed them well outside it (a queued job settled days after it ran).
    let billed: HashSet<&str> = inside
        .iter()
        .chain(&edges)
        .map(|e| e.request_id.as_str())
        .collect();
    let late: Vec<&OurCharge> = ours
        .iter()
        .filter(|c| in_period(c, since, until) && c.credits > 0)
        .filter(|c| {
            c.fal_request_id
                .as_deref()
                .is_some_and(|id| !billed.contains(id))
        })
        .collect();
    if let Some(first_ms) = late.iter().map(|c| c.started_at_ms).min() {
        let ids: Vec<String> = late
            .iter()
            .filter_map(|c| c.fal_request_id.clone())
            .collect();
        let from = (first_ms / 1000 - SLACK_SECS).max(until - MAX_PERIOD_SECS);
        let to = (until + SLACK_SECS).min(now);
        edges.extend(platform.billing_events(from, to, &ids).await?);
    }
    let report = tokio::task::spawn_blocking(move || {
        let fal = FalSide::Events {
            inside,
            edges: merged(edges),
        };
        build(since, until, fal, &ours, &table)
    })
    .await
    .map_err(|e| Error::Usage(format!("the report failed: {e}")))?;
    recorded(db, report, since, until).await
}

/// Records the report's unbilled total, for the metric.
async fn recorded(db: &Db, report: Report, since: i64, until: i64) -> Result<Report, Error> {
    let unbilled = report.unbilled_nano_usd;
    let at = crate::store::now_ms();
    db.run(move |c| {
        Ok(books::record_run(
            c,
            at,
            since * 1000,
            until * 1000,
            unbilled,
        )?)
    })
    .await?;
    Ok(report)
}

/// One record per call: fal may bill a call in several events (line
/// items); their costs add up, and their units where the unit is the same.
fn merged(events: Vec<FalEvent>) -> Vec<FalEvent> {
    let mut out: Vec<FalEvent> = Vec::with_capacity(events.len());
    let mut at: HashMap<String, usize> = HashMap::new();
    for e in events {
        match at.get(&e.request_id) {
            Some(&i) => {
                let first = &mut out[i];
                first.cost_nano_usd = first.cost_nano_usd.saturating_add(e.cost_nano_usd);
                first.units_milli = match (first.units_milli, e.units_milli) {
                    (Some(a), Some(b)) if first.unit == e.unit => Some(a.saturating_add(b)),
                    _ => None,
                };
            }
            None => {
                at.insert(e.request_id.clone(), out.len());
                out.push(e);
            }
        }
    }
    out
}

fn in_period(c: &OurCharge, since: i64, until: i64) -> bool {
    (since * 1000..until * 1000).contains(&c.settled_at_ms)
}

#[derive(Default)]
struct Sums {
    fal_requests: u64,
    fal_nano: u64,
    charged_requests: u64,
    charged_nano: u64,
}

/// fal's units and ours can be compared: the same unit, or fal's is not named.
fn same_unit(fal_unit: Option<&str>, ours: Option<Unit>) -> bool {
    match fal_unit {
        None => true,
        Some(name) => ours.is_some() && Unit::from_fal(name) == ours,
    }
}

/// How far apart fal's time for a call and our settlement of it may be,
/// for a charge without fal's id (from before ids were kept, or a hold
/// recovered after a crash) to be taken for the call.
const BY_TIME_SECS: i64 = 15 * 60;

/// Which of our charges each call fal billed is: by fal's request id (a
/// charge with credits before a released one), else, for a charge without
/// fal's id, by model and the nearest time within [`BY_TIME_SECS`].
struct Matches {
    /// For each call inside the period, its charge's index in `ours`.
    inside: Vec<Option<usize>>,
    /// Each charge of `ours` taken by a call, inside the period or near it.
    taken: Vec<bool>,
    /// Calls inside the period matched by time.
    by_time: u64,
}

fn match_calls(inside: &[FalEvent], edges: &[FalEvent], ours: &[OurCharge]) -> Matches {
    let mut by_fal: HashMap<&str, usize> = HashMap::new();
    for (i, c) in ours.iter().enumerate() {
        if let Some(id) = &c.fal_request_id {
            let slot = by_fal.entry(id).or_insert(i);
            if ours[*slot].credits == 0 && c.credits > 0 {
                *slot = i;
            }
        }
    }
    // Charges without fal's id, per model, in the order they settled.
    let mut idless: HashMap<&str, Vec<(i64, usize)>> = HashMap::new();
    for (i, c) in ours.iter().enumerate() {
        if c.fal_request_id.is_none() && c.credits > 0 {
            idless
                .entry(&c.model)
                .or_default()
                .push((c.settled_at_ms, i));
        }
    }
    for list in idless.values_mut() {
        list.sort_unstable();
    }
    let mut taken = vec![false; ours.len()];
    let mut by_time = 0;
    let all: Vec<&FalEvent> = inside.iter().chain(edges).collect();
    let mut found: Vec<Option<usize>> = all
        .iter()
        .map(|e| by_fal.get(e.request_id.as_str()).copied())
        .collect();
    for i in found.iter().flatten() {
        taken[*i] = true;
    }
    // The rest, oldest first, each to the nearest charge without an id
    // not yet taken.
    let mut rest: Vec<(i64, usize)> = found
        .iter()
        .enumerate()
        .filter(|(_, f)| f.is_none())
        .filter_map(|(k, _)| Some((dates::parse_instant(&all[k].timestamp)? * 1000, k)))
        .collect();
    rest.sort_unstable();
    let window = BY_TIME_SECS * 1000;
    for (at_ms, k) in rest {
        let Some(list) = idless.get(all[k].endpoint.as_str()) else {
            continue;
        };
        let from = list.partition_point(|(t, _)| *t < at_ms - window);
        let nearest = list[from..]
            .iter()
            .take_while(|(t, _)| *t <= at_ms + window)
            .filter(|(_, i)| !taken[*i])
            .min_by_key(|(t, _)| (t - at_ms).abs());
        if let Some(&(_, i)) = nearest {
            taken[i] = true;
            found[k] = Some(i);
            by_time += u64::from(k < inside.len());
        }
    }
    found.truncate(inside.len());
    Matches {
        inside: found,
        taken,
        by_time,
    }
}

/// The report from both sides' records. A call belongs to the period fal
/// billed it in.
pub fn build(
    since: i64,
    until: i64,
    fal: FalSide,
    ours: &[OurCharge],
    table: &PriceTable,
) -> Report {
    let terms = table.terms();
    let unit_of = |model: &str| table.rule(model).map(|r| r.unit);
    let mut models: BTreeMap<String, Sums> = BTreeMap::new();
    let mut unbilled = Vec::new();
    let mut not_billed_by_fal = Vec::new();
    let mut unit_mismatches = Vec::new();
    let mut unbilled_nano = 0u64;
    let mut matched_by_time = 0u64;
    let charged_nano = |c: &OurCharge| terms.credits_nano_usd(c.credits);
    let source = match &fal {
        FalSide::Events { .. } => "billing_events",
        FalSide::Usage(_) => "usage",
    };
    match fal {
        FalSide::Events { inside, edges } => {
            let matches = match_calls(&inside, &edges, ours);
            matched_by_time = matches.by_time;
            for (e, found) in inside.iter().zip(&matches.inside) {
                let sums = models.entry(e.endpoint.clone()).or_default();
                sums.fal_requests += 1;
                sums.fal_nano = sums.fal_nano.saturating_add(e.cost_nano_usd);
                match found.map(|i| &ours[i]) {
                    Some(c) if c.credits > 0 => {
                        sums.charged_requests += 1;
                        sums.charged_nano = sums.charged_nano.saturating_add(charged_nano(c));
                        let comparable = same_unit(e.unit.as_deref(), unit_of(&c.model));
                        if let Some(units) =
                            e.units_milli.filter(|u| comparable && *u != c.units_milli)
                        {
                            unit_mismatches.push(Mismatch {
                                request_id: e.request_id.clone(),
                                model: e.endpoint.clone(),
                                fal_units: format_scaled(u128::from(units), 3),
                                our_units: format_scaled(u128::from(c.units_milli), 3),
                                reported_units: c
                                    .fal_units_milli
                                    .map(|u| format_scaled(u128::from(u), 3)),
                            });
                        }
                    }
                    found if e.cost_nano_usd > 0 => {
                        unbilled_nano = unbilled_nano.saturating_add(e.cost_nano_usd);
                        unbilled.push(Unbilled {
                            request_id: e.request_id.clone(),
                            model: e.endpoint.clone(),
                            fal_usd: usd(e.cost_nano_usd),
                            our_charge: found.map(|c| c.id.clone()),
                            our_outcome: found.map(|c| c.outcome.clone()),
                        });
                    }
                    _ => {}
                }
            }
            for (i, c) in ours.iter().enumerate() {
                if in_period(c, since, until) && c.credits > 0 && !matches.taken[i] {
                    let sums = models.entry(c.model.clone()).or_default();
                    sums.charged_requests += 1;
                    sums.charged_nano = sums.charged_nano.saturating_add(charged_nano(c));
                    not_billed_by_fal.push(NotBilled {
                        charge_id: c.id.clone(),
                        fal_request_id: c.fal_request_id.clone(),
                        model: c.model.clone(),
                        charged_usd: usd(charged_nano(c)),
                    });
                }
            }
        }
        FalSide::Usage(rows) => {
            let mut our_units: HashMap<&str, u64> = HashMap::new();
            for c in ours
                .iter()
                .filter(|c| in_period(c, since, until) && c.credits > 0)
            {
                let sums = models.entry(c.model.clone()).or_default();
                sums.charged_requests += 1;
                sums.charged_nano = sums.charged_nano.saturating_add(charged_nano(c));
                *our_units.entry(&c.model).or_default() += c.units_milli;
            }
            // fal's rows per endpoint (one per price it billed at), added up.
            let mut fal_totals: BTreeMap<&str, (HashSet<&str>, u64, u64)> = BTreeMap::new();
            for r in &rows {
                let t = fal_totals.entry(&r.endpoint).or_default();
                t.0.insert(&r.unit);
                t.1 = t.1.saturating_add(r.units_milli);
                t.2 = t.2.saturating_add(r.cost_nano_usd);
            }
            for (endpoint, (units, fal_units, cost)) in fal_totals {
                models.entry(endpoint.to_owned()).or_default().fal_nano = cost;
                // Units fal billed beyond ours, at fal's average price, where
                // both count the same unit; all of it where we charged nothing.
                let comparable =
                    units.len() == 1 && units.iter().all(|u| same_unit(Some(u), unit_of(endpoint)));
                let Some(&ours) = our_units.get(endpoint) else {
                    unbilled_nano = unbilled_nano.saturating_add(cost);
                    continue;
                };
                if comparable && fal_units > ours {
                    let extra =
                        u128::from(fal_units - ours) * u128::from(cost) / u128::from(fal_units);
                    unbilled_nano =
                        unbilled_nano.saturating_add(u64::try_from(extra).unwrap_or(u64::MAX));
                }
            }
        }
    }
    let (mut fal_total, mut charged_total) = (0u64, 0u64);
    let models = models
        .into_iter()
        .map(|(model, s)| {
            fal_total = fal_total.saturating_add(s.fal_nano);
            charged_total = charged_total.saturating_add(s.charged_nano);
            ModelLine {
                model,
                fal_requests: s.fal_requests,
                fal_usd: usd(s.fal_nano),
                charged_requests: s.charged_requests,
                charged_usd: usd(s.charged_nano),
                margin_pct: margin(s.charged_nano, s.fal_nano),
            }
        })
        .collect();
    Report {
        since: dates::format_rfc3339(since) + "Z",
        until: dates::format_rfc3339(until) + "Z",
        source,
        models,
        total: Total {
            fal_usd: usd(fal_total),
            charged_usd: usd(charged_total),
            margin_pct: margin(charged_total, fal_total),
            unbilled_usd: usd(unbilled_nano),
            unbilled_requests: unbilled.len() as u64,
            not_billed_by_fal: not_billed_by_fal.len() as u64,
            unit_mismatches: unit_mismatches.len() as u64,
            matched_by_time,
        },
        unbilled,
        not_billed_by_fal,
        unit_mismatches,
        unbilled_nano_usd: unbilled_nano,
    }
}

fn usd(nano: u64) -> String {
    format_scaled(u128::from(nano), 9)
}

/// `(charged − fal) / fal`, in percent to one decimal place.
fn margin(charged: u64, fal: u64) -> Option<String> {
    if fal == 0 {
        return None;
    }
    let tenths = (i128::from(charged) - i128::from(fal)) * 1000 / i128::from(fal);
    Some(format!(
        "{}{}.{}",
        if tenths < 0 { "-" } else { "" },
        tenths.abs() / 10,
        tenths.abs() % 10
    ))
}

/// The report for a terminal.
pub fn render(r: &Report) -> String {
    let mut out = format!(
        "fal's books against ours, {} to {} (from fal's {})\n\n{:<44} {:>9} {:>14} {:>9} {:>14} {:>8}\n",
        r.since,
        r.until,
        r.source.replace('_', " "),
        "MODEL",
        "FAL CALLS",
        "FAL USD",
        "CHARGED",
        "CHARGED USD",
        "MARGIN%"
    );
    let row = |name: &str, fc: String, fu: &str, cc: String, cu: &str, m: Option<&str>| {
        format!(
            "{name:<44} {fc:>9} {fu:>14} {cc:>9} {cu:>14} {:>8}\n",
            m.unwrap_or("-")
        )
    };
    for m in &r.models {
        out.push_str(&row(
            &m.model,
            m.fal_requests.to_string(),
            &m.fal_usd,
            m.charged_requests.to_string(),
            &m.charged_usd,
            m.margin_pct.as_deref(),
        ));
    }
    let t = &r.total;
    out.push_str(&row(
        "TOTAL",
        String::new(),
        &t.fal_usd,
        String::new(),
        &t.charged_usd,
        t.margin_pct.as_deref(),
    ));
    out.push_str(&format!(
        "\nunbilled: {} calls, ${} that fal billed and we did not charge\n",
        t.unbilled_requests, t.unbilled_usd
    ));
    for u in &r.unbilled {
        out.push_str(&format!(
            "  {}  {}  ${}  our charge: {}\n",
            u.request_id,
            u.model,
            u.fal_usd,
            match (&u.our_charge, &u.our_outcome) {
                (Some(id), Some(outcome)) => format!("{id} ({outcome})"),
                _ => "none".into(),
            }
        ));
    }
    out.push_str(&format!(
        "charges fal has no record of: {}\n",
        t.not_billed_by_fal
    ));
    for n in &r.not_billed_by_fal {
        out.push_str(&format!(
            "  {}  fal id {}  {}  ${}\n",
            n.charge_id,
            n.fal_request_id.as_deref().unwrap_or("none"),
            n.model,
            n.charged_usd
        ));
    }
    out.push_str(&format!("units that disagree: {}\n", t.unit_mismatches));
    for m in &r.unit_mismatches {
        out.push_str(&format!(
            "  {}  {}  fal {}  ours {}{}\n",
            m.request_id,
            m.model,
            m.fal_units,
            m.our_units,
            m.reported_units
                .as_deref()
                .map(|u| format!("  (fal's answer said {u})"))
                .unwrap_or_default()
        ));
    }
    if r.source == "usage" {
        out.push_str(
            "(fal refused billing events to this key: totals from its usage API; calls cannot be listed)\n",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BillingConfig, PriceRuleConfig};

    const DAY: i64 = 86_400;
    /// 2026-01-01T00:00:00Z.
    const JAN: i64 = 1_767_225_600;

    fn table() -> PriceTable {
        let rule = PriceRuleConfig::test;
        PriceTable::new(
            &BillingConfig::default(),
            &[
                rule("fal-ai/flux/dev", Unit::Megapixel, 0.025),
                rule("*", Unit::Request, 0.001),
            ],
            &[],
        )
        .unwrap()
    }

    fn event(
        id: &str,
        endpoint: &str,
        at: i64,
        units_milli: u64,
        unit: &str,
        cost: u64,
    ) -> FalEvent {
        FalEvent {
            request_id: id.into(),
            endpoint: endpoint.into(),
            timestamp: format!("{}Z", dates::format_rfc3339(at)),
            units_milli: Some(units_milli),
            unit: Some(unit.into()),
            cost_nano_usd: cost,
        }
    }

    fn charge(id: &str, fal: Option<&str>, model: &str, at: i64, credits: u64) -> OurCharge {
        OurCharge {
            id: id.into(),
            model: model.into(),
            units_milli: 1000,
            credits,
            outcome: if credits > 0 { "charged" } else { "released" }.into(),
            fal_request_id: fal.map(str::to_owned),
            fal_units_milli: None,
            started_at_ms: at * 1000 - 500,
            settled_at_ms: at * 1000,
        }
    }

    fn events(inside: Vec<FalEvent>, edges: Vec<FalEvent>) -> FalSide {
        FalSide::Events { inside, edges }
    }

    /// A call settled with us on the 31st and billed by fal on the 1st
    /// counts in the month fal billed it, once, with or without fal's id on
    /// our charge: January sees fal's event only at its edge.
    #[test]
    fn a_call_across_the_month_end_counts_once() {
        let feb = JAN + 31 * DAY;
        for fal_id in [Some("f1"), None] {
            let ours = [charge("r1", fal_id, "fal-ai/flux/dev", feb - 10, 28)];
            let e = event(
                "f1",
                "fal-ai/flux/dev",
                feb + 5,
                1000,
                "megapixels",
                25_000_000,
            );
            let january = build(JAN, feb, events(vec![], vec![e.clone()]), &ours, &table());
            assert_eq!(
                (
                    january.total.charged_usd.as_str(),
                    january.total.not_billed_by_fal
                ),
                ("0", 0)
            );
            let february = build(
                feb,
                feb + 28 * DAY,
                events(vec![e], vec![]),
                &ours,
                &table(),
            );
            assert_eq!(
                (
                    february.total.fal_usd.as_str(),
                    february.total.charged_usd.as_str()
                ),
                ("0.025", "0.028")
            );
            assert_eq!(february.total.unbilled_requests, 0);
        }
    }

    #[test]
    fn a_charge_beats_a_release_of_the_same_call() {
        let ours = [
            charge("r0", Some("f1"), "fal-ai/flux/dev", JAN + 1, 0),
            charge("r1", Some("f1"), "fal-ai/flux/dev", JAN + 2, 28),
        ];
        let e = event(
            "f1",
            "fal-ai/flux/dev",
            JAN + 1,
            1000,
            "megapixels",
            25_000_000,
        );
        let r = build(JAN, JAN + DAY, events(vec![e], vec![]), &ours, &table());
        assert_eq!(
            (r.total.unbilled_requests, r.total.not_billed_by_fal),
            (0, 0)
        );
        assert_eq!(r.total.charged_usd, "0.028");
    }

    #[test]
    fn charges_without_fals_id_are_matched_by_model_and_time() {
        let ours = [
            charge("old", None, "fal-ai/flux/dev", JAN + 100, 28),
            charge("released", Some("f2"), "fal-ai/flux/dev", JAN + 200, 0),
        ];
        let inside = vec![
            event(
                "f1",
                "fal-ai/flux/dev",
                JAN + 95,
                1000,
                "megapixels",
                25_000_000,
            ),
            event(
                "f2",
                "fal-ai/flux/dev",
                JAN + 199,
                1000,
                "megapixels",
                25_000_000,
            ),
            // Too far from any charge without an id to be taken for one.
            event(
                "f3",
                "fal-ai/flux/dev",
                JAN + 2 * DAY,
                1000,
                "megapixels",
                25_000_000,
            ),
        ];
        let r = build(JAN, JAN + 5 * DAY, events(inside, vec![]), &ours, &table());
        assert_eq!(r.total.matched_by_time, 1);
        let unbilled: Vec<(&str, Option<&str>)> = r
            .unbilled
            .iter()
            .map(|u| (u.request_id.as_str(), u.our_outcome.as_deref()))
            .collect();
        assert_eq!(unbilled, [("f2", Some("released")), ("f3", None)]);
        assert_eq!(r.total.unbilled_usd, "0.05");
        assert_eq!(r.total.not_billed_by_fal, 0);
    }

    #[test]
    fn line_items_add_up_and_units_compare_only_alike() {
        let calls = merged(vec![
            event("f1", "fal-ai/flux/dev", JAN, 1000, "megapixels", 25_000_000),
            event("f1", "fal-ai/flux/dev", JAN, 1000, "megapixels", 25_000_000),
            // fal bills megapixels; our catch-all counts requests: not a mismatch.
            event("f2", "fal-ai/other", JAN, 4000, "megapixels", 100_000_000),
        ]);
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (calls[0].cost_nano_usd, calls[0].units_milli),
            (50_000_000, Some(2000))
        );
        let ours = [
            charge("r1", Some("f1"), "fal-ai/flux/dev", JAN, 55),
            charge("r2", Some("f2"), "fal-ai/other", JAN, 2),
        ];
        let r = build(JAN, JAN + DAY, self::events(calls, vec![]), &ours, &table());
        let mismatched: Vec<&str> = r
            .unit_mismatches
            .iter()
            .map(|m| m.request_id.as_str())
            .collect();
        assert_eq!(mismatched, ["f1"]);
        assert_eq!(r.unit_mismatches[0].fal_units, "2");
    }

    #[test]
    fn usage_totals_add_up_per_endpoint_before_comparing() {
        let usage = |units_milli, cost| FalUsage {
            endpoint: "fal-ai/flux/dev".into(),
            unit: "megapixels".into(),
            units_milli,
            cost_nano_usd: cost,
        };
        // fal billed 3 MP at two prices; we charged 2 MP: one is unbilled,
        // at fal's average price ($0.09 / 3).
        let mut rows = vec![usage(1000, 30_000_000), usage(2000, 60_000_000)];
        // An endpoint we charged nothing for: all of fal's cost, whatever its unit.
        rows.push(FalUsage {
            endpoint: "fal-ai/any-llm".into(),
            unit: "compute seconds".into(),
            units_milli: 7000,
            cost_nano_usd: 3_500_000,
        });
        let ours = [
            charge("r1", Some("f1"), "fal-ai/flux/dev", JAN + 1, 28),
            charge("r2", Some("f2"), "fal-ai/flux/dev", JAN + 2, 28),
        ];
        let r = build(JAN, JAN + DAY, FalSide::Usage(rows), &ours, &table());
        assert_eq!(r.source, "usage");
        assert_eq!(
            (r.total.fal_usd.as_str(), r.total.unbilled_usd.as_str()),
            ("0.0935", "0.0335")
        );
    }
}
