//! The local, append-only spool of usage records.
//!
//! Records are JSON lines in numbered segment files (`usage-00000001.jsonl`, …). The writer
//! appends each record with one `write(2)` under a lock, so a record the client has seen the end
//! of is in the kernel before the last byte goes out (it survives a `SIGKILL`; `fsync` runs every
//! [`FSYNC_EVERY`] against power loss).
//!
//! **Ownership.** Several processes may write into one spool directory at once: during a
//! graceful upgrade (`-u` then `SIGQUIT`) the old and the new process both serve for a while.
//! Each writer creates its own segments (`O_EXCL`, a number above every existing one) and holds
//! an exclusive `flock` on the segment it is writing; a segment nobody holds is sealed. Exactly
//! one process is the *reader*: it holds the `flock` on the directory's `LOCK` file, and only it
//! reads, commits and deletes segments. The reader reads segments in order and never goes past a
//! segment that is still live, so it never deletes another process's live segment. A second
//! instance started on the same directory without `-u` is refused; one started with `-u` writes
//! at once and becomes the reader when the old process lets go (after its last drain, or when it
//! dies: the kernel drops a dead process's locks).
//!
//! **Torn lines.** A write that fails half-way (a crash, a full disk) leaves a partial last line;
//! the writer then seals that segment and continues in a new one, so a partial line is always the
//! last line of a sealed segment, which the reader skips with a log line.
//!
//! **Failing closed.** When a record cannot be appended (disk full, directory read-only or gone),
//! the spool stops [`accepting`](UsageSpool::accepting): the gateway refuses paid requests with
//! 503 before forwarding them, keeps the records of requests already under way in memory
//! (bounded), and [`check`](UsageSpool::check) (every drain tick) brings the spool back on its
//! own once the directory is writable again.
//!
//! The reader's position lives in `committed`, moved only after the store committed the records
//! before it. Records the store refuses for their content go to `dead-letters.jsonl` beside the
//! segments, one JSON line each, for an operator to look at.

use super::UsageRecord;
use crate::metrics::METRICS;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A segment is closed for writing past this size.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// How often appended records are flushed to the disk itself.
pub const FSYNC_EVERY: Duration = Duration::from_millis(100);
/// Records kept in memory while the spool cannot be appended, at most (about 10 MB).
const PENDING_MAX: usize = 16_384;
/// The file whose `flock` makes a process the spool's reader.
const LOCK_FILE: &str = "LOCK";
/// Records the store refused for their content.
pub const DEAD_LETTER_FILE: &str = "dead-letters.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("usage spool {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "the usage spool {dir} is in use by another komilion process{}; give each instance its own \
         `usage.spool_dir`, or start the new process with -u to take over during an upgrade",
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    InUse { dir: PathBuf, pid: Option<u32> },
    #[error("the usage spool {dir} cannot be appended right now; the record is kept in memory until it can")]
    NotAccepting { dir: PathBuf },
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

fn segment_name(seq: u64) -> String {
    format!("usage-{seq:08}.jsonl")
}

fn segment_seq(name: &str) -> Option<u64> {
    name.strip_prefix("usage-")?.strip_suffix(".jsonl")?.parse().ok()
}

/// Segment numbers present in `dir`, ascending.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut seqs: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| segment_seq(&e.file_name().to_string_lossy()))
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

/// How a process opens the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolMode {
    /// A normal start: the process must be the spool's only reader, or it refuses to start.
    Exclusive,
    /// A graceful upgrade (`-u`): the old process may still hold the spool; write at once and
    /// become the reader when it lets go.
    Successor,
}

/// The segment this process is writing, locked so that no reader takes it for sealed.
struct Segment {
    seq: u64,
    file: File,
    size: u64,
    dirty: bool,
}

struct Writer {
    /// None after a failed write or a failed roll, until [`UsageSpool::check`] opens a new one.
    segment: Option<Segment>,
    /// Lines that could not be appended, oldest first.
    pending: VecDeque<Vec<u8>>,
}

pub struct UsageSpool {
    dir: PathBuf,
    writer: Mutex<Writer>,
    /// The segment being written (0 when none).
    writing: AtomicU64,
    /// Appends go through; cleared by a failed append or probe, set again by [`Self::check`].
    accepting: AtomicBool,
    /// The `LOCK` file, flocked, while this process is the reader.
    reader_lock: Mutex<Option<File>>,
}

impl UsageSpool {
    /// Open the spool in `dir` (created if needed) and start a new segment.
    pub fn open(dir: &Path, mode: SpoolMode) -> Result<UsageSpool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let spool = UsageSpool {
            dir: dir.to_owned(),
            writer: Mutex::new(Writer {
                segment: None,
                pending: VecDeque::new(),
            }),
            writing: AtomicU64::new(0),
            accepting: AtomicBool::new(true),
            reader_lock: Mutex::new(None),
        };
        if !spool.try_lock_reader()? && mode == SpoolMode::Exclusive {
            let pid = std::fs::read_to_string(dir.join(LOCK_FILE))
                .ok()
                .and_then(|t| t.trim().parse().ok());
            return Err(SpoolError::InUse {
                dir: dir.to_owned(),
                pid,
            });
        }
        let segment = spool.new_segment()?;
        spool.writing.store(segment.seq, Ordering::Release);
        spool.lock_writer().segment = Some(segment);
        METRICS.spool_writable.set(1);
        Ok(spool)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        // A panic while appending leaves nothing half-done that matters: keep going.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take the reader's lock if it is free. True when this process is (now) the reader.
    fn try_lock_reader(&self) -> Result<bool, SpoolError> {
        let mut held = self.reader_lock.lock().unwrap_or_else(|p| p.into_inner());
        if held.is_some() {
            return Ok(true);
        }
        let path = self.dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => {
                // The pid is only for the message a second instance prints.
                let _ = file.set_len(0);
                let _ = writeln!(file, "{}", std::process::id());
                *held = Some(file);
                Ok(true)
            }
            Err(TryLockError::WouldBlock) => Ok(false),
            Err(TryLockError::Error(e)) => Err(io_err(&path)(e)),
        }
    }

    /// Become the reader if the previous one let go. On taking over, this process's writer moves
    /// to a new segment above every existing one, so that everything older is sealed as soon as
    /// its writer is gone and is read before what this process writes next.
    pub fn try_take_reader(&self) -> bool {
        if self.is_reader() {
            return true;
        }
        match self.try_lock_reader() {
            Ok(true) => {
                tracing::info!(spool = %self.dir.display(), "this process now drains the usage spool");
                if let Err(e) = self.roll() {
                    tracing::warn!("cannot start a new spool segment: {e}");
                }
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!("cannot take the usage spool's lock: {e}");
                false
            }
        }
    }

    pub fn is_reader(&self) -> bool {
        self.reader_lock.lock().is_ok_and(|l| l.is_some())
    }

    /// Stop being the reader (after the last drain at shutdown), so that a successor takes over
    /// without waiting for this process to exit.
    pub fn release_reader(&self) {
        let mut held = self.reader_lock.lock().unwrap_or_else(|p| p.into_inner());
        *held = None;
    }

    /// Create and lock a segment numbered above every existing one and the reader's position.
    fn new_segment(&self) -> Result<Segment, SpoolError> {
        let floor = read_position(&self.dir).seq;
        let mut seq = segments(&self.dir)
            .map_err(io_err(&self.dir))?
            .last()
            .copied()
            .unwrap_or(0)
            .max(floor)
            + 1;
        loop {
            let path = self.dir.join(segment_name(seq));
            match OpenOptions::new().create_new(true).append(true).open(&path) {
                Ok(file) => {
                    // Nobody else can hold a file we just created: this only fails on a
                    // filesystem without flock, where the reader would take it for sealed.
                    file.try_lock()
                        .map_err(|e| io_err(&path)(io::Error::other(e.to_string())))?;
                    return Ok(Segment {
                        seq,
                        file,
                        size: 0,
                        dirty: false,
                    });
                }
                // Another process took this number a moment ago.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => seq += 1,
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
    }

    /// Seal the current segment and continue in a new one.
    fn roll(&self) -> Result<(), SpoolError> {
        let segment = self.new_segment()?;
        let mut w = self.lock_writer();
        if let Some(old) = w.segment.take() {
            let _ = old.file.sync_data();
        }
        self.writing.store(segment.seq, Ordering::Release);
        w.segment = Some(segment);
        Ok(())
    }

    /// Whether records can be appended. Paid requests are refused while they cannot.
    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }

    /// Append one record. Returns once the record is in the kernel's page cache. When it cannot
    /// be written it is kept in memory (bounded) until [`Self::check`] writes it, and the spool
    /// stops accepting.
    pub fn append(&self, record: &UsageRecord) -> Result<(), SpoolError> {
        let mut line = Vec::with_capacity(640);
        serde_json::to_writer(&mut line, record).map_err(|e| SpoolError::Io {
            path: self.dir.clone(),
            source: e.into(),
        })?;
        line.push(b'\n');
        let mut w = self.lock_writer();
        if !w.pending.is_empty() {
            // Keep order with the records already waiting.
            return Err(self.keep_pending(&mut w, line));
        }
        match self.write_line(&mut w, &line) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.stop_accepting(&e);
                let _ = self.keep_pending(&mut w, line);
                Err(e)
            }
        }
    }

    fn write_line(&self, w: &mut Writer, line: &[u8]) -> Result<(), SpoolError> {
        let full = w
            .segment
            .as_ref()
            .is_none_or(|s| s.size > 0 && s.size + line.len() as u64 > SEGMENT_BYTES);
        if full {
            let next = self.new_segment()?;
            if let Some(old) = w.segment.take() {
                let _ = old.file.sync_data();
            }
            self.writing.store(next.seq, Ordering::Release);
            w.segment = Some(next);
        }
        let Some(segment) = w.segment.as_mut() else {
            return Err(SpoolError::NotAccepting { dir: self.dir.clone() });
        };
        if let Err(e) = segment.file.write_all(line) {
            // Part of the line may be in the file: seal it there, so the partial line is the
            // last of a sealed segment (skipped by the reader) and the next record starts clean.
            w.segment = None;
            return Err(io_err(
                &self.dir.join(segment_name(self.writing.load(Ordering::Acquire))),
            )(e));
        }
        segment.size += line.len() as u64;
        segment.dirty = true;
        Ok(())
    }

    fn keep_pending(&self, w: &mut Writer, line: Vec<u8>) -> SpoolError {
        if w.pending.len() < PENDING_MAX {
            w.pending.push_back(line);
        } else {
            METRICS.spool_errors.inc();
            tracing::error!(
                "usage spool {}: {PENDING_MAX} records already wait in memory; a usage record is lost",
                self.dir.display()
            );
        }
        METRICS.spool_pending.set(w.pending.len() as i64);
        SpoolError::NotAccepting { dir: self.dir.clone() }
    }

    fn stop_accepting(&self, cause: &SpoolError) {
        METRICS.spool_errors.inc();
        if self.accepting.swap(false, Ordering::AcqRel) {
            METRICS.spool_writable.set(0);
            tracing::error!("{cause}; refusing paid requests until usage can be spooled again");
        }
    }

    /// Check that the directory takes new files and writes (a disk that filled up, a directory
    /// turned read-only or removed), and bring a spool that stopped accepting back: a new
    /// segment, the records kept in memory written into it. Called every drain tick.
    pub fn check(&self) {
        let probe = self.dir.join(format!(".probe-{}", std::process::id()));
        let probed = (|| -> io::Result<()> {
            let mut f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&probe)?;
            f.write_all(b"komilion spool probe\n")?;
            drop(f);
            std::fs::remove_file(&probe)
        })();
        if let Err(e) = probed {
            self.stop_accepting(&io_err(&self.dir)(e));
            return;
        }
        if self.accepting() {
            return;
        }
        let mut w = self.lock_writer();
        if w.segment.is_none() {
            match self.new_segment() {
                Ok(segment) => {
                    self.writing.store(segment.seq, Ordering::Release);
                    w.segment = Some(segment);
                }
                Err(e) => {
                    tracing::debug!("the usage spool is still not writable: {e}");
                    return;
                }
            }
        }
        while let Some(line) = w.pending.pop_front() {
            if let Err(e) = self.write_line(&mut w, &line) {
                w.pending.push_front(line);
                METRICS.spool_pending.set(w.pending.len() as i64);
                tracing::debug!("the usage spool is still not writable: {e}");
                return;
            }
        }
        METRICS.spool_pending.set(0);
        METRICS.spool_writable.set(1);
        self.accepting.store(true, Ordering::Release);
        tracing::info!(spool = %self.dir.display(), "the usage spool accepts records again");
    }

    /// Flush appended records to disk (every [`FSYNC_EVERY`] and at shutdown). The flush runs on
    /// a second handle of the file, so appends never wait for the disk.
    pub fn sync(&self) {
        let handle = {
            let mut w = self.lock_writer();
            match w.segment.as_mut() {
                Some(s) if s.dirty => {
                    s.dirty = false;
                    s.file.try_clone().ok()
                }
                _ => None,
            }
        };
        if let Some(file) = handle {
            let _ = file.sync_data();
        }
    }

    pub fn writing_segment(&self) -> u64 {
        self.writing.load(Ordering::Acquire)
    }

    /// A segment some writer still holds: this process's own, or one another process has locked.
    fn is_live(&self, seq: u64) -> bool {
        if seq == self.writing_segment() {
            return true;
        }
        let Ok(file) = File::open(self.dir.join(segment_name(seq))) else {
            return false;
        };
        // A shared lock is granted only when no writer holds its exclusive one; it is released
        // when `file` is dropped.
        matches!(file.try_lock_shared(), Err(TryLockError::WouldBlock))
    }

    /// Keep a record the store refused for its content, with the reason, in the dead-letter
    /// file, flushed to disk before the reader moves past it.
    pub fn dead_letter(&self, record: &UsageRecord, reason: &str) -> Result<(), SpoolError> {
        let path = self.dir.join(DEAD_LETTER_FILE);
        let line = serde_json::json!({
            "dead_lettered_at": chrono::Utc::now(),
            "reason": reason,
            "record": record,
        });
        let mut text = line.to_string();
        text.push('\n');
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.write_all(text.as_bytes()).map_err(io_err(&path))?;
        file.sync_data().map_err(io_err(&path))
    }
}

/// Where the reader is: the next unread byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub seq: u64,
    pub offset: u64,
}

fn read_position(dir: &Path) -> Position {
    let Ok(text) = std::fs::read_to_string(dir.join("committed")) else {
        return Position::default();
    };
    let mut parts = text.split_whitespace().map(|p| p.parse::<u64>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(seq), Some(offset)) => Position { seq, offset },
        _ => Position::default(),
    }
}

/// A batch read from the spool, and where the reader will be once it is committed.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<UsageRecord>,
    pub next: Position,
}

/// Reads what the writers appended, in order, from the committed position. Only the process
/// holding the spool's reader lock may have one.
pub struct SpoolReader {
    dir: PathBuf,
    position: Position,
}

impl SpoolReader {
    pub fn open(spool: &UsageSpool) -> SpoolReader {
        SpoolReader {
            dir: spool.dir.clone(),
            position: read_position(&spool.dir),
        }
    }

    pub fn position(&self) -> Position {
        self.position
    }

    /// Up to `max` records after the committed position. A segment that is still live (being
    /// written by this or another process) is read up to its last complete line and nothing
    /// after it is read; in a sealed segment an incomplete last line is torn and skipped.
    pub fn read(&self, max: usize, spool: &UsageSpool) -> Result<Batch, SpoolError> {
        let mut batch = Batch {
            records: Vec::new(),
            next: self.position,
        };
        let seqs = segments(&self.dir).map_err(io_err(&self.dir))?;
        for seq in seqs.into_iter().filter(|s| *s >= self.position.seq) {
            let live = spool.is_live(seq);
            let path = self.dir.join(segment_name(seq));
            let mut file = File::open(&path).map_err(io_err(&path))?;
            let mut offset = if seq == self.position.seq {
                self.position.offset
            } else {
                0
            };
            file.seek(SeekFrom::Start(offset)).map_err(io_err(&path))?;
            let mut reader = BufReader::new(file);
            let mut line = Vec::new();
            loop {
                if batch.records.len() >= max {
                    return Ok(batch);
                }
                line.clear();
                let n = reader.read_until(b'\n', &mut line).map_err(io_err(&path))?;
                if n == 0 {
                    break;
                }
                if line.last() != Some(&b'\n') {
                    if live {
                        // Being written right now: read it next time.
                        return Ok(batch);
                    }
                    tracing::warn!(segment = %path.display(), offset, "skipping a torn last line of {n} bytes in the usage spool");
                    offset += n as u64;
                    batch.next = Position { seq, offset };
                    break;
                }
                offset += n as u64;
                match serde_json::from_slice::<UsageRecord>(&line) {
                    Ok(record) => batch.records.push(record),
                    Err(e) => {
                        tracing::warn!(segment = %path.display(), offset, "skipping an unreadable usage spool line: {e}")
                    }
                }
                batch.next = Position { seq, offset };
            }
            if live {
                // Nothing after a live segment is read: its writer may still add to it, and the
                // position cannot move past it.
                break;
            }
            // A sealed segment read to its end: the next batch starts in the following one.
            batch.next = Position {
                seq: seq + 1,
                offset: 0,
            };
        }
        Ok(batch)
    }

    /// Record that everything before `next` is in the store, and delete the segments wholly
    /// before it (all sealed: the reader never passes a live one). The position is replaced
    /// atomically (rename) but not flushed to disk: after a power loss an older position only
    /// replays records the store skips.
    pub fn commit(&mut self, next: Position) -> Result<(), SpoolError> {
        let tmp = self.dir.join("committed.tmp");
        let path = self.dir.join("committed");
        std::fs::write(&tmp, format!("{} {}\n", next.seq, next.offset)).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        let moved_segment = next.seq != self.position.seq;
        self.position = next;
        if moved_segment {
            for seq in segments(&self.dir).map_err(io_err(&self.dir))? {
                if seq < next.seq {
                    let _ = std::fs::remove_file(self.dir.join(segment_name(seq)));
                }
            }
        }
        Ok(())
    }

    /// Bytes appended but not yet committed, and the creation time of the oldest such record.
    pub fn backlog(&self) -> (u64, Option<chrono::DateTime<chrono::Utc>>) {
        let mut bytes = 0;
        let mut oldest = None;
        if let Ok(seqs) = segments(&self.dir) {
            for seq in seqs.into_iter().filter(|s| *s >= self.position.seq) {
                let path = self.dir.join(segment_name(seq));
                let Ok(meta) = std::fs::metadata(&path) else { continue };
                let start = if seq == self.position.seq {
                    self.position.offset
                } else {
                    0
                };
                let pending = meta.len().saturating_sub(start);
                if pending > 0 && oldest.is_none() {
                    oldest = first_record_time(&path, start);
                }
                bytes += pending;
            }
        }
        (bytes, oldest)
    }
}

fn first_record_time(path: &Path, offset: u64) -> Option<chrono::DateTime<chrono::Utc>> {
    let mut file = File::open(path).ok()?;
    file.seek(SeekFrom::Start(offset)).ok()?;
    let mut line = Vec::new();
    BufReader::new(file.take(1 << 20)).read_until(b'\n', &mut line).ok()?;
    serde_json::from_slice::<UsageRecord>(&line).ok().map(|r| r.created_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(id: &str) -> UsageRecord {
        UsageRecord {
            request_id: id.into(),
            account_id: "acct_1".into(),
            key_id: Some("key_1".into()),
            created_at: chrono::Utc::now(),
            route: "chat_completions".into(),
            requested_model: Some("gpt-4o-mini".into()),
            routed_model: Some("gpt-4o-mini".into()),
            provider: Some("openai".into()),
            task: None,
            status: 200,
            input_tokens: 10,
            output_tokens: 5,
            cached_tokens: 0,
            reasoning_tokens: 0,
            cost_nano_usd: 4_500,
            unbilled_nano_usd: 0,
            estimated: false,
            latency_ms: 12,
            ttfb_ms: Some(3),
            cache_hit: false,
            lease_id: None,
            end_user: None,
        }
    }

    fn ids(batch: &Batch) -> Vec<&str> {
        batch.records.iter().map(|r| r.request_id.as_str()).collect()
    }

    fn open(dir: &Path) -> UsageSpool {
        UsageSpool::open(dir, SpoolMode::Exclusive).unwrap()
    }

    #[test]
    fn appended_records_are_read_once_committed_and_survive_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path());
        for i in 0..5 {
            spool.append(&record(&format!("r{i}"))).unwrap();
        }
        let mut reader = SpoolReader::open(&spool);
        let batch = reader.read(3, &spool).unwrap();
        assert_eq!(ids(&batch), ["r0", "r1", "r2"]);
        reader.commit(batch.next).unwrap();
        // A restart: the reader resumes after what was committed, the writer opens a new segment.
        drop(spool);
        let spool = open(dir.path());
        spool.append(&record("r5")).unwrap();
        let reader = SpoolReader::open(&spool);
        assert_eq!(ids(&reader.read(100, &spool).unwrap()), ["r3", "r4", "r5"]);
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_later_records_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path());
        spool.append(&record("whole")).unwrap();
        let seq = spool.writing_segment();
        drop(spool);
        // A crash in the middle of a write.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(segment_name(seq)))
            .unwrap();
        f.write_all(br#"{"request_id":"torn","account_"#).unwrap();
        let spool = open(dir.path());
        spool.append(&record("after")).unwrap();
        let mut reader = SpoolReader::open(&spool);
        let batch = reader.read(100, &spool).unwrap();
        assert_eq!(ids(&batch), ["whole", "after"]);
        reader.commit(batch.next).unwrap();
        assert!(
            !dir.path().join(segment_name(seq)).exists(),
            "a committed sealed segment is deleted"
        );
        assert_eq!(reader.read(100, &spool).unwrap().records.len(), 0);
    }

    #[test]
    fn an_unfinished_line_of_the_live_segment_waits() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path());
        spool.append(&record("a")).unwrap();
        let path = dir.path().join(segment_name(spool.writing_segment()));
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"partial")
            .unwrap();
        let reader = SpoolReader::open(&spool);
        let batch = reader.read(100, &spool).unwrap();
        assert_eq!(batch.records.len(), 1);
        assert_eq!(batch.next.offset, std::fs::metadata(&path).unwrap().len() - 9);
    }

    #[test]
    fn a_second_instance_is_refused_and_a_successor_waits_for_the_reader_role() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path());
        let refused = UsageSpool::open(dir.path(), SpoolMode::Exclusive).err().unwrap();
        let message = refused.to_string();
        assert!(matches!(refused, SpoolError::InUse { pid: Some(p), .. } if p == std::process::id()));
        assert!(message.contains("spool_dir"), "{message}");

        // An upgrade: both write, each in its own segment; the old one still reads.
        let successor = UsageSpool::open(dir.path(), SpoolMode::Successor).unwrap();
        assert!(!successor.try_take_reader());
        first.append(&record("old-1")).unwrap();
        successor.append(&record("new-1")).unwrap();
        first.append(&record("old-2")).unwrap();
        assert_ne!(first.writing_segment(), successor.writing_segment());
        let mut reader = SpoolReader::open(&first);
        let batch = reader.read(100, &first).unwrap();
        assert_eq!(
            ids(&batch),
            ["old-1", "old-2"],
            "the successor's live segment is not read past"
        );
        reader.commit(batch.next).unwrap();
        assert!(dir.path().join(segment_name(successor.writing_segment())).exists());

        // The old process lets go after its last drain but still serves a little.
        first.release_reader();
        assert!(successor.try_take_reader());
        first.append(&record("old-3")).unwrap();
        let mut reader = SpoolReader::open(&successor);
        let batch = reader.read(100, &successor).unwrap();
        assert_eq!(
            ids(&batch),
            ["old-3"],
            "read up to the old process's live end, not past it"
        );
        reader.commit(batch.next).unwrap();
        successor.append(&record("new-2")).unwrap();
        // The old process exits: its segment is sealed, and what the successor wrote follows.
        drop(first);
        let batch = reader.read(100, &successor).unwrap();
        assert_eq!(ids(&batch), ["new-1", "new-2"]);
        reader.commit(batch.next).unwrap();
        assert_eq!(segments(dir.path()).unwrap(), [successor.writing_segment()]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_spool_that_cannot_append_stops_accepting_keeps_records_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path());
        spool.append(&record("before")).unwrap();
        // The directory disappears under the spool (the same for a read-only remount or a
        // full disk: creating files fails), and the segment is full, so a new one is needed.
        spool.lock_writer().segment.as_mut().unwrap().size = SEGMENT_BYTES;
        let moved = dir.path().with_extension("moved");
        std::fs::rename(dir.path(), &moved).unwrap();
        assert!(spool.append(&record("during")).is_err());
        assert!(!spool.accepting());
        spool.check();
        assert!(!spool.accepting(), "still not writable");
        assert!(
            spool.append(&record("during-2")).is_err(),
            "kept in order behind the first"
        );
        std::fs::rename(&moved, dir.path()).unwrap();
        spool.check();
        assert!(spool.accepting());
        let reader = SpoolReader::open(&spool);
        assert_eq!(
            ids(&reader.read(100, &spool).unwrap()),
            ["before", "during", "during-2"]
        );
    }
}
