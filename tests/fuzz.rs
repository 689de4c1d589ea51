#![allow(clippy::unwrap_used)]
//! Fuzz targets for the code that reads what clients and providers send: the SSE splitter, the
//! stream meter (usage found in a stream, and the events it rewrites), the chat body parser and
//! its splice, the usage extractor of JSON answers, every provider adapter's stream translation
//! and answer decoder, and the Stripe event parser and signature check.
//!
//! They run under `cargo test`, so CI runs them, each for a bounded time. A target first replays
//! every file of its corpus (`fuzz/corpus/<dir>/`), then, until its time is up, random
//! mutations of them: bits flipped, bytes set, JSON and SSE tokens inserted, slices cut,
//! duplicated or spliced in from another file, and, for chat bodies, JSON-level edits that keep
//! the body valid so that the splice is exercised too. proptest generates the cases and shrinks a
//! failing one before it is reported.
//!
//! Any of these fails the test: a panic; a broken property (listed at each target); more memory
//! than the target's bound of its input (a counting allocator measures each case's peak); a
//! case running longer than [`CASE_LIMIT`] (a watchdog ends the process: a hang would otherwise
//! hold CI until its own timeout). The failing input is written to
//! `target/tmp/fuzz-failures/`, and the message says how to replay the run.
//!
//! `KOMILION_FUZZ_SECS` sets each target's time (default 8 s; `cargo test --test fuzz` runs
//! two targets at a time); `KOMILION_FUZZ_SEED` replays a run. With proptest's RNG seeded, a
//! run is repeatable up to where its time ran out.

use bytes::Bytes;
use komilion::billing::stripe::{parse_event, sign, verify_signature, Decision, WebhookError};
use komilion::metering::stream::{Inspected, StreamMeter, COUNT_WINDOW};
use komilion::metering::usage_from_body;
use komilion::sse::{SseEvent, SseSplitter};
use komilion_sdk::{ApiError, ChatRequest};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest one case may run. Every target handles its largest input in milliseconds even in a
/// debug build on a busy machine; a case still running after this is a hang.
const CASE_LIMIT: Duration = Duration::from_secs(30);

/// Largest input a mutation may grow to.
const MAX_INPUT: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Memory: each thread counts its own live bytes and their peak, so targets running in parallel
// do not see each other's allocations. Thread-locals without destructors never allocate, so the
// allocator may use them.

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn grew(n: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(n);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn shrank(n: usize) {
    // A block freed by another thread than the one that made it can take this below what the
    // thread made: saturate rather than wrap.
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(n)));
}

// SAFETY: every call goes to the system allocator unchanged; only counters are updated beside.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, new_size) };
        if !q.is_null() {
            shrank(layout.size());
            grew(new_size);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Run `f` and return what it returned and the most memory it held at once beyond what was live
/// before it started.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, PEAK.with(Cell::get).saturating_sub(base))
}

/// Fail a property: `ensure!(cond, "format", args)`.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

fn within(target: &str, peak: usize, bound: usize) -> Result<(), String> {
    ensure!(
        peak <= bound,
        "{target} held {peak} bytes at once, over its bound of {bound}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The driver.

/// One fuzz case: what it is (for the report) and its input bytes (written out on failure).
trait Case: fmt::Debug + Clone {
    fn bytes(&self) -> Vec<u8>;
}

impl Case for Vec<u8> {
    fn bytes(&self) -> Vec<u8> {
        self.clone()
    }
}

fn fuzz_secs() -> Duration {
    let secs = std::env::var("KOMILION_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(8.0);
    Duration::from_secs_f64(secs)
}

fn fuzz_seed() -> u64 {
    std::env::var("KOMILION_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

/// The files of `fuzz/corpus/<dir>/`, by name.
fn corpus(dir: &str) -> Vec<(String, Vec<u8>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(dir);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .map(|entry| {
            let entry = entry.unwrap();
            (
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(entry.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", path.display());
    files
}

fn corpus_bytes(dir: &str) -> Arc<Vec<Vec<u8>>> {
    Arc::new(corpus(dir).into_iter().map(|(_, bytes)| bytes).collect())
}

/// Write a failing input where a developer can pick it up (and add it to the corpus).
fn save_failure(target: &str, bytes: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    let path = dir.join(format!("{target}-{hash:016x}"));
    let _ = std::fs::write(&path, bytes);
    path
}

fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text.chars().take(400).collect();
    if text.chars().nth(400).is_some() {
        out.push('…');
    }
    format!("{out:?}")
}

/// The case a target is running, for the watchdog.
struct Watchdog {
    target: &'static str,
    current: Mutex<Option<(Instant, Vec<u8>)>>,
    finished: AtomicBool,
}

impl Watchdog {
    fn start(target: &'static str, seed: u64) -> Arc<Watchdog> {
        let watch = Arc::new(Watchdog {
            target,
            current: Mutex::new(None),
            finished: AtomicBool::new(false),
        });
        let w = watch.clone();
        std::thread::spawn(move || {
            while !w.finished.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let current = w.current.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((started, bytes)) = current.as_ref() {
                    if started.elapsed() > CASE_LIMIT {
                        let path = save_failure(w.target, bytes);
                        // Straight to stderr: the test harness would swallow `eprintln!`
                        // output of a test that never finishes.
                        let _ = writeln!(
                            std::io::stderr(),
                            "fuzz target {} hung: one case ran over {CASE_LIMIT:?}\n  input: {} ({} bytes): {}\n  \
                             replay: KOMILION_FUZZ_SEED={seed} cargo test --test fuzz {}",
                            w.target,
                            path.display(),
                            bytes.len(),
                            excerpt(bytes),
                            w.target
                        );
                        // A hung case cannot be unwound from outside: end the test binary.
                        std::process::exit(101);
                    }
                }
            }
        });
        watch
    }

    fn begin(&self, bytes: Vec<u8>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), bytes));
    }

    fn end(&self) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Run `property` on every seed case, then on cases drawn from `strategy` until the target's
/// time is up. Panics with a report on the first failure.
fn fuzz<C: Case, S: Strategy<Value = C>>(
    target: &'static str,
    seeds: Vec<C>,
    strategy: S,
    property: impl Fn(&C) -> Result<(), String>,
) {
    let seed = fuzz_seed();
    let watch = Watchdog::start(target, seed);
    let fail = |case: &C, why: &str| -> ! {
        watch.finished.store(true, Ordering::Relaxed);
        let bytes = case.bytes();
        let path = save_failure(target, &bytes);
        let mut shown = format!("{case:?}");
        if shown.len() > 2000 {
            shown = format!("{}…", shown.chars().take(2000).collect::<String>());
        }
        panic!(
            "fuzz target {target} failed: {why}\n  input: {} ({} bytes): {}\n  case: {shown}\n  \
             replay: KOMILION_FUZZ_SEED={seed} cargo test --test fuzz {target}\n  \
             keep it as a regression seed by copying the input into fuzz/corpus/",
            path.display(),
            bytes.len(),
            excerpt(&bytes),
        );
    };
    let run = |case: &C| -> Result<(), String> {
        watch.begin(case.bytes());
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| property(case)));
        watch.end();
        match result {
            Ok(result) => result,
            Err(panic) => Err(panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .map_or_else(|| "panicked".to_owned(), |m| format!("panicked: {m}"))),
        }
    };
    let seeds_run = seeds.len();
    for case in &seeds {
        if let Err(why) = run(case) {
            fail(case, &why);
        }
    }

    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_time: 60_000,
        // Runs are bounded by time, not by proptest's budgets.
        max_local_rejects: u32::MAX,
        max_global_rejects: u32::MAX,
        ..Config::default()
    });
    let deadline = Instant::now() + fuzz_secs();
    let mut cases = 0u64;
    while Instant::now() < deadline {
        let tree = strategy
            .new_tree(&mut runner)
            .unwrap_or_else(|e| panic!("{target}: no case could be generated: {e}"));
        cases += 1;
        match runner.run_one(tree, |case| run(&case).map_err(TestCaseError::fail)) {
            Ok(_) => {}
            Err(TestError::Fail(why, case)) => fail(&case, &why.to_string()),
            Err(TestError::Abort(why)) => panic!("{target}: proptest gave up: {why}"),
        }
    }
    watch.finished.store(true, Ordering::Relaxed);
    eprintln!("fuzz target {target}: {seeds_run} corpus cases and {cases} mutations passed (seed {seed})");
}

// ---------------------------------------------------------------------------------------------
// Mutations.

/// Tokens a byte-level mutation inserts: the structure of the formats under test, and the
/// characters that have broken parsers before (escapes, surrogates, line breaks of every kind,
/// invalid UTF-8, numbers at and past the ends of their types).
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"\\",
    b"\\u",
    b"\\ud800",
    b"\\udfff",
    b"\\ud83d\\ude00",
    b"\\u0000",
    b"\\n",
    b"null",
    b"true",
    b"false",
    b"0",
    b"-0",
    b"-1",
    b"1e400",
    b"1.5e-7",
    b"9223372036854775807",
    b"18446744073709551616",
    b"\"usage\"",
    b"\"usage\":null,",
    b"\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2},",
    b"\"choices\":[],",
    b"\"choices\"",
    b"\"delta\"",
    b"\"content\"",
    b"\"tool_calls\"",
    b"\"model\":\"gpt-4o\",",
    b"\"messages\":[],",
    b"\"stream\":true,",
    b"\"stream_options\":{\"include_usage\":false},",
    b"\"max_tokens\":",
    b"\"user\":",
    b"\"metadata\":{\"k\":\"v\"},",
    b"\"tools\":[{}],",
    b"{\"type\":\"image_url\",\"image_url\":{\"url\":\"x\"}}",
    b"\"payment_status\":\"paid\",",
    b"\"amount_total\":",
    b"\"currency\":\"usd\",",
    b"\"metadata\":{\"account_id\":\"acct_1\"},",
    b"checkout.session.completed",
    b"\n",
    b"\r",
    b"\r\n",
    b"\n\n",
    b"\r\r",
    b"\n\r",
    b"\r\n\r\n",
    b"data: ",
    b"data:",
    b"\ndata: ",
    b"event: ",
    b"id: ",
    b": ping\n\n",
    b"data: [DONE]\n\n",
    b"t=",
    b"v1=",
    b",v1=",
    b"=",
    b" ",
    b"\t",
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",
    b"\xf0\x9f\x98\x80",
    b"\xe2\x80\xae",
];

#[derive(Debug, Clone)]
enum Edit {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Insert(Index, Vec<u8>),
    Token(Index, Index),
    Remove(Index, usize),
    Duplicate(Index, usize, Index),
    /// A slice of another corpus file: (file, from, length, where).
    Splice(Index, Index, usize, Index),
    Truncate(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        1 => (any::<Index>(), 0u8..8).prop_map(|(i, bit)| Edit::FlipBit(i, bit)),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::SetByte(i, b)),
        1 => (any::<Index>(), proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, v)| Edit::Insert(i, v)),
        4 => (any::<Index>(), any::<Index>()).prop_map(|(i, t)| Edit::Token(i, t)),
        2 => (any::<Index>(), 1usize..64).prop_map(|(i, n)| Edit::Remove(i, n)),
        1 => (any::<Index>(), 1usize..512, any::<Index>()).prop_map(|(i, n, at)| Edit::Duplicate(i, n, at)),
        1 => (any::<Index>(), any::<Index>(), 1usize..1024, any::<Index>())
            .prop_map(|(f, from, n, at)| Edit::Splice(f, from, n, at)),
        1 => any::<Index>().prop_map(Edit::Truncate),
    ]
}

fn apply(corpus: &[Vec<u8>], pick: &Index, edits: &[Edit]) -> Vec<u8> {
    let mut out = corpus[pick.index(corpus.len())].clone();
    for e in edits {
        let len = out.len();
        // A position to insert at: 0..=len.
        let at = |i: &Index| i.index(len + 1);
        match e {
            Edit::FlipBit(i, bit) if len > 0 => out[i.index(len)] ^= 1 << bit,
            Edit::SetByte(i, b) if len > 0 => out[i.index(len)] = *b,
            Edit::Insert(i, v) => {
                let p = at(i);
                out.splice(p..p, v.iter().copied());
            }
            Edit::Token(i, t) => {
                let p = at(i);
                out.splice(p..p, TOKENS[t.index(TOKENS.len())].iter().copied());
            }
            Edit::Remove(i, n) if len > 0 => {
                let p = i.index(len);
                out.drain(p..(p + n).min(len));
            }
            Edit::Duplicate(i, n, to) if len > 0 => {
                let p = i.index(len);
                let piece = out[p..(p + n).min(len)].to_vec();
                let q = at(to);
                out.splice(q..q, piece);
            }
            Edit::Splice(f, from, n, to) => {
                let other = &corpus[f.index(corpus.len())];
                if !other.is_empty() {
                    let p = from.index(other.len());
                    let piece = other[p..(p + n).min(other.len())].to_vec();
                    let q = at(to);
                    out.splice(q..q, piece);
                }
            }
            Edit::Truncate(i) => out.truncate(at(i)),
            _ => {}
        }
        out.truncate(MAX_INPUT);
    }
    out
}

/// Corpus files with a few edits each, and now and then bytes from nowhere.
fn mutations(corpus: Arc<Vec<Vec<u8>>>) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        12 => (any::<Index>(), proptest::collection::vec(edit(), 0..6))
            .prop_map(move |(pick, edits)| apply(&corpus, &pick, &edits)),
        1 => proptest::collection::vec(any::<u8>(), 0..512),
    ]
    .boxed()
}

/// Chunk sizes a stream is cut into (cycled; none means all at once).
fn chunkings() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        Just(Vec::new()),
        Just(vec![1]),
        proptest::collection::vec(1usize..200, 1..16),
    ]
}

/// `bytes` cut into pieces of `sizes` (cycled; no sizes: one piece). Lazily: a list of the
/// pieces would count against the memory of what is measured.
fn chunks<'a>(bytes: &'a [u8], sizes: &'a [usize]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut rest = bytes;
    let mut sizes = sizes.iter().cycle();
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let size = sizes.next().copied().unwrap_or(rest.len());
        let (piece, tail) = rest.split_at(size.clamp(1, rest.len()));
        rest = tail;
        Some(piece)
    })
}

// ---------------------------------------------------------------------------------------------
// SSE: the splitter.

#[derive(Debug, Clone)]
struct SplitCase {
    stream: Vec<u8>,
    chunks: Vec<usize>,
    /// 0: `next_event`, 1: `complete_prefix`, 2: `drain` keeping all, 3: `drain` dropping every
    /// other event.
    mode: u8,
}

impl Case for SplitCase {
    fn bytes(&self) -> Vec<u8> {
        self.stream.clone()
    }
}

/// True when `event` is exactly one event to a splitter that then sees the start of another
/// (a client sees it followed by the next event, and a line break alone at its end may be the
/// first half of a `\r\n`).
fn one_complete_event(event: &[u8]) -> bool {
    let mut s = SseSplitter::new();
    s.push(event);
    s.push(b"x");
    s.next_event().is_some_and(|e| e.len() == event.len())
}

/// The events of a whole stream, pushed at once, and what is left.
fn split_whole(stream: &[u8]) -> (Vec<Bytes>, Bytes) {
    let mut s = SseSplitter::new();
    s.push(stream);
    let mut events = Vec::new();
    while let Some(e) = s.next_event() {
        events.push(e);
    }
    (events, s.take_rest())
}

fn splitter_property(case: &SplitCase) -> Result<(), String> {
    let stream = &case.stream[..];
    let (events, rest) = split_whole(stream);
    // Measured as the relay uses it: each output is passed on and dropped (events kept alive
    // would keep the splitter's old buffers alive too).
    let ((sent, lengths, tail), peak) = peak_of(|| {
        let mut s = SseSplitter::new();
        let mut sent: Vec<u8> = Vec::with_capacity(stream.len());
        let mut lengths = Vec::new();
        let mut n = 0usize;
        for chunk in chunks(stream, &case.chunks) {
            s.push(chunk);
            match case.mode {
                0 => {
                    while let Some(e) = s.next_event() {
                        lengths.push(e.len());
                        sent.extend_from_slice(&e);
                    }
                }
                1 => sent.extend_from_slice(&s.complete_prefix().unwrap_or_default()),
                2 => sent.extend_from_slice(&s.drain(Some).unwrap_or_default()),
                _ => sent.extend_from_slice(
                    &s.drain(|e| {
                        n += 1;
                        (n % 2 == 1).then_some(e)
                    })
                    .unwrap_or_default(),
                ),
            }
            assert!(s.buffered() <= stream.len());
        }
        (sent, lengths, s.take_rest())
    });
    within("the splitter", peak, 4 * stream.len() + 64 * 1024)?;

    // The events do not depend on how the stream was cut, and nothing is lost or added.
    ensure!(
        [&events.concat()[..], &rest[..]].concat() == stream,
        "the events and the rest do not reassemble to the stream"
    );
    ensure!(
        tail == rest,
        "chunked, the rest is {}; whole, {}",
        excerpt(&tail),
        excerpt(&rest)
    );
    if case.mode < 3 {
        ensure!(
            sent == events.concat(),
            "chunked output differs from the whole stream's events"
        );
    } else {
        let kept: Vec<u8> = events.iter().step_by(2).flat_map(|e| e.iter().copied()).collect();
        ensure!(sent == kept, "drain dropped other events than it was told to");
    }
    if case.mode == 0 {
        let whole: Vec<usize> = events.iter().map(Bytes::len).collect();
        ensure!(lengths == whole, "chunked events differ from the whole stream's");
    }
    // Every event is complete and holds one event only; the rest holds none.
    for e in &events {
        ensure!(one_complete_event(e), "an event is not complete: {}", excerpt(e));
        let parsed = SseEvent::parse(e);
        ensure!(parsed.data.len() <= e.len(), "parsed data longer than its event");
    }
    let mut s = SseSplitter::new();
    s.push(&rest);
    ensure!(s.next_event().is_none(), "the rest holds a complete event");
    Ok(())
}

#[test]
fn sse_splitter() {
    let files = corpus_bytes("sse");
    let mut seeds = Vec::new();
    for stream in files.iter() {
        for (chunks, mode) in [(vec![], 0), (vec![1], 0), (vec![7, 3], 1), (vec![64], 2), (vec![5], 3)] {
            seeds.push(SplitCase {
                stream: stream.clone(),
                chunks,
                mode,
            });
        }
    }
    let strategy =
        (mutations(files), chunkings(), 0u8..4).prop_map(|(stream, chunks, mode)| SplitCase { stream, chunks, mode });
    fuzz("sse_splitter", seeds, strategy, splitter_property);
}

// ---------------------------------------------------------------------------------------------
// The stream meter, driven as the relay drives it.

#[derive(Debug, Clone)]
struct MeterCase {
    stream: Vec<u8>,
    chunks: Vec<usize>,
    /// The gateway asked for usage on the client's behalf: remove it again.
    strip: bool,
}

impl Case for MeterCase {
    fn bytes(&self) -> Vec<u8> {
        self.stream.clone()
    }
}

/// The non-empty (event, data) pairs of a stream, as a client reads them (to its end: a last
/// event without its blank line counts).
fn client_view(stream: &[u8]) -> Vec<(Option<String>, String)> {
    let (events, _) = split_whole(&[stream, b"\n\n"].concat());
    events
        .iter()
        .map(|e| SseEvent::parse(e))
        .filter(|e| e.event.is_some() || !e.data.is_empty())
        .map(|e| (e.event.map(str::to_owned), e.data.into_owned()))
        .collect()
}

/// Check what `inspect` made of one complete event.
fn check_inspected(event: &Bytes, result: &Inspected, strip: bool) -> Result<(), String> {
    match result {
        // An error event is relayed as it came (after the relay's scrubbing).
        Inspected::Error(out) => {
            ensure!(out == event, "an error event was changed by the meter");
        }
        Inspected::Send(out) => {
            ensure!(
                one_complete_event(out),
                "inspect sent bytes that are not one complete event: {} (from {})",
                excerpt(out),
                excerpt(event)
            );
            ensure!(
                out.len() <= 2 * event.len() + 64,
                "a rewritten event grew from {} to {} bytes",
                event.len(),
                out.len()
            );
            if out == event {
                return Ok(());
            }
            ensure!(strip, "an event was rewritten though the client asked for usage");
            // Rewritten: the same JSON object without its `usage`, and the same event name.
            let before = SseEvent::parse(event);
            let after = SseEvent::parse(out);
            ensure!(before.event == after.event, "the event name changed");
            // Raw values: numbers out of `f64`'s range are copied as they came.
            let keys: BTreeMap<String, Box<RawValue>> = serde_json::from_str(after.data.trim())
                .map_err(|e| format!("a rewritten event is not a JSON object ({e}): {}", excerpt(out)))?;
            ensure!(!keys.contains_key("usage"), "a rewritten event still has `usage`");
            let old = serde_json::from_str::<Map<String, Value>>(before.data.trim());
            let new = serde_json::from_str::<Map<String, Value>>(after.data.trim());
            if let (Ok(mut old), Ok(new)) = (old, new) {
                old.remove("usage");
                ensure!(old == new, "rewriting changed more than `usage`: {}", excerpt(out));
            }
        }
        Inspected::Drop => ensure!(strip, "an event was dropped though the client asked for usage"),
        Inspected::Malformed(why) => ensure!(why.len() <= 1024, "an unbounded error message"),
    }
    Ok(())
}

fn meter_property(case: &MeterCase) -> Result<(), String> {
    let stream = &case.stream[..];
    let (result, peak) = peak_of(|| -> Result<(), String> {
        let mut splitter = SseSplitter::new();
        let mut meter = StreamMeter::new(case.strip, "gpt-4o-mini");
        let mut broken = false;
        let mut outs: Vec<Bytes> = Vec::new();
        let mut sent: Vec<u8> = Vec::new();
        let mut largest = 0;
        let mut failure: Option<String> = None;
        let mut feed = |splitter: &mut SseSplitter, bytes: &[u8]| {
            splitter.push(bytes);
            let out = splitter.drain(|event| {
                if broken || failure.is_some() {
                    return None;
                }
                ensure_or(&mut failure, one_complete_event(&event), || {
                    format!("the splitter handed over an incomplete event: {}", excerpt(&event))
                });
                largest = largest.max(event.len());
                let result = meter.inspect(event.clone());
                if let Err(why) = check_inspected(&event, &result, case.strip) {
                    failure.get_or_insert(why);
                }
                match result {
                    Inspected::Send(out) | Inspected::Error(out) => {
                        outs.push(out.clone());
                        Some(out)
                    }
                    Inspected::Drop => None,
                    Inspected::Malformed(_) => {
                        broken = true;
                        None
                    }
                }
            });
            sent.extend_from_slice(&out.unwrap_or_default());
        };
        for chunk in chunks(stream, &case.chunks) {
            feed(&mut splitter, chunk);
        }
        // The relay's end of stream: an unterminated tail is terminated and metered too.
        let rest = splitter.take_rest();
        if !rest.iter().all(u8::is_ascii_whitespace) {
            let mut terminated = rest.to_vec();
            terminated.extend_from_slice(b"\n\n");
            feed(&mut splitter, &terminated);
        }
        if let Some(why) = failure {
            return Err(why);
        }
        ensure!(
            sent == outs.concat(),
            "what drain sent is not the events inspect returned"
        );
        ensure!(
            meter.kept_bytes() <= 2 * (COUNT_WINDOW + largest) + 64,
            "the meter keeps {} bytes of output",
            meter.kept_bytes()
        );
        if let Some(u) = meter.usage {
            ensure!(u.cached_input_tokens <= u.input_tokens, "more cached tokens than input");
        }
        meter.delivered_output_tokens();
        // The client reads the events one by one as they were sent: none merges into the next
        // now that some were rewritten or dropped.
        let one_by_one: Vec<_> = outs.iter().flat_map(|o| client_view(o)).collect();
        ensure!(
            client_view(&sent) == one_by_one,
            "the events sent read back otherwise together: {}",
            excerpt(&sent)
        );
        Ok(())
    });
    result?;
    // Tokenizing a window costs what the tokenizer needs; the rest is a few copies of the input.
    within("the meter", peak, 64 * stream.len() + 16 * 1024 * 1024)
}

/// Record the first failure of a check made inside a callback that cannot return it.
fn ensure_or(failure: &mut Option<String>, ok: bool, why: impl FnOnce() -> String) {
    if !ok && failure.is_none() {
        *failure = Some(why());
    }
}

#[test]
fn stream_meter() {
    // Load the tokenizer before the clock starts: it takes seconds in a debug build.
    komilion::metering::tokens::count_text("gpt-4o-mini", "warm up");
    let files = corpus_bytes("sse");
    let mut seeds = Vec::new();
    for stream in files.iter() {
        for (chunks, strip) in [(vec![], true), (vec![], false), (vec![3], true)] {
            seeds.push(MeterCase {
                stream: stream.clone(),
                chunks,
                strip,
            });
        }
    }
    let strategy = (mutations(files), chunkings(), any::<bool>()).prop_map(|(stream, chunks, strip)| MeterCase {
        stream,
        chunks,
        strip,
    });
    fuzz("stream_meter", seeds, strategy, meter_property);
}

// ---------------------------------------------------------------------------------------------
// Chat bodies: the parser and the splice of upstream fields.

#[derive(Debug, Clone)]
enum SpliceOp {
    Model(String),
    Usage(bool),
}

#[derive(Debug, Clone)]
struct ChatCase {
    body: Vec<u8>,
    ops: Vec<SpliceOp>,
}

impl Case for ChatCase {
    fn bytes(&self) -> Vec<u8> {
        self.body.clone()
    }
}

/// Any text, weighted toward the characters that need escaping.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(any::<char>(), 0..12).prop_map(|c| c.into_iter().collect()),
        proptest::sample::select(vec![
            "", "a", "\"", "\\", "\u{0}", "\n", "é", "😀", "\u{2028}", "usage", "model"
        ])
        .prop_map(str::to_owned),
    ]
}

/// A model name the gateway could route to: not empty, no control characters.
fn model_name() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(vec!["gpt-4o", "gpt-4o-mini", "openai/gpt-4o", "claude-sonnet-4-5", "m"])
            .prop_map(str::to_owned),
        // Mapped, not filtered: proptest gives up on a run after enough rejected values.
        proptest::collection::vec(any::<char>().prop_map(|c| if c.is_control() { '?' } else { c }), 1..24)
            .prop_map(|c| c.into_iter().collect()),
    ]
}

fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((text(), inner), 0..4).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
    .boxed()
}

fn message() -> impl Strategy<Value = Value> {
    let part = prop_oneof![
        text().prop_map(|t| serde_json::json!({"type": "text", "text": t})),
        Just(serde_json::json!({"type": "image_url", "image_url": {"url": "https://example.com/x.png"}})),
        json_value(),
    ];
    let content = prop_oneof![
        text().prop_map(Value::String),
        Just(Value::Null),
        proptest::collection::vec(part, 0..3).prop_map(Value::Array),
    ];
    (
        proptest::sample::select(vec!["system", "user", "assistant", "tool"]),
        content,
    )
        .prop_map(|(role, content)| serde_json::json!({"role": role, "content": content}))
}

#[derive(Debug, Clone)]
enum FieldEdit {
    Set(String, Value),
    Remove(Index),
}

fn field_edit() -> impl Strategy<Value = FieldEdit> {
    let set = |key: &'static str| move |v: Value| FieldEdit::Set(key.to_owned(), v);
    prop_oneof![
        model_name().prop_map(Value::String).prop_map(set("model")),
        prop_oneof![any::<bool>().prop_map(Value::Bool), Just(Value::Null)].prop_map(set("stream")),
        prop_oneof![
            any::<bool>().prop_map(|b| serde_json::json!({"include_usage": b})),
            Just(serde_json::json!({"include_usage": null, "other": [1]})),
            json_value(),
        ]
        .prop_map(set("stream_options")),
        proptest::collection::vec(message(), 0..4)
            .prop_map(Value::Array)
            .prop_map(set("messages")),
        prop_oneof![model_name().prop_map(Value::String), Just(Value::Null)].prop_map(set("user")),
        any::<u64>().prop_map(Value::from).prop_map(set("max_tokens")),
        any::<u32>()
            .prop_map(Value::from)
            .prop_map(set("max_completion_tokens")),
        json_value().prop_map(set("tools")),
        proptest::collection::vec((text(), text()), 0..3)
            .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k, Value::String(v))).collect()))
            .prop_map(set("metadata")),
        (text(), json_value()).prop_map(|(k, v)| FieldEdit::Set(k, v)),
        any::<Index>().prop_map(FieldEdit::Remove),
    ]
}

/// Valid JSON bodies: a corpus body that is an object, with fields set to values of the right
/// and the wrong types; written compact or pretty.
fn structured_bodies(bases: Arc<Vec<Map<String, Value>>>) -> BoxedStrategy<Vec<u8>> {
    (
        any::<Index>(),
        proptest::collection::vec(field_edit(), 0..6),
        any::<bool>(),
    )
        .prop_map(move |(pick, edits, pretty)| {
            let mut body = bases[pick.index(bases.len())].clone();
            for e in edits {
                match e {
                    FieldEdit::Set(k, v) => {
                        body.insert(k, v);
                    }
                    FieldEdit::Remove(i) if !body.is_empty() => {
                        let key = body.keys().nth(i.index(body.len())).cloned().unwrap_or_default();
                        body.remove(&key);
                    }
                    FieldEdit::Remove(_) => {}
                }
            }
            let body = Value::Object(body);
            if pretty {
                serde_json::to_vec_pretty(&body).unwrap()
            } else {
                serde_json::to_vec(&body).unwrap()
            }
        })
        .boxed()
}

fn splice_op() -> impl Strategy<Value = SpliceOp> {
    prop_oneof![
        model_name().prop_map(SpliceOp::Model),
        any::<bool>().prop_map(SpliceOp::Usage),
    ]
}

fn json_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// Chat cases that parsed, so that the splice ran (reported: mutations that never parse would
/// leave the splice untested).
static SPLICED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn chat_property(case: &ChatCase) -> Result<(), String> {
    let body = Bytes::copy_from_slice(&case.body);
    let (parsed, peak) = peak_of(|| ChatRequest::parse(body.clone()));
    within("the chat parser", peak, 64 * body.len() + 1024 * 1024)?;
    let original = match parsed {
        Ok(req) => req,
        Err(e) => {
            let api: ApiError = e.into();
            ensure!(api.status() == 400, "a parse error is a {}", api.status());
            ensure!(api.message.len() <= 1024, "an unbounded error message");
            ensure!(!api.message.contains('\0'), "an error message quotes a NUL");
            return Ok(());
        }
    };
    SPLICED.fetch_add(1, Ordering::Relaxed);
    // What reaches logs and the usage log was checked.
    let clean = |s: &str| !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control);
    ensure!(clean(&original.model), "an unchecked model was accepted");
    ensure!(
        original.user.as_deref().is_none_or(clean),
        "an unchecked user was accepted"
    );
    ensure!(
        original.upstream_body() == body,
        "an unchanged body is not forwarded as it came"
    );

    // Splice, and follow what each operation should leave behind.
    let mut req = original.clone();
    let mut model = original.model.clone();
    let mut usage_override = false;
    let mut models_json = 0;
    for op in &case.ops {
        match op {
            SpliceOp::Model(m) => {
                req.set_upstream_model(m);
                model = m.clone();
                models_json = models_json.max(json_string(m).len());
            }
            SpliceOp::Usage(true) => {
                usage_override |= original.stream && !original.include_usage;
                req.request_upstream_usage(true);
            }
            SpliceOp::Usage(false) => {
                usage_override = false;
                req.request_upstream_usage(false);
            }
        }
    }
    let (out, peak) = peak_of(|| req.upstream_body());
    let stream_options_len = original.field("stream_options").map_or(0, str::len) + 32;
    ensure!(
        out.len() <= body.len() + models_json + stream_options_len + 64,
        "the spliced body grew from {} to {} bytes",
        body.len(),
        out.len()
    );
    within("the splice", peak, 4 * body.len() + 64 * 1024)?;
    let back = ChatRequest::parse(out.clone())
        .map_err(|e| format!("the spliced body does not parse back ({e}): {}", excerpt(&out)))?;
    if serde_json::from_slice::<Value>(&body).is_ok() {
        serde_json::from_slice::<Value>(&out)
            .map_err(|e| format!("the spliced body is not JSON ({e}): {}", excerpt(&out)))?;
    }
    ensure!(
        back.model == model,
        "upstream model {:?}, expected {model:?}",
        back.model
    );
    ensure!(
        back.stream == original.stream
            && back.max_tokens == original.max_tokens
            && back.user == original.user
            && back.messages == original.messages
            && back.has_tools == original.has_tools
            && back.has_images == original.has_images,
        "the spliced body reads differently: {}",
        excerpt(&out)
    );
    // Every field but the spliced ones is copied byte for byte, and nothing else is added.
    for key in &top_level_keys(&out) {
        ensure!(
            key == "model" || key == "stream_options" || original.field(key).is_some(),
            "the splice added `{key}`"
        );
    }
    for key in top_level_keys(&body) {
        if key == "model" || key == "stream_options" {
            continue;
        }
        ensure!(
            back.field(&key) == original.field(&key),
            "`{key}` changed in the splice"
        );
    }
    if usage_override {
        ensure!(back.include_usage, "usage was asked for and is not");
        // The client's other stream options stay.
        let client = original
            .field("stream_options")
            .and_then(|t| serde_json::from_str::<Map<String, Value>>(t).ok())
            .unwrap_or_default();
        let sent: Map<String, Value> = serde_json::from_str(back.field("stream_options").unwrap_or("{}"))
            .map_err(|e| format!("stream_options is not an object: {e}"))?;
        for (k, v) in &client {
            ensure!(
                k == "include_usage" || sent.get(k) == Some(v),
                "stream option `{k}` was lost"
            );
        }
    } else {
        ensure!(
            back.field("stream_options") == original.field("stream_options"),
            "stream_options changed though usage was not asked for"
        );
    }
    Ok(())
}

/// The top-level keys of a JSON object, decoded (none if it is not one).
fn top_level_keys(body: &[u8]) -> Vec<String> {
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some(k) = map.next_key::<String>()? {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        keys.push(k);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_slice::<Keys>(body).map(|k| k.0).unwrap_or_default()
}

#[test]
fn chat_body() {
    let files = corpus("chat");
    let bases: Vec<Map<String, Value>> = files
        .iter()
        .filter_map(|(_, b)| serde_json::from_slice::<Map<String, Value>>(b).ok())
        .collect();
    assert!(bases.len() > 10, "the chat corpus has valid bodies to edit");
    let mut seeds = Vec::new();
    for (_, body) in &files {
        for ops in [
            vec![],
            vec![SpliceOp::Model("gpt-4o".into()), SpliceOp::Usage(true)],
            vec![
                SpliceOp::Usage(true),
                SpliceOp::Usage(false),
                SpliceOp::Model("m\"é/ü\\".into()),
            ],
        ] {
            seeds.push(ChatCase {
                body: body.clone(),
                ops,
            });
        }
    }
    let bytes = Arc::new(files.into_iter().map(|(_, b)| b).collect::<Vec<_>>());
    let bodies = prop_oneof![mutations(bytes), structured_bodies(Arc::new(bases))];
    let strategy =
        (bodies, proptest::collection::vec(splice_op(), 0..4)).prop_map(|(body, ops)| ChatCase { body, ops });
    fuzz("chat_body", seeds, strategy, chat_property);
    eprintln!(
        "fuzz target chat_body: {} bodies parsed and were spliced",
        SPLICED.load(Ordering::Relaxed)
    );
}

// ---------------------------------------------------------------------------------------------
// Usage of JSON answers.

fn usage_property(body: &[u8]) -> Result<(), String> {
    let (usage, peak) = peak_of(|| usage_from_body(body));
    within("the usage extractor", peak, 16 * body.len() + 64 * 1024)?;
    let Some(u) = usage else { return Ok(()) };
    ensure!(u.cached_input_tokens <= u.input_tokens, "more cached tokens than input");
    ensure!(!u.estimated, "usage read from the provider is marked estimated");
    // The same numbers as a plain JSON reading, when there is one.
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        let usage = &v["usage"];
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        ensure!(
            usage["prompt_tokens"].as_u64() == Some(u.input_tokens)
                && n(&usage["completion_tokens"]) == u.output_tokens
                && n(&usage["prompt_tokens_details"]["cached_tokens"]).min(u.input_tokens) == u.cached_input_tokens
                && n(&usage["completion_tokens_details"]["reasoning_tokens"]) == u.reasoning_tokens,
            "usage {u:?} differs from the JSON's {usage}"
        );
    }
    Ok(())
}

#[test]
fn usage_body() {
    let files = corpus_bytes("usage");
    let seeds: Vec<Vec<u8>> = files.iter().cloned().collect();
    fuzz("usage_body", seeds, mutations(files), |b: &Vec<u8>| usage_property(b));
}

// ---------------------------------------------------------------------------------------------
// Providers of other formats: their streams translated, their answers decoded.

/// Whatever a provider sends, its translation is a well-formed OpenAI stream: every event is
/// `data: <a JSON object>` or `data: [DONE]`, nothing follows `[DONE]`; a malformed or
/// oversized event stops the translation with an error instead. Whole answers decode or are
/// refused, never panic. Memory stays within a bound of the input.
fn provider_property(body: &[u8]) -> Result<(), String> {
    use komilion::providers::translate::StreamTranslator;
    use komilion::providers::{anthropic::Anthropic, cohere::Cohere, gemini::Gemini, openai::OpenAi, ProviderAdapter};
    let adapters: [&dyn ProviderAdapter; 4] = [&Anthropic, &Gemini, &Cohere, &OpenAi];
    for adapter in adapters {
        let (out, peak) = peak_of(|| {
            let _ = adapter.decode_answer(body);
            let _ = adapter.decode_error(500, body);
            let mut t = StreamTranslator::new(adapter, "m", 1, 16 * 1024);
            let mut out = Vec::new();
            for piece in body.chunks(700) {
                match t.feed(piece) {
                    Ok(bytes) => out.extend(bytes),
                    Err(_) => return out,
                }
            }
            if let Ok(bytes) = t.finish() {
                out.extend(bytes);
            }
            out
        });
        within("a stream translator", peak, 32 * body.len() + 256 * 1024)?;
        let text = String::from_utf8(out).map_err(|e| format!("the translation is not UTF-8: {e}"))?;
        let mut done = false;
        for event in text.split("\n\n").filter(|e| !e.is_empty()) {
            ensure!(!done, "an event after [DONE]: {event}");
            let data = event
                .strip_prefix("data: ")
                .ok_or_else(|| format!("an event that is not one data line: {event:?}"))?;
            ensure!(!data.contains('\n'), "an event of several lines: {event:?}");
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value =
                serde_json::from_str(data).map_err(|e| format!("an event that is not JSON ({e}): {data}"))?;
            ensure!(v.is_object(), "an event that is not a JSON object: {data}");
        }
    }
    Ok(())
}

#[test]
fn provider_streams() {
    let files = corpus_bytes("provider_streams");
    let seeds: Vec<Vec<u8>> = files.iter().cloned().collect();
    fuzz("provider_streams", seeds, mutations(files), |b: &Vec<u8>| {
        provider_property(b)
    });
}

// ---------------------------------------------------------------------------------------------
// Stripe.

const NANOS_PER_CENT: i64 = 10_000_000;

fn stripe_property(payload: &[u8]) -> Result<(), String> {
    let (decision, peak) = peak_of(|| parse_event(payload));
    within("the Stripe parser", peak, 64 * payload.len() + 1024 * 1024)?;
    let value = serde_json::from_slice::<Value>(payload).ok();
    match decision {
        Err(WebhookError::BadEvent(why)) => ensure!(why.len() <= 1024, "an unbounded error message"),
        Err(e) => return Err(format!("parsing alone failed with {e:?}")),
        Ok(Decision::Ignore(_)) => {}
        Ok(Decision::Credit {
            account_id,
            amount_nano_usd,
            reference,
            if_unknown,
        }) => {
            ensure!(
                amount_nano_usd > 0 && amount_nano_usd % NANOS_PER_CENT == 0,
                "credits {amount_nano_usd} nano-USD"
            );
            ensure!(
                if_unknown.amount_nano_usd == amount_nano_usd,
                "the unmatched record has another amount"
            );
            ensure!(
                if_unknown.account_ref.as_ref().is_some_and(|a| a.chars().count() <= 64),
                "the unmatched record's account is unbounded"
            );
            if let Some(v) = value {
                let session = &v["data"]["object"];
                ensure!(
                    ["checkout.session.completed", "checkout.session.async_payment_succeeded"]
                        .contains(&v["type"].as_str().unwrap_or("")),
                    "credited an event of type {}",
                    v["type"]
                );
                ensure!(session["payment_status"] == "paid", "credited an unpaid session");
                ensure!(
                    session["amount_total"].as_i64().map(|c| c * NANOS_PER_CENT) == Some(amount_nano_usd),
                    "credited another amount than amount_total"
                );
                ensure!(
                    session["metadata"]["account_id"].as_str() == Some(account_id.as_str()),
                    "credited another account than metadata.account_id"
                );
                ensure!(
                    session["currency"]
                        .as_str()
                        .is_some_and(|c| c.eq_ignore_ascii_case("usd")),
                    "credited another currency than USD"
                );
                ensure!(
                    session["id"].as_str().or(v["id"].as_str()) == Some(reference.as_str()),
                    "credited under another reference than the session"
                );
            }
        }
        Ok(Decision::Unmatched(p)) => {
            ensure!(p.amount_nano_usd >= 0, "an unmatched payment of {}", p.amount_nano_usd);
            ensure!(p.reason.chars().count() <= 128, "an unbounded reason: {}", p.reason);
            ensure!(
                p.account_ref.as_ref().is_none_or(|a| a.chars().count() <= 64),
                "an unbounded account reference"
            );
        }
    }
    Ok(())
}

#[test]
fn stripe_event() {
    let files = corpus_bytes("stripe_event");
    let seeds: Vec<Vec<u8>> = files.iter().cloned().collect();
    fuzz("stripe_event", seeds, mutations(files), |b: &Vec<u8>| {
        stripe_property(b)
    });
}

#[derive(Debug, Clone)]
struct SignatureCase {
    header: Vec<u8>,
    payload: Vec<u8>,
    timestamp: i64,
    now: i64,
    tolerance: u64,
}

impl Case for SignatureCase {
    fn bytes(&self) -> Vec<u8> {
        self.header.clone()
    }
}

const SECRET: &str = "whsec_fuzz_secret";

fn signature_property(case: &SignatureCase) -> Result<(), String> {
    let header = String::from_utf8_lossy(&case.header);
    let payload = &case.payload[..];
    // Any header: an answer, never a panic.
    let _ = verify_signature(&header, payload, SECRET, case.tolerance, case.now);
    // A header Stripe would send verifies at its own time, for any time, and only then.
    let signed = sign(payload, SECRET, case.timestamp);
    ensure!(
        verify_signature(&signed, payload, SECRET, case.tolerance, case.timestamp) == Ok(()),
        "a fresh signature does not verify: {signed}"
    );
    ensure!(
        verify_signature(&signed, payload, "whsec_other", case.tolerance, case.timestamp)
            == Err(WebhookError::BadSignature),
        "another secret's signature verifies"
    );
    let late = case
        .tolerance
        .checked_add(1)
        .and_then(|t| i64::try_from(t).ok())
        .and_then(|t| case.timestamp.checked_add(t));
    if let Some(late) = late {
        ensure!(
            verify_signature(&signed, payload, SECRET, case.tolerance, late) == Err(WebhookError::StaleTimestamp),
            "a signature past its tolerance verifies"
        );
    }
    Ok(())
}

#[test]
fn stripe_signature() {
    let headers = corpus_bytes("stripe_signature");
    let payloads = corpus_bytes("stripe_event");
    let seeds = headers
        .iter()
        .zip(payloads.iter().cycle())
        .map(|(header, payload)| SignatureCase {
            header: header.clone(),
            payload: payload.clone(),
            timestamp: 1_727_000_001,
            now: 1_727_000_001,
            tolerance: 300,
        })
        .collect();
    let times = prop_oneof![
        Just(i64::MIN),
        Just(i64::MAX),
        Just(0i64),
        any::<i64>(),
        1_700_000_000i64..1_800_000_000
    ];
    let strategy = (
        mutations(headers),
        mutations(payloads),
        times.clone(),
        times,
        prop_oneof![Just(0u64), Just(300u64), Just(u64::MAX), any::<u64>()],
    )
        .prop_map(|(header, payload, timestamp, now, tolerance)| SignatureCase {
            header,
            payload,
            timestamp,
            now,
            tolerance,
        });
    fuzz("stripe_signature", seeds, strategy, signature_property);
}
