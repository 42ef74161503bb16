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
use crate::billing::pricing::Terms;
use crate::dates;
use crate::error::Error;
use crate::store::books::{self, OurCharge};
use crate::store::db::Db;

/// Our charges are read this far either side of the period: a call fal
/// billed just inside it may have settled with us just outside.
const SLACK_SECS: i64 = 86_400;
/// Calls fal billed whose charge is not near the period are looked up one
/// by one, up to this many; past it they are reported as unbilled.
const LOOKUPS: usize = 10_000;

/// fal's side of the books for the period.
pub enum FalSide {
    Events(Vec<FalEvent>),
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
        let until = match until {
            Some(text) => date("until", text)?,
            // The end is exclusive: the current second is in the period.
            None => crate::store::now_secs() + 1,
        };
        if until <= since {
            return Err(Error::Usage("the period ends before it starts".into()));
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
/// exclusive), builds the report, and records its unbilled total.
pub async fn run(
    platform: &Platform,
    db: &Db,
    terms: Terms,
    since: i64,
    until: i64,
) -> Result<Report, Error> {
    let mut fal = match platform.billing_events(since, until, &[]).await {
        Ok(events) => FalSide::Events(events),
        Err(PlatformError::Refused { .. }) => FalSide::Usage(platform.usage(since, until).await?),
        Err(e) => return Err(e.into()),
    };
    let (from_ms, to_ms) = ((since - SLACK_SECS) * 1000, (until + SLACK_SECS) * 1000);
    let mut ours = db
        .run(move |c| Ok(books::charges_between(c, from_ms, to_ms)?))
        .await?;
    if let FalSide::Events(events) = &mut fal {
        let known: HashSet<String> = ours
            .iter()
            .filter_map(|c| c.fal_request_id.clone())
            .collect();
        let missing: Vec<String> = events
            .iter()
            .map(|e| e.request_id.clone())
            .filter(|id| !known.contains(id))
            .take(LOOKUPS)
            .collect();
        if !missing.is_empty() {
            let found = db
                .run(move |c| {
                    let mut found = Vec::new();
                    for id in &missing {
                        found.extend(books::charge_of(c, id)?);
                    }
                    Ok(found)
                })
                .await?;
            ours.extend(found);
        }
        // Charges of the period fal has no event for in it: fal may have
        // billed them just outside it.
        let billed: HashSet<&str> = events.iter().map(|e| e.request_id.as_str()).collect();
        let late: Vec<String> = ours
            .iter()
            .filter(|c| in_period(c, since, until) && c.credits > 0)
            .filter_map(|c| c.fal_request_id.clone())
            .filter(|id| !billed.contains(id.as_str()))
            .collect();
        if !late.is_empty() {
            let now = crate::store::now_secs() + 1;
            let around = platform
                .billing_events(since - SLACK_SECS, (until + SLACK_SECS).min(now), &late)
                .await?;
            events.extend(around);
        }
    }
    let report = build(since, until, fal, &ours, terms);
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

/// The report from both sides' records.
pub fn build(since: i64, until: i64, fal: FalSide, ours: &[OurCharge], terms: Terms) -> Report {
    let mut models: BTreeMap<String, Sums> = BTreeMap::new();
    let mut unbilled = Vec::new();
    let mut not_billed_by_fal = Vec::new();
    let mut unit_mismatches = Vec::new();
    let mut unbilled_nano = 0u64;
    let charged_nano = |c: &OurCharge| terms.credits_nano_usd(c.credits);
    let source = match &fal {
        FalSide::Events(_) => "billing_events",
        FalSide::Usage(_) => "usage",
    };
    match fal {
        FalSide::Events(events) => {
            // A charge with credits wins over a released one for the same call.
            let mut by_fal: HashMap<&str, &OurCharge> = HashMap::new();
            for c in ours {
                if let Some(id) = &c.fal_request_id {
                    let slot = by_fal.entry(id).or_insert(c);
                    if slot.credits == 0 && c.credits > 0 {
                        *slot = c;
                    }
                }
            }
            let mut seen_events: HashSet<&str> = HashSet::new();
            let mut matched: HashSet<&str> = HashSet::new();
            for e in &events {
                if !seen_events.insert(&e.request_id) {
                    continue;
                }
                let sums = models.entry(e.endpoint.clone()).or_default();
                sums.fal_requests += 1;
                sums.fal_nano = sums.fal_nano.saturating_add(e.cost_nano_usd);
                match by_fal.get(e.request_id.as_str()) {
                    Some(c) if c.credits > 0 => {
                        matched.insert(&c.id);
                        sums.charged_requests += 1;
                        sums.charged_nano = sums.charged_nano.saturating_add(charged_nano(c));
                        if let Some(units) = e.units_milli.filter(|u| *u != c.units_milli) {
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
                        if let Some(c) = found {
                            matched.insert(&c.id);
                        }
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
            for c in ours {
                if in_period(c, since, until) && c.credits > 0 && !matched.contains(c.id.as_str()) {
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
            for r in &rows {
                let sums = models.entry(r.endpoint.clone()).or_default();
                sums.fal_nano = sums.fal_nano.saturating_add(r.cost_nano_usd);
                // Units fal billed beyond those we charged, at fal's average price.
                let ours = our_units.get(r.endpoint.as_str()).copied().unwrap_or(0);
                if r.units_milli > ours && r.units_milli > 0 {
                    let extra = u128::from(r.units_milli - ours) * u128::from(r.cost_nano_usd)
                        / u128::from(r.units_milli);
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
