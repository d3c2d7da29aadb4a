//! Keeps callers from forging, flooding or bloating the signer's per-request log lines.
//!
//! Everything a caller chooses (the `clusterid` header, the metadata's `ImpersonatedIdentity`
//! and `CertSigner`, CSR SANs quoted in an error) goes through [`sanitize`] before it is
//! logged: escaped, so that no newline, quote or terminal control sequence reaches the log
//! stream, and cut to a bounded size, so that a 100 KiB header costs a few hundred bytes of
//! log. Refusal lines go through a [`RateLimiter`]: a caller with a bad token can make as many
//! refusals as it likes, but only a few lines per second per reason reach the log; the rest
//! are counted (`istio_csr_log_lines_suppressed_total{reason}`) and summed up in one line when
//! logging resumes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Room for any legitimate value: SPIFFE IDs, cluster IDs and signer names are far shorter
/// (Kubernetes names are at most 253 bytes, and an identity holds two 63-byte labels).
pub const MAX_VALUE_BYTES: usize = 256;
/// Error details quote API server answers and caller values: longer, still bounded.
pub const MAX_DETAIL_BYTES: usize = 1024;

/// Refusal lines per second per reason, and the burst allowed after a quiet spell: enough
/// to see what is failing, few enough that a flood of bad calls cannot drown the log.
pub const REFUSAL_LINES_PER_SECOND: u32 = 10;
/// At most one "N lines suppressed" line per reason per interval: under a sustained flood
/// the count since the previous summary comes with the first line logged after it.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(1);

/// `value` as it may be logged: every character that is not printable, and `"` and `\`,
/// escaped as Rust's `escape_debug` does (`\n`, `\"`, `\u{1b}`, `\u{202e}`, ...), and the
/// result cut (between characters, never inside an escape) to at most `max` bytes, followed by
/// `…(+N bytes)` when input bytes were left out. Borrows when nothing needs changing.
pub fn sanitize(value: &str, max: usize) -> Cow<'_, str> {
    if value.len() <= max && value.chars().all(|c| c.escape_debug().len() == 1) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len().min(max) + 24);
    for (at, c) in value.char_indices() {
        let escaped = c.escape_debug();
        // Escapes are ASCII; an unescaped character is itself, of 1 to 4 bytes.
        let width = if escaped.len() == 1 {
            c.len_utf8()
        } else {
            escaped.len()
        };
        if out.len() + width > max {
            let _ = write!(out, "…(+{} bytes)", value.len() - at);
            return Cow::Owned(out);
        }
        out.extend(escaped);
    }
    Cow::Owned(out)
}

/// What the limiter says about one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Log it. When `suppressed` is not 0, that many lines of this reason were dropped since
    /// the last summary: say so first, in one line.
    Log { suppressed: u64 },
    /// Drop it (and count it).
    Suppress,
}

/// A token bucket per reason: `per_second` lines a second, bursts of up to `per_second`,
/// plus at most one summary line per [`SUMMARY_INTERVAL`]. Reasons are `&'static str` from a
/// bounded set (gRPC code names), so the map stays small. Time is tokio's, so tests can
/// pause it.
pub struct RateLimiter {
    per_second: f64,
    buckets: Mutex<HashMap<&'static str, Bucket>>,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
    /// Dropped since the last summary.
    suppressed: u64,
    /// When the last summary was handed out; `None` before the first.
    summarised: Option<Instant>,
}

impl RateLimiter {
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second: f64::from(per_second.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token of `reason`'s bucket when there is one.
    pub fn admit(&self, reason: &'static str) -> Admission {
        let now = Instant::now();
        // A panic while holding this lock cannot leave a bucket half-updated in a way that
        // matters: keep limiting with whatever is there.
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let bucket = buckets.entry(reason).or_insert(Bucket {
            tokens: self.per_second,
            refilled: now,
            suppressed: 0,
            summarised: None,
        });
        let elapsed = now.saturating_duration_since(bucket.refilled);
        bucket.tokens =
            (bucket.tokens + elapsed.as_secs_f64() * self.per_second).min(self.per_second);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            let summary_due = bucket
                .summarised
                .is_none_or(|at| now.saturating_duration_since(at) >= SUMMARY_INTERVAL);
            let suppressed = if bucket.suppressed > 0 && summary_due {
                bucket.summarised = Some(now);
                std::mem::take(&mut bucket.suppressed)
            } else {
                0
            };
            Admission::Log { suppressed }
        } else {
            bucket.suppressed += 1;
            Admission::Suppress
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_ordinary_values_alone() {
        for value in [
            "",
            "spiffe://cluster.local/ns/default/sa/default",
            "Kubernetes",
            "clusterissuer",
            "café ünïcode",
        ] {
            assert!(matches!(
                sanitize(value, MAX_VALUE_BYTES),
                Cow::Borrowed(v) if v == value
            ));
        }
    }

    #[test]
    fn escapes_what_could_forge_or_garble_a_line() {
        let cases = [
            ("a\nb", r"a\nb"),
            ("a\r\nINFO forged line", r"a\r\nINFO forged line"),
            (r#"x" code="OK"#, r#"x\" code=\"OK"#),
            ("back\\slash", r"back\\slash"),
            ("\u{1b}[31mred\u{1b}[0m", r"\u{1b}[31mred\u{1b}[0m"),
            ("tab\there", r"tab\there"),
            ("nul\0", r"nul\0"),
            ("rtl\u{202e}gnp.exe", r"rtl\u{202e}gnp.exe"),
            ("line\u{2028}sep", r"line\u{2028}sep"),
        ];
        for (input, want) in cases {
            assert_eq!(sanitize(input, MAX_VALUE_BYTES), want, "{input:?}");
            let out = sanitize(input, MAX_VALUE_BYTES);
            assert!(!out.chars().any(char::is_control), "{out:?}");
        }
    }

    #[test]
    fn a_100_kib_value_logs_at_most_about_300_bytes() {
        let hostile = format!("spiffe://td/ns/a/sa/{}", "x".repeat(100 * 1024));
        let out = sanitize(&hostile, MAX_VALUE_BYTES);
        assert!(out.len() <= 300, "{} bytes", out.len());
        assert!(out.starts_with("spiffe://td/ns/a/sa/xxx"));
        let shown = MAX_VALUE_BYTES;
        assert!(
            out.ends_with(&format!("…(+{} bytes)", hostile.len() - shown)),
            "{}",
            &out[shown..]
        );
    }

    #[test]
    fn the_bound_holds_after_escaping() {
        // Each control character escapes to up to 6 bytes: the cut is on the output.
        let hostile = "\u{1}".repeat(100 * 1024);
        let out = sanitize(&hostile, MAX_VALUE_BYTES);
        assert!(out.len() <= 300, "{} bytes", out.len());
        assert!(out.starts_with(r"\u{1}\u{1}"));
        // 256 / 5 = 51 escapes fit; the rest is counted in input bytes.
        assert!(
            out.ends_with(&format!("…(+{} bytes)", 100 * 1024 - 51)),
            "{out}"
        );
        let newlines = "\n".repeat(10_000);
        let out = sanitize(&newlines, MAX_VALUE_BYTES);
        assert_eq!(
            out,
            format!("{}…(+{} bytes)", r"\n".repeat(128), 10_000 - 128)
        );
    }

    #[test]
    fn cuts_between_characters_never_inside_one() {
        // 'é' is 2 bytes: with an odd limit the last one that does not fit is left out whole.
        let value = "é".repeat(200);
        let out = sanitize(&value, 11);
        assert_eq!(out, format!("{}…(+{} bytes)", "é".repeat(5), 400 - 10));
        let value = "😀".repeat(100);
        let out = sanitize(&value, 10);
        assert_eq!(out, format!("😀😀…(+{} bytes)", 400 - 8));
        // An escape is never split either.
        let out = sanitize("ab\ncd", 3);
        assert_eq!(out, "ab…(+3 bytes)");
    }

    #[test]
    fn exactly_at_the_limit_is_not_cut() {
        let value = "x".repeat(MAX_VALUE_BYTES);
        assert_eq!(sanitize(&value, MAX_VALUE_BYTES), value);
        let value = "x".repeat(MAX_VALUE_BYTES + 1);
        assert_eq!(
            sanitize(&value, MAX_VALUE_BYTES),
            format!("{}…(+1 bytes)", "x".repeat(MAX_VALUE_BYTES))
        );
    }

    const N: u32 = REFUSAL_LINES_PER_SECOND;

    /// Admits `count` lines of `reason` now: (logged, suppressed, summaries of earlier
    /// suppressions seen).
    fn burst(limiter: &RateLimiter, reason: &'static str, count: u32) -> (u32, u32, u64) {
        let (mut logged, mut suppressed, mut summarised) = (0, 0, 0);
        for _ in 0..count {
            match limiter.admit(reason) {
                Admission::Log { suppressed: s } => {
                    logged += 1;
                    summarised += s;
                }
                Admission::Suppress => suppressed += 1,
            }
        }
        (logged, suppressed, summarised)
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_one_reason_logs_at_most_n_lines_and_counts_the_rest() {
        let limiter = RateLimiter::new(N);
        let (logged, suppressed, summarised) = burst(&limiter, "UNAUTHENTICATED", 1000);
        assert_eq!(logged, N);
        assert_eq!(suppressed, 1000 - N);
        assert_eq!(summarised, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn another_reason_is_not_starved() {
        let limiter = RateLimiter::new(N);
        burst(&limiter, "UNAUTHENTICATED", 1000);
        assert_eq!(
            limiter.admit("UNAVAILABLE"),
            Admission::Log { suppressed: 0 }
        );
        let (logged, _, _) = burst(&limiter, "PERMISSION_DENIED", 1000);
        assert_eq!(logged, N);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_line_after_suppression_reports_the_count_once() {
        let limiter = RateLimiter::new(N);
        burst(&limiter, "INTERNAL", 1000);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(
            limiter.admit("INTERNAL"),
            Admission::Log {
                suppressed: u64::from(1000 - N)
            }
        );
        // The token is spent and the count reported: the next one is counted afresh...
        assert_eq!(limiter.admit("INTERNAL"), Admission::Suppress);
        // ...and reported with the first line logged a summary interval later, not before.
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(limiter.admit("INTERNAL"), Admission::Log { suppressed: 0 });
        tokio::time::advance(SUMMARY_INTERVAL).await;
        assert_eq!(limiter.admit("INTERNAL"), Admission::Log { suppressed: 1 });
    }

    #[tokio::test(start_paused = true)]
    async fn a_sustained_flood_logs_n_lines_a_second() {
        let limiter = RateLimiter::new(N);
        let (mut logged, mut summaries, mut summarised, mut dropped) = (0, 0, 0, 0);
        // 10 seconds of 1,000 refusals a second, then one more.
        for i in 0..=10_000 {
            match limiter.admit("UNAUTHENTICATED") {
                Admission::Log { suppressed } => {
                    logged += 1;
                    if suppressed > 0 {
                        summaries += 1;
                        summarised += suppressed;
                    }
                }
                Admission::Suppress => dropped += 1,
            }
            if i == 9_999 {
                tokio::time::advance(SUMMARY_INTERVAL).await;
            } else {
                tokio::time::advance(Duration::from_millis(1)).await;
            }
        }
        // The initial burst plus the refill, never more; one summary a second.
        assert!((N * 10..=N * 12).contains(&logged), "{logged}");
        assert!((9..=12).contains(&summaries), "{summaries}");
        // Nothing is lost: the last summary catches up with everything dropped.
        assert_eq!(summarised, dropped);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_spell_refills_the_burst_but_no_more() {
        let limiter = RateLimiter::new(N);
        burst(&limiter, "UNAVAILABLE", N);
        tokio::time::advance(Duration::from_secs(3600)).await;
        let (logged, suppressed, _) = burst(&limiter, "UNAVAILABLE", 3 * N);
        assert_eq!((logged, suppressed), (N, 2 * N));
    }
}
