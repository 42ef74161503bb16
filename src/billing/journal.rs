//! The hold journal: every hold is appended here before fal is called, so
//! that a killed process can never forget a request fal may have served,
//! and every settlement (charge or release) is appended the moment memory
//! changes, so that recovery knows how each hold ended. SQLite gets the
//! same entries a moment later in a batch; a segment is deleted once every
//! entry in it is committed there. What remains at start-up is recovered
//! (`store::ledger`): settlements as recorded, holds without one at their
//! held amount.
//!
//! A segment is a file mapped into memory, so an append is a copy, not a
//! `write(2)` (which cost about 6% of a request's time; BENCHMARKS.md). The
//! pages are the file's page cache: a killed process leaves them to the
//! kernel, which writes them out, exactly as it would have written what
//! `write(2)` had handed it. With `[store] fsync` they are also put on disk
//! by the [`Flusher`]'s thread, never a request's.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use memmap2::MmapRaw;
use parking_lot::Mutex;

use super::flusher::Flusher;

use crate::billing::facts::RequestFacts;
use crate::billing::pricing::Tariff;
use crate::billing::receipt::FalReceipt;
use crate::store::jobs::JobRecord;
use crate::store::ledger::{ChargeRecord, Outcome};

/// Each segment's size, reserved on disk when it is created.
const SEGMENT_BYTES: usize = 4 * 1024 * 1024;

/// One hold, as journalled and as stored in SQLite's `holds` table.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldRecord {
    pub id: String,
    pub account_id: i64,
    pub key_id: i64,
    pub credits: u64,
    pub created_at_ms: i64,
    pub model: String,
}

impl HoldRecord {
    fn line(&self) -> String {
        // Sized up front (four numbers take at most 20 digits and a sign
        // each): one allocation per hold, where `format!` grew its string
        // several times.
        let mut line = String::with_capacity(self.id.len() + self.model.len() + 90);
        let _ = writeln!(
            line,
            "{}\t{}\t{}\t{}\t{}\t{}",
            self.id, self.account_id, self.key_id, self.credits, self.created_at_ms, self.model
        );
        line
    }

    fn parse(line: &str) -> Option<Self> {
        let mut f = line.splitn(6, '\t');
        Some(Self {
            id: f.next()?.to_owned(),
            account_id: f.next()?.parse().ok()?,
            key_id: f.next()?.parse().ok()?,
            credits: f.next()?.parse().ok()?,
            created_at_ms: f.next()?.parse().ok()?,
            model: f.next()?.to_owned(),
        })
    }
}

/// What the journal holds, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    Hold(HoldRecord),
    Settle(ChargeRecord),
    /// fal accepted a queued job: from then on the job owns its hold.
    Job(JobRecord),
    /// fal reported the job (by fal's request id) COMPLETED: it is paid for.
    Completed(String),
}

/// Settlement lines start with one of these, which no request id does.
const SETTLE_MARK: &str = "=";
const RECEIPT_SETTLE_MARK: &str = "$";
/// So do job lines, and completion lines.
const JOB_MARK: &str = "J";
const COMPLETED_MARK: &str = "C";

fn job_line(j: &JobRecord) -> String {
    let h = &j.hold;
    let tariff = j.tariff.as_ref().map_or(String::new(), Tariff::encode);
    let mut line = String::with_capacity(j.request_id.len() + h.model.len() + tariff.len() + 160);
    let _ = writeln!(
        line,
        "{JOB_MARK}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{tariff}\t{}",
        j.request_id,
        j.app,
        j.estimate_units,
        j.facts.encode(),
        h.id,
        h.account_id,
        h.key_id,
        h.credits,
        h.created_at_ms,
        h.model
    );
    line
}

fn parse_job(line: &str) -> Option<JobRecord> {
    let mut f = line.splitn(12, '\t');
    (f.next()? == JOB_MARK).then_some(())?;
    let request_id = f.next()?.to_owned();
    let app = f.next()?.to_owned();
    let estimate_units = f.next()?.parse().ok()?;
    let facts = RequestFacts::decode(f.next()?);
    let (id, account_id, key_id, credits, created_at_ms) = (
        f.next()?.to_owned(),
        f.next()?.parse().ok()?,
        f.next()?.parse().ok()?,
        f.next()?.parse().ok()?,
        f.next()?.parse().ok()?,
    );
    let tariff = match f.next()? {
        "" => None,
        text => Some(Tariff::decode(text)?),
    };
    let hold = HoldRecord {
        id,
        account_id,
        key_id,
        credits,
        created_at_ms,
        model: f.next()?.to_owned(),
    };
    Some(JobRecord {
        request_id,
        app,
        hold,
        estimate_units,
        facts,
        tariff,
    })
}

/// A settlement's line: with fal's receipt when there is one (`$`), else
/// as the builds before receipts wrote it (`=`), which they can still read.
fn settle_line(c: &ChargeRecord) -> String {
    let mut line = String::with_capacity(c.id.len() + c.model.len() + 220);
    let status = c.fal_status.map_or(String::new(), |s| s.to_string());
    let receipt = match (&c.fal.request_id, c.fal.units_milli) {
        (None, None) => None,
        (id, units) => Some(format!(
            "{}\t{}\t",
            id.as_deref().unwrap_or(""),
            units.map_or(String::new(), |u| u.to_string())
        )),
    };
    let mark = match receipt {
        Some(_) => RECEIPT_SETTLE_MARK,
        None => SETTLE_MARK,
    };
    let _ = writeln!(
        line,
        "{mark}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{status}\t{}\t{}\t{}\t{}{}",
        c.id,
        c.account_id,
        c.key_id,
        c.units_milli,
        c.credits,
        c.held,
        c.shortfall,
        c.outcome.as_str(),
        c.started_at_ms,
        c.settled_at_ms,
        receipt.unwrap_or_default(),
        c.model
    );
    line
}

/// A settlement line: with fal's receipt (`$`, since fal's request ids were
/// kept) or without (`=`, journals an older build left).
fn parse_settle(line: &str) -> Option<ChargeRecord> {
    let with_receipt = line.starts_with(RECEIPT_SETTLE_MARK);
    let mut f = line.splitn(if with_receipt { 15 } else { 13 }, '\t');
    let mark = f.next()?;
    (mark == SETTLE_MARK || mark == RECEIPT_SETTLE_MARK).then_some(())?;
    let mut c = ChargeRecord {
        id: f.next()?.to_owned(),
        account_id: f.next()?.parse().ok()?,
        key_id: f.next()?.parse().ok()?,
        units_milli: f.next()?.parse().ok()?,
        credits: f.next()?.parse().ok()?,
        held: f.next()?.parse().ok()?,
        shortfall: f.next()?.parse().ok()?,
        fal_status: match f.next()? {
            "" => None,
            s => Some(s.parse().ok()?),
        },
        outcome: Outcome::parse(f.next()?)?,
        started_at_ms: f.next()?.parse().ok()?,
        settled_at_ms: f.next()?.parse().ok()?,
        model: String::new(),
        fal: FalReceipt::default(),
    };
    if with_receipt {
        c.fal.request_id = match f.next()? {
            "" => None,
            id => Some(id.to_owned()),
        };
        c.fal.units_milli = match f.next()? {
            "" => None,
            u => Some(u.parse().ok()?),
        };
    }
    c.model = f.next()?.to_owned();
    Some(c)
}

impl Entry {
    fn parse(line: &str) -> Option<Self> {
        if line.starts_with(SETTLE_MARK) || line.starts_with(RECEIPT_SETTLE_MARK) {
            parse_settle(line).map(Entry::Settle)
        } else if line.starts_with(JOB_MARK) {
            parse_job(line).map(Entry::Job)
        } else if let Some(id) = line.strip_prefix(COMPLETED_MARK) {
            let id = id.strip_prefix('\t')?;
            (!id.is_empty()).then(|| Entry::Completed(id.to_owned()))
        } else {
            HoldRecord::parse(line).map(Entry::Hold)
        }
    }
}

struct Segment {
    number: u64,
    /// Written only under the journal's lock, through [`Segment::write`];
    /// shared with the flusher, which only flushes what was written.
    map: Arc<MmapRaw>,
    /// Bytes appended: the next line starts here.
    len: usize,
    /// Entries appended to this segment so far.
    entries: u64,
}

pub struct Journal {
    dir: PathBuf,
    current: Mutex<Segment>,
    /// The next segment, created ahead by the writer's thread, so that the
    /// append that fills a segment does not create, reserve and map a file
    /// on a request's thread.
    spare: Mutex<Option<Segment>>,
    /// Full segments, for the writer to delete once their holds are committed.
    sealed: Mutex<Vec<Sealed>>,
    /// With `[store] fsync`: puts appends on disk, so that they survive power loss.
    flusher: Option<Flusher>,
}

/// A segment that takes no more appends, and how many entries it has.
pub struct Sealed {
    pub number: u64,
    pub entries: u64,
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:012}.holds"))
}

fn segment_numbers(dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name.strip_suffix(".holds").and_then(|n| n.parse().ok()) {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

impl Journal {
    /// Every entry in the journal at `dir`, oldest first; for recovery, before [`Journal::open`].
    pub fn read_all(dir: &Path) -> io::Result<Vec<Entry>> {
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut entries = Vec::new();
        for n in segment_numbers(dir)? {
            let bytes = fs::read(segment_path(dir, n))?;
            // Whole lines only: after the last newline come the segment's
            // unwritten zeros, or an entry cut off mid-copy by a kill: a hold
            // that never reached fal, or a settlement that never finished
            // (the newline is written last).
            let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            for line in String::from_utf8_lossy(&bytes[..end]).lines() {
                match Entry::parse(line) {
                    Some(e) => entries.push(e),
                    // Only a power cut can tear a line.
                    None => tracing::warn!(line, "unreadable hold journal line skipped"),
                }
            }
        }
        Ok(entries)
    }

    /// Removes every segment; only once their holds are safely in SQLite.
    pub fn clear(dir: &Path) -> io::Result<()> {
        if dir.exists() {
            for n in segment_numbers(dir)? {
                fs::remove_file(segment_path(dir, n))?;
            }
        }
        Ok(())
    }

    /// Starts a fresh segment after any that exist.
    pub fn open(dir: &Path, fsync: bool) -> io::Result<Self> {
        // Who paid for what is the operator's business alone.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        let number = segment_numbers(dir)?.last().map_or(1, |n| n + 1);
        Ok(Self {
            dir: dir.to_owned(),
            current: Mutex::new(Self::create(dir, number)?),
            spare: Mutex::default(),
            sealed: Mutex::default(),
            flusher: fsync.then(Flusher::spawn).transpose()?,
        })
    }

    fn create(dir: &Path, number: u64) -> io::Result<Segment> {
        let path = segment_path(dir, number);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let mapped = reserve(&file, SEGMENT_BYTES).and_then(|()| MmapRaw::map_raw(&file));
        let map = mapped.inspect_err(|_| {
            // Gone again, so that the next append (a full disk freed) can create it afresh.
            let _ = fs::remove_file(&path);
        })?;
        Ok(Segment {
            number,
            map: Arc::new(map),
            len: 0,
            entries: 0,
        })
    }

    /// Appends a hold; returns the segment it went to.
    pub fn append(&self, hold: &HoldRecord) -> io::Result<u64> {
        self.append_line(&hold.line())
    }

    /// Appends a job fal accepted; returns the segment it went to.
    pub fn append_job(&self, job: &JobRecord) -> io::Result<u64> {
        self.append_line(&job_line(job))
    }

    /// Appends that fal reported a job COMPLETED; returns the segment it went to.
    pub fn append_completed(&self, request_id: &str) -> io::Result<u64> {
        self.append_line(&format!("{COMPLETED_MARK}\t{request_id}\n"))
    }

    /// Appends how a hold ended; returns the segment it went to.
    pub fn append_settle(&self, charge: &ChargeRecord) -> io::Result<u64> {
        self.append_line(&settle_line(charge))
    }

    fn append_line(&self, line: &str) -> io::Result<u64> {
        let bytes = line.as_bytes();
        if bytes.len() > SEGMENT_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "entry too long to journal",
            ));
        }
        let mut seg = self.current.lock();
        if seg.len + bytes.len() > seg.map.len() {
            let spare = self.spare.lock().take();
            let next = match spare {
                Some(next) => next,
                // The writer has not made one yet: made here, once.
                None => Self::create(&self.dir, seg.number + 1)?,
            };
            let full = std::mem::replace(&mut *seg, next);
            self.sealed.lock().push(Sealed {
                number: full.number,
                entries: full.entries,
            });
        }
        let at = seg.len;
        let (body, newline) = bytes.split_at(bytes.len() - 1);
        seg.write(at, body);
        // The newline strictly after the rest: recovery reads whole lines only.
        fence(Ordering::Release);
        seg.write(at + body.len(), newline);
        if let Some(flusher) = &self.flusher {
            flusher.note(&seg.map, at, at + bytes.len());
        }
        seg.len += bytes.len();
        seg.entries += 1;
        Ok(seg.number)
    }

    /// Resolves once every entry appended so far is on disk: at once
    /// without `[store] fsync`, where a killed process loses nothing the
    /// kernel was handed. Dropping it leaves nothing behind.
    pub fn flushed(&self) -> impl std::future::Future<Output = io::Result<()>> + 'static {
        let flushed = self.flusher.as_ref().map(Flusher::flushed);
        async move {
            match flushed {
                Some(flushed) => flushed.await,
                None => Ok(()),
            }
        }
    }

    /// Makes the next segment ahead of need; for the writer's thread.
    pub fn prepare_next(&self) {
        let next = self.current.lock().number + 1;
        let mut spare = self.spare.lock();
        if spare.is_some() {
            return;
        }
        match Self::create(&self.dir, next) {
            Ok(segment) => *spare = Some(segment),
            // An append got there first (it made the file itself): next time.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => tracing::warn!(error = %e, "could not make the next journal segment ahead"),
        }
    }

    /// The segments filled since the last call; they take no more appends.
    pub fn take_sealed(&self) -> Vec<Sealed> {
        std::mem::take(&mut *self.sealed.lock())
    }

    /// Deletes a sealed segment whose entries are all committed to SQLite.
    pub fn remove(&self, number: u64) {
        if let Err(e) = fs::remove_file(segment_path(&self.dir, number)) {
            tracing::warn!(error = %e, number, "could not remove a hold journal segment");
        }
    }

    /// After a clean stop every hold is settled in SQLite: nothing to keep.
    pub fn remove_all(&self) -> io::Result<()> {
        let current = self.current.lock();
        Self::clear(&self.dir)?;
        drop(current);
        Ok(())
    }
}

impl Segment {
    fn write(&mut self, at: usize, bytes: &[u8]) {
        assert!(
            at + bytes.len() <= self.map.len(),
            "journal write beyond its segment"
        );
        // SAFETY: within the mapping (checked above), which lives as long as
        // `self.map`; only the holder of the journal's lock (`&mut self`)
        // writes, and only bytes past what was written before, so neither
        // readers of the file nor the flusher see a byte change twice.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(at),
                bytes.len(),
            );
        }
    }
}

/// Disk blocks for the whole segment, now: a store into a mapped hole on a
/// full disk would kill the process (SIGBUS) instead of failing a request.
fn reserve(file: &File, len: usize) -> io::Result<()> {
    // SAFETY: a plain system call on a descriptor we own.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) } {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(id: &str) -> HoldRecord {
        HoldRecord {
            id: id.into(),
            account_id: 1,
            key_id: 2,
            credits: 30,
            created_at_ms: 1_700_000_000_000,
            model: "fal-ai/flux/dev".into(),
        }
    }

    #[test]
    fn holds_survive_in_segments_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), false).unwrap();
        assert_eq!(j.append(&hold("a")).unwrap(), 1);
        assert_eq!(j.append(&hold("b")).unwrap(), 1);
        assert!(j.take_sealed().is_empty());
        drop(j);
        // A second process (a restart) reads what the first wrote, and appends after it.
        assert_eq!(
            Journal::read_all(dir.path()).unwrap(),
            vec![Entry::Hold(hold("a")), Entry::Hold(hold("b"))]
        );
        let j = Journal::open(dir.path(), false).unwrap();
        assert_eq!(j.append(&hold("c")).unwrap(), 2);
        assert_eq!(Journal::read_all(dir.path()).unwrap().len(), 3);
        j.remove(1);
        assert_eq!(
            Journal::read_all(dir.path()).unwrap(),
            vec![Entry::Hold(hold("c"))]
        );
        Journal::clear(dir.path()).unwrap();
        assert!(Journal::read_all(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_hold_cut_off_mid_copy_is_not_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), false).unwrap();
        j.append(&hold("a")).unwrap();
        let whole = hold("b").line();
        // What a kill mid-copy leaves: every field there and parseable,
        // the last one cut short, no newline.
        let torn = &whole[..whole.len() - 5];
        assert!(HoldRecord::parse(torn).is_some());
        let mut seg = j.current.lock();
        let at = seg.len;
        seg.write(at, torn.as_bytes());
        drop(seg);
        assert_eq!(
            Journal::read_all(dir.path()).unwrap(),
            vec![Entry::Hold(hold("a"))]
        );
    }

    #[test]
    fn a_full_segment_is_sealed_and_appends_go_on_in_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), false).unwrap();
        // Made ahead, as the writer does; an empty segment reads as nothing.
        j.prepare_next();
        j.prepare_next();
        assert!(dir.path().join("000000000002.holds").exists());
        assert!(Journal::read_all(dir.path()).unwrap().is_empty());
        let mut n = 0u64;
        while j.append(&hold(&format!("h{n}"))).unwrap() == 1 {
            n += 1;
        }
        let sealed = j.take_sealed();
        assert_eq!(sealed.len(), 1);
        assert_eq!((sealed[0].number, sealed[0].entries), (1, n));
        assert!(j.take_sealed().is_empty());
        let all = Journal::read_all(dir.path()).unwrap();
        assert_eq!(all.len() as u64, n + 1);
        assert_eq!(all.last().unwrap(), &Entry::Hold(hold(&format!("h{n}"))));
    }

    #[test]
    fn jobs_and_settlements_are_read_back_after_their_holds() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), false).unwrap();
        j.append(&hold("a")).unwrap();
        let charge = ChargeRecord {
            id: "a".into(),
            account_id: 1,
            key_id: 2,
            model: "fal-ai/flux/dev".into(),
            units_milli: 2000,
            credits: 12,
            held: 30,
            shortfall: 0,
            fal_status: Some(200),
            outcome: Outcome::Charged,
            started_at_ms: 1,
            settled_at_ms: 2,
            fal: FalReceipt {
                request_id: Some("fal-req-1".into()),
                units_milli: Some(2000),
            },
        };
        let released = ChargeRecord {
            fal_status: None,
            credits: 0,
            outcome: Outcome::Released,
            fal: FalReceipt::default(),
            ..charge.clone()
        };
        let job = JobRecord {
            request_id: "fal-1".into(),
            app: "fal-ai/flux".into(),
            hold: hold("a"),
            estimate_units: 1000,
            facts: RequestFacts {
                image_size: Some((1024, 768)),
                num_images: Some(2),
                duration_milli: None,
            },
            tariff: None,
        };
        j.append_job(&job).unwrap();
        j.append_completed("fal-1").unwrap();
        j.append_settle(&charge).unwrap();
        j.append_settle(&released).unwrap();
        assert_eq!(
            Journal::read_all(dir.path()).unwrap(),
            vec![
                Entry::Hold(hold("a")),
                Entry::Job(job),
                Entry::Completed("fal-1".into()),
                Entry::Settle(charge),
                Entry::Settle(released)
            ]
        );
    }

    /// A journal an older build left, its settlements without fal's receipt,
    /// is read back by this one.
    #[test]
    fn settlements_an_older_build_journalled_are_read() {
        let old = "=\treq_a\t1\t2\t2000\t12\t30\t0\t200\tcharged\t1\t2\tfal-ai/flux/dev";
        let Some(Entry::Settle(c)) = Entry::parse(old) else {
            panic!("not read: {old}");
        };
        assert_eq!(
            (c.id.as_str(), c.credits, c.model.as_str(), c.fal),
            ("req_a", 12, "fal-ai/flux/dev", FalReceipt::default())
        );
    }
}
