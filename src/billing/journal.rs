//! The hold journal: every hold is appended here (one `write`, reaching the
//! operating system) before fal is called, so that a killed process can
//! never forget a request fal may have served. SQLite gets the same hold a
//! moment later in a batch; a segment is deleted once every hold in it is
//! committed there. What remains at start-up is recovered (`store::ledger`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

/// A segment is closed for appends past this size.
const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;

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
        format!(
            "{}\t{}\t{}\t{}\t{}\t{}\n",
            self.id, self.account_id, self.key_id, self.credits, self.created_at_ms, self.model
        )
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

struct Segment {
    number: u64,
    file: File,
    bytes: u64,
    /// Holds appended to this segment so far.
    holds: u64,
}

pub struct Journal {
    dir: PathBuf,
    current: Mutex<Segment>,
    /// fsync every append: survives power loss, at the cost of a disk flush per request.
    fsync: bool,
}

/// A segment that takes no more appends, and how many holds it has.
pub struct Sealed {
    pub number: u64,
    pub holds: u64,
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
    /// Every hold in the journal at `dir`, oldest first; for recovery, before [`Journal::open`].
    pub fn read_all(dir: &Path) -> io::Result<Vec<HoldRecord>> {
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut holds = Vec::new();
        for n in segment_numbers(dir)? {
            for line in fs::read_to_string(segment_path(dir, n))?.lines() {
                match HoldRecord::parse(line) {
                    Some(h) => holds.push(h),
                    // Only a power cut can tear a line; such a hold never reached fal.
                    None => tracing::warn!(line, "unreadable hold journal line skipped"),
                }
            }
        }
        Ok(holds)
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
        fs::create_dir_all(dir)?;
        let number = segment_numbers(dir)?.last().map_or(1, |n| n + 1);
        Ok(Self {
            dir: dir.to_owned(),
            current: Mutex::new(Self::create(dir, number)?),
            fsync,
        })
    }

    fn create(dir: &Path, number: u64) -> io::Result<Segment> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(dir, number))?;
        Ok(Segment {
            number,
            file,
            bytes: 0,
            holds: 0,
        })
    }

    /// Appends a hold; returns the segment it went to.
    pub fn append(&self, hold: &HoldRecord) -> io::Result<u64> {
        let line = hold.line();
        let mut seg = self.current.lock();
        seg.file.write_all(line.as_bytes())?;
        if self.fsync {
            seg.file.sync_data()?;
        }
        seg.bytes += line.len() as u64;
        seg.holds += 1;
        Ok(seg.number)
    }

    /// Starts a new segment if the current one is full; returns the one sealed.
    pub fn rotate_if_full(&self) -> io::Result<Option<Sealed>> {
        let mut seg = self.current.lock();
        if seg.bytes < SEGMENT_BYTES {
            return Ok(None);
        }
        let next = Self::create(&self.dir, seg.number + 1)?;
        let old = std::mem::replace(&mut *seg, next);
        Ok(Some(Sealed {
            number: old.number,
            holds: old.holds,
        }))
    }

    /// Deletes a sealed segment whose holds are all committed to SQLite.
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
        assert!(j.rotate_if_full().unwrap().is_none());
        drop(j);
        // A second process (a restart) reads what the first wrote, and appends after it.
        assert_eq!(
            Journal::read_all(dir.path()).unwrap(),
            vec![hold("a"), hold("b")]
        );
        let j = Journal::open(dir.path(), false).unwrap();
        assert_eq!(j.append(&hold("c")).unwrap(), 2);
        assert_eq!(Journal::read_all(dir.path()).unwrap().len(), 3);
        j.remove(1);
        assert_eq!(Journal::read_all(dir.path()).unwrap(), vec![hold("c")]);
        Journal::clear(dir.path()).unwrap();
        assert!(Journal::read_all(dir.path()).unwrap().is_empty());
    }
}
