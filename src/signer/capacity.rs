//! How many gRPC connections fit in the memory this process may use.
//!
//! A connection costs its TLS buffers, HTTP/2 state and a task: about 36 KiB with a gRPC
//! health Watch open on it (docs/benchmarks.md, the hostile-peer figures). Counted at
//! [`BYTES_PER_CONNECTION`], connections may take half of the memory limit; the other half is
//! for the caches, the calls in progress and the allocator.

use std::path::Path;

/// What one held connection is counted at, with room above the measured cost.
pub const BYTES_PER_CONNECTION: u64 = 48 * 1024;
/// Without any memory limit known.
pub const MAX_CONNECTIONS_UNLIMITED: usize = 16_384;

/// Request bytes that calls may hold while they wait or are served, all sources together:
/// a quarter of the memory limit (connections take half), 256 MiB without a known limit.
pub fn held_request_bytes(memory_limit: Option<u64>) -> usize {
    let bytes = memory_limit.map_or(256 << 20, |limit| (limit / 4).max(16 << 20));
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

/// The `--max-connections` default: what half of `memory_limit` holds, at most
/// [`MAX_CONNECTIONS_UNLIMITED`], at least 64 (a process that small serves a few pods).
pub fn default_max_connections(memory_limit: Option<u64>) -> usize {
    let Some(limit) = memory_limit else {
        return MAX_CONNECTIONS_UNLIMITED;
    };
    let fit = limit / 2 / BYTES_PER_CONNECTION;
    usize::try_from(fit)
        .unwrap_or(usize::MAX)
        .clamp(64, MAX_CONNECTIONS_UNLIMITED)
}

/// The memory limit of this process's cgroup (v2 `memory.max`, else v1
/// `memory.limit_in_bytes`); `None` when unlimited or unknown.
pub fn cgroup_memory_limit() -> Option<u64> {
    cgroup_limit_in(Path::new("/sys/fs/cgroup"))
}

fn cgroup_limit_in(root: &Path) -> Option<u64> {
    let read = |name: &str| std::fs::read_to_string(root.join(name)).ok();
    let value = read("memory.max").or_else(|| read("memory/memory.limit_in_bytes"))?;
    let bytes: u64 = value.trim().parse().ok()?;
    // cgroup v1 says "no limit" with a number near i64::MAX rounded to the page size.
    (bytes < 1 << 60).then_some(bytes)
}

/// Parses a byte count: digits with an optional Kubernetes suffix (Ki, Mi, Gi, Ti, or the
/// decimal k, M, G, T), as a container's `resources.limits.memory` is written.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a byte count such as 268435456 or 256Mi"))?;
    let unit: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        other => return Err(format!("unknown unit {other:?} in {text:?}")),
    };
    number
        .checked_mul(unit)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_byte_counts_as_kubernetes_writes_them() {
        assert_eq!(parse_bytes("268435456"), Ok(268_435_456));
        assert_eq!(parse_bytes("256Mi"), Ok(256 << 20));
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes("500M"), Ok(500_000_000));
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("12Qi").is_err());
        assert!(parse_bytes("-5").is_err());
        assert!(parse_bytes("Mi").is_err());
        assert!(parse_bytes("99999999999Ti").is_err());
    }

    #[test]
    fn connections_take_half_the_memory_limit() {
        assert_eq!(default_max_connections(None), MAX_CONNECTIONS_UNLIMITED);
        // The chart's default limit.
        assert_eq!(default_max_connections(Some(256 << 20)), 2730);
        assert_eq!(default_max_connections(Some(1 << 20)), 64);
        assert_eq!(
            default_max_connections(Some(64 << 30)),
            MAX_CONNECTIONS_UNLIMITED
        );
    }

    #[test]
    fn held_requests_take_a_quarter_of_the_memory_limit() {
        assert_eq!(held_request_bytes(None), 256 << 20);
        assert_eq!(held_request_bytes(Some(256 << 20)), 64 << 20);
        assert_eq!(held_request_bytes(Some(32 << 20)), 16 << 20);
    }

    #[test]
    fn reads_cgroup_v2_and_v1_limits() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(cgroup_limit_in(dir.path()), None);
        std::fs::create_dir(dir.path().join("memory")).unwrap();
        std::fs::write(
            dir.path().join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        assert_eq!(cgroup_limit_in(dir.path()), None, "v1 without a limit");
        std::fs::write(
            dir.path().join("memory/memory.limit_in_bytes"),
            "536870912\n",
        )
        .unwrap();
        assert_eq!(cgroup_limit_in(dir.path()), Some(512 << 20));
        std::fs::write(dir.path().join("memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_limit_in(dir.path()), None, "v2 without a limit");
        std::fs::write(dir.path().join("memory.max"), "268435456\n").unwrap();
        assert_eq!(cgroup_limit_in(dir.path()), Some(256 << 20));
    }
}
