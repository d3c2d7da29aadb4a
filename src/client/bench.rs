//! `istio-csr-rs bench`: a load generator for CreateCertificate over TLS. CSRs are generated
//! before the clock starts so that only the server's work is measured; with `--server-pid` the
//! server's CPU time per request is read from /proc.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::{KeyType, Target, WorkloadArgs, build_csr, metadata};
use crate::proto::istio_v1_auth::IstioCertificateRequest;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Total requests to send (the run also stops at --duration).
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Longest the measured run may take.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Requests sent before measuring (connection set-up, caches, CPU frequency).
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    /// Distinct CSRs (keys) to cycle through.
    #[arg(long, default_value_t = 64)]
    pub distinct_csrs: usize,
    #[arg(long, value_enum, default_value_t = KeyType::EcP256)]
    pub key_type: KeyType,
    /// Requested lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl_seconds: i64,
    /// PID of the server, to report its CPU seconds per request (Linux /proc).
    #[arg(long)]
    pub server_pid: Option<u32>,
}

pub async fn run(args: BenchArgs) -> ExitCode {
    match bench(&args).await {
        Ok(report) => {
            println!("{report}");
            if report.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

pub struct Report {
    pub ok: usize,
    pub failed: usize,
    pub failures: BTreeMap<String, usize>,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
    pub server_cpu: Option<Duration>,
    pub concurrency: usize,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        writeln!(
            f,
            "concurrency {}: {} ok, {} failed in {:.2} s = {:.0} req/s",
            self.concurrency,
            self.ok,
            self.failed,
            secs,
            self.ok as f64 / secs.max(f64::EPSILON)
        )?;
        for (code, count) in &self.failures {
            writeln!(f, "  failures {code}: {count}")?;
        }
        let ms = |p: f64| percentile(&self.latencies, p).as_secs_f64() * 1000.0;
        writeln!(
            f,
            "latency ms: p50 {:.2}, p90 {:.2}, p99 {:.2}, max {:.2}",
            ms(0.50),
            ms(0.90),
            ms(0.99),
            ms(1.0)
        )?;
        if let Some(cpu) = self.server_cpu {
            let total = self.ok + self.failed;
            write!(
                f,
                "server CPU: {:.3} s total, {:.1} us per request",
                cpu.as_secs_f64(),
                cpu.as_secs_f64() * 1e6 / total.max(1) as f64
            )?;
        }
        Ok(())
    }
}

/// Nearest-rank percentile of a sorted slice.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn bench(args: &BenchArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let identity = args.workload.identity()?;
    let csrs: Arc<Vec<String>> = Arc::new(
        (0..args.distinct_csrs.max(1))
            .map(|_| build_csr(&identity, &args.key_type.generate()?))
            .collect::<anyhow::Result<_>>()?,
    );
    let client = args.target.connect().await?;
    let token = args.target.token()?;
    let make = |i: usize| {
        args.target.request(
            token.as_deref(),
            IstioCertificateRequest {
                csr: csrs[i % csrs.len()].clone(),
                validity_duration: args.ttl_seconds,
                metadata: Some(metadata(None, None)),
            },
        )
    };
    for i in 0..args.warmup {
        client
            .clone()
            .create_certificate(make(i)?)
            .await
            .context("warm-up request failed")?;
    }

    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = args.server_pid.map(process_cpu).transpose()?;
    let started = Instant::now();
    let deadline = started + args.duration;
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let next = next.clone();
        let mut client = client.clone();
        let total = args.requests;
        let make = {
            let token = token.clone();
            let target = args.target.clone();
            let csrs = csrs.clone();
            let ttl = args.ttl_seconds;
            move |i: usize| {
                target.request(
                    token.as_deref(),
                    IstioCertificateRequest {
                        csr: csrs[i % csrs.len()].clone(),
                        validity_duration: ttl,
                        metadata: Some(metadata(None, None)),
                    },
                )
            }
        };
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failures: BTreeMap<String, usize> = BTreeMap::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || Instant::now() >= deadline {
                    break;
                }
                let request = make(i)?;
                let sent = Instant::now();
                match client.create_certificate(request).await {
                    Ok(_) => latencies.push(sent.elapsed()),
                    Err(status) => {
                        *failures.entry(format!("{:?}", status.code())).or_default() += 1
                    }
                }
            }
            anyhow::Ok((latencies, failures))
        }));
    }
    let mut latencies = Vec::new();
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for worker in workers {
        let (l, f) = worker.await??;
        latencies.extend(l);
        for (code, n) in f {
            *failures.entry(code).or_default() += n;
        }
    }
    let elapsed = started.elapsed();
    let server_cpu = match (args.server_pid, cpu_before) {
        (Some(pid), Some(before)) => Some(process_cpu(pid)?.saturating_sub(before)),
        _ => None,
    };
    latencies.sort_unstable();
    Ok(Report {
        ok: latencies.len(),
        failed: failures.values().sum(),
        failures,
        elapsed,
        latencies,
        server_cpu,
        concurrency: args.concurrency,
    })
}

/// User + system CPU time of a process, all threads, from /proc/<pid>/stat.
fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces; fields after its closing ')' are fixed.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc stat format")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 overall: 11 and 12 after the state field.
    let ticks: u64 = fields
        .get(11)
        .zip(fields.get(12))
        .and_then(|(u, s)| Some(u.parse::<u64>().ok()? + s.parse::<u64>().ok()?))
        .context("unexpected /proc stat format")?;
    let hz = clock_ticks_per_second();
    Ok(Duration::from_secs_f64(ticks as f64 / hz))
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY-free: sysconf is not callable without unsafe, and Linux has used 100 Hz for
    // USER_HZ on every architecture for decades; `getconf CLK_TCK` confirms it when present.
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let data: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&data, 0.50), Duration::from_millis(50));
        assert_eq!(percentile(&data, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&data, 1.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn reads_this_processes_cpu_time() {
        let before = process_cpu(std::process::id()).unwrap();
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(process_cpu(std::process::id()).unwrap() >= before);
    }
}
