//! The price table: which rule prices a model, how many units a request or
//! an answer counts, and what that costs in credits, all in integers.
//!
//! Money is nano-dollars, the margin parts per million, and units
//! thousandths (of a megapixel, an image, a second, a request), so that
//! `credits = ceil(price × units × (1 + margin) / usd_per_credit)` is one
//! exact integer division, rounded up once. Every product is checked: the
//! numbers come from clients and from fal, and must never wrap.
//!
//! A [`Tariff`] is what prices one piece of work: the rule that matched it
//! and the table's [`Terms`], taken when the work is admitted and kept
//! with it, so that a reload (or, for a queued job, a restart) before it is
//! settled does not change its price.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::decimal::{format_scaled, to_scaled};
use super::facts::{RequestFacts, ResponseFacts};
use crate::config::{BillingConfig, PriceRuleConfig, Unit};
use crate::error::{ApiError, Error};

const NANO: u32 = 9;
const PPM: u128 = 1_000_000;
const MILLI: u64 = 1000;
/// fal's default `image_size` when a request names none.
const DEFAULT_IMAGE: (u64, u64) = (1024, 768);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceRule {
    /// The `model` as configured: a path, or a prefix ending in `*`.
    pub pattern: Arc<str>,
    pub unit: Unit,
    /// fal's price per unit, in nano-dollars.
    pub nano_per_unit: u64,
    /// For `second` rules: the duration assumed when a request gives none.
    default_seconds_milli: u64,
}

/// Units counted and what they cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quote {
    pub units_milli: u64,
    pub credits: u64,
}

/// The table-wide settings every rule prices under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    margin_ppm: u64,
    credit_nano: u64,
    megapixel_pixels: u64,
    round_each_image: bool,
}

/// What prices one piece of work, fixed when it was admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tariff {
    pub rule: PriceRule,
    pub terms: Terms,
}

#[derive(Debug)]
pub struct PriceTable {
    exact: HashMap<String, PriceRule>,
    /// Longest prefix first, so the first match is the longest.
    prefixes: Vec<(String, PriceRule)>,
    terms: Terms,
    /// Patterns of the rules marked `pinned`: no synced price overrides them.
    pinned: HashSet<Arc<str>>,
    /// Endpoints whose price came from fal's pricing API.
    synced: HashSet<String>,
}

/// fal's price for one endpoint, as `prices sync` stored it: it prices
/// that endpoint in place of the table's rule, unless the rule is pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncedPrice {
    pub endpoint: String,
    pub unit: Unit,
    pub nano_usd: u64,
}

/// Where the price of an endpoint comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source<'a> {
    pub rule: &'a PriceRule,
    pub pinned: bool,
    /// From fal's pricing API rather than `config.toml`.
    pub synced: bool,
}

impl PriceTable {
    /// The table `config.toml` gives, with fal's synced prices in place of
    /// the rules they fall under, except pinned ones (a synced price no
    /// rule covers is not used).
    pub fn new(
        billing: &BillingConfig,
        rules: &[PriceRuleConfig],
        synced: &[SyncedPrice],
    ) -> Result<Self, Error> {
        let bad = |what: &str, e: String| Error::Config(format!("{what}: {e}"));
        let credit_nano = to_scaled(billing.usd_per_credit, NANO)
            .map_err(|e| bad("[billing] usd_per_credit", e))?;
        if credit_nano == 0 {
            return Err(Error::Config(
                "[billing] usd_per_credit must be positive".into(),
            ));
        }
        if billing.megapixel_pixels == 0 {
            return Err(Error::Config(
                "[billing] megapixel_pixels must be positive".into(),
            ));
        }
        let mut table = Self {
            exact: HashMap::new(),
            prefixes: Vec::new(),
            terms: Terms {
                margin_ppm: to_scaled(billing.margin, 6).map_err(|e| bad("[billing] margin", e))?,
                credit_nano,
                megapixel_pixels: billing.megapixel_pixels,
                round_each_image: billing.round_each_image,
            },
            pinned: HashSet::new(),
            synced: HashSet::new(),
        };
        for r in rules {
            let what = format!("[[pricing]] {:?}", r.model);
            // Patterns go into journal lines, tab-separated, one a line.
            if r.model.chars().any(char::is_control) {
                return Err(Error::Config(format!(
                    "{what}: a model may not contain control characters"
                )));
            }
            let rule = PriceRule {
                pattern: Arc::from(r.model.as_str()),
                unit: r.unit,
                nano_per_unit: to_scaled(r.usd, NANO).map_err(|e| bad(&what, e))?,
                default_seconds_milli: to_scaled(r.default_seconds.unwrap_or(5.0), 3)
                    .map_err(|e| bad(&what, e))?,
            };
            if r.pinned {
                table.pinned.insert(Arc::clone(&rule.pattern));
            }
            let duplicate = match r.model.strip_suffix('*') {
                Some(prefix) => {
                    let dup = table.prefixes.iter().any(|(p, _)| p == prefix);
                    table.prefixes.push((prefix.to_owned(), rule));
                    dup
                }
                None => table.exact.insert(r.model.clone(), rule).is_some(),
            };
            if duplicate {
                return Err(Error::Config(format!("{what} is priced twice")));
            }
        }
        table
            .prefixes
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        for price in synced {
            // Only what a rule offers is sold: a price synced for an
            // endpoint whose rule is gone (or pinned since) is not used.
            let Some(under) = table.rule(&price.endpoint) else {
                continue;
            };
            if table.pinned.contains(&under.pattern) || price.endpoint.chars().any(char::is_control)
            {
                continue;
            }
            let rule = PriceRule {
                pattern: Arc::from(price.endpoint.as_str()),
                unit: price.unit,
                nano_per_unit: price.nano_usd,
                // A video's length when the request gives none is ours to
                // say, not fal's: the rule's it fell under.
                default_seconds_milli: under.default_seconds_milli,
            };
            table.exact.insert(price.endpoint.clone(), rule);
            table.synced.insert(price.endpoint.clone());
        }
        Ok(table)
    }

    /// The rule that prices `model`, and where it comes from.
    pub fn source(&self, model: &str) -> Option<Source<'_>> {
        let rule = self.rule(model)?;
        Some(Source {
            rule,
            pinned: self.pinned.contains(&rule.pattern),
            synced: self.synced.contains(rule.pattern.as_ref()),
        })
    }

    /// The synced prices in the table (those its pinned rules left out are not).
    pub fn synced_prices(&self) -> Vec<SyncedPrice> {
        self.synced
            .iter()
            .filter_map(|e| {
                let r = self.exact.get(e)?;
                Some(SyncedPrice {
                    endpoint: e.clone(),
                    unit: r.unit,
                    nano_usd: r.nano_per_unit,
                })
            })
            .collect()
    }

    /// The endpoints the table names one by one (its exact rules).
    pub fn endpoints(&self) -> impl Iterator<Item = &str> {
        self.exact.keys().map(String::as_str)
    }

    /// The rule for `model`: an exact rule, else the longest matching prefix.
    /// An exact match is never shorter than a prefix match, so it always wins.
    pub fn rule(&self, model: &str) -> Option<&PriceRule> {
        self.exact.get(model).or_else(|| {
            self.prefixes
                .iter()
                .find(|(p, _)| model.starts_with(p.as_str()))
                .map(|(_, r)| r)
        })
    }

    /// What prices work on `model` under this table, if anything does.
    pub fn tariff(&self, model: &str) -> Option<Tariff> {
        Some(Tariff {
            rule: self.rule(model)?.clone(),
            terms: self.terms,
        })
    }

    pub fn terms(&self) -> Terms {
        self.terms
    }

    /// `credits × usd_per_credit`, as exact decimal text.
    pub fn cost_usd(&self, credits: u64) -> String {
        self.terms.cost_usd(credits)
    }
}

impl Tariff {
    /// The most a request can cost, from the request alone: what is held.
    /// A cost too large to work out is refused, never held as less.
    pub fn estimate(&self, req: &RequestFacts) -> Result<Quote, ApiError> {
        self.terms.quote(&self.rule, req, None).ok_or_else(|| {
            ApiError::InvalidInput("the request's cost is too large to work out".into())
        })
    }

    /// The least any request can be held for under this tariff: with every
    /// cost field at its default or at its smallest legal value. An account
    /// that cannot cover it is refused before its body is read.
    pub fn cheapest(&self) -> u64 {
        [RequestFacts::default(), RequestFacts::SMALLEST]
            .iter()
            .filter_map(|req| self.terms.quote(&self.rule, req, None))
            .map(|q| q.credits)
            .min()
            .unwrap_or(0)
    }

    /// What an answer costs: images as returned, the rest from the request;
    /// `None` if fal's figures are too large to work out (the caller charges the hold).
    pub fn actual(&self, req: &RequestFacts, resp: &ResponseFacts) -> Option<Quote> {
        self.terms.quote(&self.rule, req, Some(resp))
    }

    /// A text form for a queued job's row, read back by [`Tariff::decode`].
    /// The pattern goes last: it is the one field that may hold any character.
    pub fn encode(&self) -> String {
        let (r, t) = (&self.rule, &self.terms);
        format!(
            "{};{};{};{};{};{};{};{}",
            r.unit.name(),
            r.nano_per_unit,
            r.default_seconds_milli,
            t.margin_ppm,
            t.credit_nano,
            t.megapixel_pixels,
            u8::from(t.round_each_image),
            r.pattern
        )
    }

    pub fn decode(text: &str) -> Option<Self> {
        let mut f = text.splitn(8, ';');
        let unit = Unit::from_name(f.next()?)?;
        let mut number = || f.next()?.parse::<u64>().ok();
        let (nano_per_unit, default_seconds_milli) = (number()?, number()?);
        let terms = Terms {
            margin_ppm: number()?,
            credit_nano: number().filter(|n| *n > 0)?,
            megapixel_pixels: number().filter(|n| *n > 0)?,
            round_each_image: number()? == 1,
        };
        let rule = PriceRule {
            pattern: Arc::from(f.next()?),
            unit,
            nano_per_unit,
            default_seconds_milli,
        };
        Some(Self { rule, terms })
    }
}

impl Terms {
    fn quote(
        &self,
        rule: &PriceRule,
        req: &RequestFacts,
        resp: Option<&ResponseFacts>,
    ) -> Option<Quote> {
        let requested_size = req.image_size.unwrap_or(DEFAULT_IMAGE);
        let requested_images = req.num_images.unwrap_or(1);
        let returned = resp.map_or(&[][..], |r| r.images.as_slice());
        let units_milli = match rule.unit {
            Unit::Megapixel if returned.is_empty() => self
                .megapixels_milli(requested_size)?
                .checked_mul(requested_images)?,
            Unit::Megapixel => returned.iter().try_fold(0u64, |sum, size| {
                sum.checked_add(self.megapixels_milli(size.unwrap_or(requested_size))?)
            })?,
            Unit::Image if returned.is_empty() => requested_images.checked_mul(MILLI)?,
            Unit::Image => u64::try_from(returned.len()).ok()?.checked_mul(MILLI)?,
            Unit::Second => req.duration_milli.unwrap_or(rule.default_seconds_milli),
            Unit::Request => MILLI,
        };
        Some(Quote {
            units_milli,
            credits: self.credits(rule, units_milli)?,
        })
    }

    /// One image's megapixels in thousandths: whole megapixels, rounded up,
    /// when fal's per-image rounding is on; else rounded up to the thousandth.
    fn megapixels_milli(&self, (w, h): (u64, u64)) -> Option<u64> {
        let pixels = w.checked_mul(h)?;
        if self.round_each_image {
            pixels.div_ceil(self.megapixel_pixels).checked_mul(MILLI)
        } else {
            Some(pixels.checked_mul(MILLI)?.div_ceil(self.megapixel_pixels))
        }
    }

    fn credits(&self, rule: &PriceRule, units_milli: u64) -> Option<u64> {
        let numerator = u128::from(rule.nano_per_unit)
            .checked_mul(u128::from(units_milli))?
            .checked_mul(PPM + u128::from(self.margin_ppm))?;
        let denominator = u128::from(MILLI) * PPM * u128::from(self.credit_nano);
        u64::try_from(numerator.div_ceil(denominator)).ok()
    }

    /// `credits × usd_per_credit`, as exact decimal text.
    pub fn cost_usd(&self, credits: u64) -> String {
        format_scaled(u128::from(self.credits_nano_usd(credits)), NANO)
    }

    /// `credits × usd_per_credit` in nano-dollars (saturating).
    pub fn credits_nano_usd(&self, credits: u64) -> u64 {
        credits.saturating_mul(self.credit_nano)
    }

    /// The markup over fal's price, in parts per million.
    pub fn margin_ppm(&self) -> u64 {
        self.margin_ppm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(margin: f64, round_each_image: bool) -> PriceTable {
        let billing = BillingConfig {
            margin,
            round_each_image,
            ..BillingConfig::default()
        };
        let rule = PriceRuleConfig::test;
        PriceTable::new(
            &billing,
            &[
                rule("fal-ai/flux/dev", Unit::Megapixel, 0.025),
                rule("fal-ai/flux/*", Unit::Megapixel, 0.003),
                rule("fal-ai/*", Unit::Request, 0.01),
                rule("fal-ai/kling-video/v2/*", Unit::Second, 0.07),
                rule("fal-ai/flat", Unit::Image, 0.04),
            ],
            &[],
        )
        .unwrap()
    }

    #[test]
    fn the_longest_match_wins() {
        let t = table(0.1, true);
        let pattern = |model| t.rule(model).map(|r| r.pattern.to_string());
        assert_eq!(
            pattern("fal-ai/flux/dev").as_deref(),
            Some("fal-ai/flux/dev")
        );
        assert_eq!(
            pattern("fal-ai/flux/dev/image-to-image").as_deref(),
            Some("fal-ai/flux/*")
        );
        assert_eq!(pattern("fal-ai/other").as_deref(), Some("fal-ai/*"));
        assert!(t.rule("someone/else").is_none());
    }

    #[test]
    fn megapixels_follow_fals_rounding() {
        let t = table(0.0, true);
        let rule = t.tariff("fal-ai/flux/dev").unwrap();
        let images = |sizes: &[(u64, u64)]| ResponseFacts {
            images: sizes.iter().copied().map(Some).collect(),
        };
        let req = RequestFacts::default();
        // 1024×1024 and 1024×768 are 1 MP each; 1025×1024 is 2.
        assert_eq!(
            rule.actual(&req, &images(&[(1024, 1024)]))
                .unwrap()
                .units_milli,
            1000
        );
        assert_eq!(
            rule.actual(&req, &images(&[(1024, 768)]))
                .unwrap()
                .units_milli,
            1000
        );
        assert_eq!(
            rule.actual(&req, &images(&[(1025, 1024)]))
                .unwrap()
                .units_milli,
            2000
        );
        // $0.025 × 4 MP at no margin, $0.001 a credit: exactly 100 credits.
        let q = rule
            .actual(&req, &images(&[(1024, 1024), (1025, 1024), (10, 10)]))
            .unwrap();
        assert_eq!(
            q,
            Quote {
                units_milli: 4000,
                credits: 100
            }
        );
        // Without per-image rounding, fractions count to the thousandth.
        let t = table(0.0, false);
        let q = t
            .tariff("fal-ai/flux/dev")
            .unwrap()
            .actual(&req, &images(&[(1024, 768)]))
            .unwrap();
        assert_eq!(q.units_milli, 750);
    }

    #[test]
    fn estimates_come_from_the_request() {
        let t = table(0.1, true);
        let flux = t.tariff("fal-ai/flux/dev").unwrap();
        let req = RequestFacts {
            image_size: Some((1025, 1024)),
            num_images: Some(3),
            duration_milli: None,
        };
        // 3 images × 2 MP × $0.025 × 1.1 = $0.165 = 165 credits.
        assert_eq!(
            flux.estimate(&req).unwrap(),
            Quote {
                units_milli: 6000,
                credits: 165
            }
        );
        // No size given: fal's default landscape_4_3, 1 MP.
        assert_eq!(flux.estimate(&RequestFacts::default()).unwrap().credits, 28); // 27.5 rounds up
        let kling = t
            .tariff("fal-ai/kling-video/v2/master/text-to-video")
            .unwrap();
        let ten = RequestFacts {
            duration_milli: Some(10_000),
            ..Default::default()
        };
        assert_eq!(kling.estimate(&ten).unwrap().credits, 770); // 10 s × $0.07 × 1.1
        assert_eq!(
            kling
                .estimate(&RequestFacts::default())
                .unwrap()
                .units_milli,
            5000
        );
        let flat = t.tariff("fal-ai/flat").unwrap();
        let two = ResponseFacts {
            images: vec![None, None],
        };
        assert_eq!(
            flat.actual(&RequestFacts::default(), &two).unwrap().credits,
            88
        );
        assert_eq!(t.cost_usd(165), "0.165");
    }

    #[test]
    fn the_cheapest_request_bounds_every_estimate_from_below() {
        let t = table(0.1, true);
        let cheapest = |model| t.tariff(model).unwrap().cheapest();
        // A 1×1 image is still a whole megapixel when fal rounds each image.
        assert_eq!(cheapest("fal-ai/flux/dev"), 28);
        // One thousandth of a second of video, not the 5 s default.
        assert_eq!(cheapest("fal-ai/kling-video/v2/master"), 1);
        assert_eq!(cheapest("fal-ai/other"), 11);
        let unrounded = table(0.1, false).tariff("fal-ai/flux/dev").unwrap();
        assert_eq!(unrounded.cheapest(), 1);
        let flux = t.tariff("fal-ai/flux/dev").unwrap();
        for req in [RequestFacts::default(), RequestFacts::SMALLEST] {
            assert!(flux.estimate(&req).unwrap().credits >= flux.cheapest());
        }
    }

    #[test]
    fn a_tariff_keeps_its_price_after_the_table_changes_and_in_storage() {
        let flux = table(0.1, true).tariff("fal-ai/flux/dev").unwrap();
        let dearer = table(0.5, false).tariff("fal-ai/flux/dev").unwrap();
        let req = RequestFacts {
            image_size: Some((1025, 1024)),
            ..Default::default()
        };
        assert_eq!(flux.estimate(&req).unwrap().credits, 55);
        assert_eq!(dearer.estimate(&req).unwrap().credits, 38);
        let odd = Tariff {
            rule: PriceRule {
                pattern: Arc::from("a;b/*"),
                ..flux.rule.clone()
            },
            terms: flux.terms,
        };
        for tariff in [flux, dearer, odd] {
            assert_eq!(Tariff::decode(&tariff.encode()).as_ref(), Some(&tariff));
        }
        assert_eq!(Tariff::decode("megapixel;1;2;3;0;5;1;x"), None);
        assert_eq!(Tariff::decode("furlong;1;2;3;4;5;1;x"), None);
    }

    #[test]
    fn a_cost_too_large_to_work_out_is_refused_not_wrapped() {
        let flux = table(0.1, true).tariff("fal-ai/flux/dev").unwrap();
        let huge = RequestFacts {
            image_size: Some((u64::MAX, 2)),
            ..Default::default()
        };
        assert!(flux.estimate(&huge).is_err());
        let many = RequestFacts {
            num_images: Some(u64::MAX / 100),
            ..Default::default()
        };
        assert!(flux.estimate(&many).is_err());
        let returned = ResponseFacts {
            images: vec![Some((1 << 40, 1 << 40)), Some((1 << 40, 1 << 40))],
        };
        assert_eq!(flux.actual(&RequestFacts::default(), &returned), None);
    }

    #[test]
    fn refuses_bad_tables() {
        let rule = PriceRuleConfig::test("a", Unit::Request, 0.1);
        let billing = BillingConfig::default();
        assert!(PriceTable::new(&billing, &[rule.clone(), rule.clone()], &[]).is_err());
        let zero = BillingConfig {
            usd_per_credit: 0.0,
            ..BillingConfig::default()
        };
        assert!(PriceTable::new(&zero, std::slice::from_ref(&rule), &[]).is_err());
        let tab = PriceRuleConfig {
            model: "fal-ai/x\t/*".into(),
            ..rule
        };
        assert!(PriceTable::new(&billing, &[tab], &[]).is_err());
    }
}
